"""Gemini errors and their classification."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx2
from google.genai import errors as genai_errors

from prefect_batch_llm.errors import (
    DefaultErrorClassifier,
    ErrorCategory,
    ErrorInfo,
    LLMCallError,
    PermanentError,
    TransientError,
    classify_http_status,
    exception_chain,
    info_for_category,
    parse_retry_after,
)

_CACHE_EXPIRED = re.compile(r"cache(d)?[ _]?content\b.*\bis expired", re.IGNORECASE)
_TOO_SMALL = re.compile(r"cached content is too small", re.IGNORECASE)


class GeminiContentBlockedError(PermanentError):
    """Gemini blocked the prompt or the answer (safety, recitation, prohibited content)."""

    category = ErrorCategory.CONTENT_FILTER


class GeminiEmptyResponseError(TransientError):
    """Gemini answered without any text (and without a block reason)."""


def is_cache_expired(exc: BaseException) -> bool:
    """Whether `exc` (or an error it wraps) is Gemini's 400 "Cache content X is expired"."""
    for link in exception_chain(exc):
        if (
            isinstance(link, genai_errors.APIError)
            and link.code == 400
            and _CACHE_EXPIRED.search(link.message or "")
        ):
            return True
    return False


def _retry_delay(error: genai_errors.APIError) -> float | None:
    """Retry-After header, else the RetryInfo retryDelay of the error body."""
    headers = getattr(error.response, "headers", None)
    if headers is not None:
        header = headers.get("retry-after")
        if header:
            parsed = parse_retry_after(header)
            if parsed is not None:
                return parsed
    details: Any = error.details
    if isinstance(details, dict):
        details = details.get("error", details).get("details")
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("RetryInfo"):
            return parse_retry_after(str(detail.get("retryDelay", "")))
    return None


class GeminiErrorClassifier:
    """Classifies google-genai errors by their HTTP status code (never by message digits).

    - 429: `rate_limit`, waiting the Retry-After header or RetryInfo `retryDelay`;
    - 400 "Cache content X is expired": `cache_expired` (the cached strategy renews);
    - 400 "Cached content is too small": `permanent`, with a hint;
    - 401/403: `permanent`, "check your API key"; other 4xx: `permanent`;
    - 500/502/503/504: `transient`;
    - httpx2 timeouts: `timeout`; connection errors and malformed bodies: `transient`;
    - blocked content: `content_filter`; everything else as the `DefaultErrorClassifier`.
    """

    def __init__(self) -> None:
        self._fallback = DefaultErrorClassifier()

    def classify(self, exception: BaseException) -> ErrorInfo:
        for link in exception_chain(exception):
            if isinstance(link, LLMCallError):
                return self._fallback.classify(link)
            if isinstance(link, genai_errors.APIError):
                return self._classify_api_error(link)
            if isinstance(link, httpx2.TimeoutException):
                return info_for_category(ErrorCategory.TIMEOUT)
            if isinstance(link, httpx2.TransportError):
                return info_for_category(ErrorCategory.TRANSIENT)
            if isinstance(link, json.JSONDecodeError):
                return info_for_category(
                    ErrorCategory.TRANSIENT, message="Gemini sent a malformed response body."
                )
        return self._fallback.classify(exception)

    def _classify_api_error(self, error: genai_errors.APIError) -> ErrorInfo:
        code = error.code if isinstance(error.code, int) else 0
        message = error.message or ""
        if code == 400 and _CACHE_EXPIRED.search(message):
            return info_for_category(ErrorCategory.CACHE_EXPIRED)
        if code == 400 and _TOO_SMALL.search(message):
            return info_for_category(
                ErrorCategory.PERMANENT,
                message="the cached content is below the model's minimum cache size; add "
                "content or set fallback_to_uncached=True",
            )
        if code in (401, 403):
            return classify_http_status(
                code,
                message=f"Gemini rejected the request (HTTP {code}): check your API key "
                "(GeminiCredentials.api_key or GEMINI_API_KEY).",
            )
        if code == 0:
            return info_for_category(ErrorCategory.TRANSIENT)
        return classify_http_status(code, retry_after=_retry_delay(error))
