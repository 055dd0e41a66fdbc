"""Classification of pydantic-ai's errors, sharing the HTTP-status rules of every classifier."""

from __future__ import annotations

import pydantic
from pydantic_ai import exceptions as pai

from prefect_batch_llm.errors import (
    DefaultErrorClassifier,
    ErrorCategory,
    ErrorInfo,
    LLMCallError,
    classify_http_status,
    exception_chain,
    info_for_category,
)
from prefect_batch_llm.gemini.errors import GeminiErrorClassifier, is_cache_expired


class PydanticAIErrorClassifier:
    """Maps pydantic-ai errors onto the retry categories.

    | pydantic-ai error | category |
    |---|---|
    | `ModelRateLimitError` | `rate_limit`, waiting `retry_after` (or RetryInfo) |
    | `ModelOverloadedError`, `ModelTimeoutError`, other server errors | `transient` |
    | `ModelRequestRejectedError` 400 "Cache content X is expired" | `cache_expired` |
    | other 4xx (`ModelHTTPError.status_code`) | `permanent` (401/403: check your API key) |
    | `ContentFilterError` | `content_filter` (permanent) |
    | `UsageLimitExceeded` | `permanent` |
    | `UnexpectedModelBehavior` (output validation exhausted) | `validation`: retried at once |
    """

    def __init__(self) -> None:
        self._gemini = GeminiErrorClassifier()
        self._default = DefaultErrorClassifier()

    def classify(self, exception: BaseException) -> ErrorInfo:
        for link in exception_chain(exception):
            if isinstance(link, LLMCallError):
                return self._default.classify(link)
            info = self._classify_pydantic_ai(link)
            if info is not None:
                return info
        return self._gemini.classify(exception)

    def _classify_pydantic_ai(self, error: BaseException) -> ErrorInfo | None:
        if isinstance(error, pai.ContentFilterError):
            return info_for_category(ErrorCategory.CONTENT_FILTER)
        if isinstance(error, pai.UsageLimitExceeded):
            return info_for_category(
                ErrorCategory.PERMANENT, message="a pydantic-ai usage limit was exceeded"
            )
        if isinstance(error, pai.UnexpectedModelBehavior):
            return info_for_category(ErrorCategory.VALIDATION)
        if not isinstance(error, pai.ModelAPIError):
            return None
        if isinstance(error, pai.ModelRateLimitError):
            wait = error.retry_after
            if wait is None and error.__cause__ is not None:
                wait = self._gemini.classify(error.__cause__).suggested_wait
            return info_for_category(ErrorCategory.RATE_LIMIT, suggested_wait=wait)
        if isinstance(error, pai.ModelRequestRejectedError) and is_cache_expired(error):
            return info_for_category(ErrorCategory.CACHE_EXPIRED)
        status = getattr(error, "status_code", None)
        if isinstance(status, int):
            return classify_http_status(status, retry_after=error.retry_after)
        if isinstance(error, pai.ModelRequestRejectedError):
            return info_for_category(ErrorCategory.PERMANENT)
        return info_for_category(ErrorCategory.TRANSIENT, suggested_wait=error.retry_after)


def validation_feedback(exception: BaseException) -> str | None:
    """The pydantic validation errors behind an output failure, as text for the next prompt."""
    for link in exception_chain(exception):
        if isinstance(link, pydantic.ValidationError):
            return str(link)
    return None
