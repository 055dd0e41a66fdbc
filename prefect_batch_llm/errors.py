"""Error classification: what went wrong with an LLM call and whether to retry it.

Every failed attempt is passed through an [`ErrorClassifier`][prefect_batch_llm.ErrorClassifier],
which returns an [`ErrorInfo`][prefect_batch_llm.ErrorInfo]. The processor's retry policy acts
on that answer only, so one classifier decides for every strategy that uses it:

| category        | retried?                    | wait                                   |
|-----------------|-----------------------------|----------------------------------------|
| `rate_limit`    | yes, own budget             | >= Retry-After; pauses the whole scope |
| `transient`     | yes, up to `max_attempts`   | exponential backoff with jitter        |
| `timeout`       | yes, up to `max_attempts`   | exponential backoff with jitter        |
| `validation`    | yes, up to `max_attempts`   | none (retry at once)                   |
| `cache_expired` | yes, does not use attempts  | none (strategy renews the cache)       |
| `permanent`     | no                          | -                                      |
| `content_filter`| no                          | -                                      |

The engine gives its own categories to items it stops: `prepare_failed` (the strategy's
`prepare()` failed for good), `batch_timeout`, `aborted` (`on_result` raised),
`invalid_input` (not an item, a duplicate id, a bad input line) and `budget_exceeded` (the
budget cap `ProcessorConfig.max_cost_usd` stopped the batch before the item started).
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, cast, runtime_checkable

import pydantic

from prefect_batch_llm._secrets import scrub
from prefect_batch_llm.results import TokenUsage


class ErrorCategory(StrEnum):
    """The categories the built-in classifiers produce (plain strings, so custom ones work)."""

    RATE_LIMIT = "rate_limit"
    TRANSIENT = "transient"
    TIMEOUT = "timeout"
    VALIDATION = "validation"
    CACHE_EXPIRED = "cache_expired"
    PERMANENT = "permanent"
    CONTENT_FILTER = "content_filter"
    PREPARE_FAILED = "prepare_failed"
    BATCH_TIMEOUT = "batch_timeout"
    INVALID_INPUT = "invalid_input"
    ABORTED = "aborted"
    BUDGET_EXCEEDED = "budget_exceeded"


@dataclass(frozen=True)
class ErrorInfo:
    """A classifier's verdict on one failed attempt.

    Attributes:
        is_retryable: Whether another attempt may succeed.
        is_rate_limit: The provider asked us to slow down; retried on a separate budget
            (`RetryConfig.max_rate_limit_retries`) and pauses every worker of the scope.
        is_timeout: The attempt ran out of time.
        error_category: One of [`ErrorCategory`][prefect_batch_llm.ErrorCategory] or your own.
        suggested_wait: Seconds the provider asked us to wait (Retry-After / RetryInfo), if any.
        message: A hint for the user, shown in results next to the error.
    """

    is_retryable: bool
    is_rate_limit: bool = False
    is_timeout: bool = False
    error_category: str = ErrorCategory.TRANSIENT
    suggested_wait: float | None = None
    message: str | None = None


@runtime_checkable
class ErrorClassifier(Protocol):
    """Anything with a `classify(exception) -> ErrorInfo` method."""

    def classify(self, exception: BaseException) -> ErrorInfo: ...


class FrameworkTimeoutError(TimeoutError):
    """One attempt (or an item's total time budget) ran longer than the configured limit."""

    def __init__(
        self, message: str, *, item_id: str | None, elapsed: float, timeout_limit: float
    ) -> None:
        super().__init__(message)
        self.item_id = item_id
        self.elapsed = elapsed
        self.timeout_limit = timeout_limit


class LLMCallError(Exception):
    """An error a strategy raises to say exactly how its failure should be treated.

    The default classifier trusts `category` and `retry_after`; `token_usage` carries the
    tokens the provider billed for the failed attempt so they are counted in the results.
    """

    category: str = ErrorCategory.TRANSIENT

    def __init__(
        self,
        message: str,
        *,
        category: str | None = None,
        retry_after: float | None = None,
        token_usage: TokenUsage | None = None,
    ) -> None:
        super().__init__(message)
        if category is not None:
            self.category = category
        self.retry_after = retry_after
        self.token_usage = token_usage


class RateLimitError(LLMCallError):
    """The provider rejected the call for quota reasons (HTTP 429)."""

    category = ErrorCategory.RATE_LIMIT


class TransientError(LLMCallError):
    """A failure that another attempt, after a backoff, may not hit (5xx, connection reset)."""

    category = ErrorCategory.TRANSIENT


class PermanentError(LLMCallError):
    """A failure no retry can fix (bad request, bad key, blocked content)."""

    category = ErrorCategory.PERMANENT


class OutputValidationError(LLMCallError):
    """The model answered, but the answer did not validate; retried at once."""

    category = ErrorCategory.VALIDATION


class CacheExpiredError(LLMCallError):
    """The provider-side context cache the call referenced has expired."""

    category = ErrorCategory.CACHE_EXPIRED


_RETRYABLE = {
    ErrorCategory.RATE_LIMIT,
    ErrorCategory.TRANSIENT,
    ErrorCategory.TIMEOUT,
    ErrorCategory.VALIDATION,
    ErrorCategory.CACHE_EXPIRED,
}
# Errors that signal a bug in the caller's code: retrying them only burns time.
_PROGRAMMING_ERRORS = (
    TypeError,
    AttributeError,
    NameError,
    NotImplementedError,
    KeyError,
    IndexError,
    AssertionError,
)


def info_for_category(
    category: str, *, suggested_wait: float | None = None, message: str | None = None
) -> ErrorInfo:
    """The `ErrorInfo` a category implies under the default policy."""
    return ErrorInfo(
        is_retryable=category in _RETRYABLE,
        is_rate_limit=category == ErrorCategory.RATE_LIMIT,
        is_timeout=category == ErrorCategory.TIMEOUT,
        error_category=category,
        suggested_wait=suggested_wait,
        message=message,
    )


def classify_http_status(
    status: int, *, retry_after: float | None = None, message: str | None = None
) -> ErrorInfo:
    """Classify an HTTP status code. Shared by every provider-specific classifier.

    429 is a rate limit; 408 and 5xx are transient; 401/403 are permanent with a key hint;
    any other 4xx is permanent.
    """
    if status == 429:
        return info_for_category(
            ErrorCategory.RATE_LIMIT, suggested_wait=retry_after, message=message
        )
    if status == 408:
        return info_for_category(ErrorCategory.TIMEOUT, suggested_wait=retry_after)
    if status >= 500:
        return info_for_category(
            ErrorCategory.TRANSIENT, suggested_wait=retry_after, message=message
        )
    if status in (401, 403):
        return info_for_category(
            ErrorCategory.PERMANENT,
            message=message
            or f"HTTP {status}: the provider rejected the credentials; check your API key.",
        )
    return info_for_category(ErrorCategory.PERMANENT, message=message)


def parse_retry_after(value: str | float | int | None, *, now: float | None = None) -> float | None:
    """Parse a Retry-After value: seconds (`"17"`, `"1.5"`, `"17s"`) or an HTTP date."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return max(0.0, float(value))
    text = value.strip()
    try:
        return max(0.0, float(text.removesuffix("s")))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its causes and contexts, each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def http_status_of(exc: BaseException) -> int | None:
    """The HTTP status an SDK error carries, read from its attributes, never from its text.

    Understands `status_code` (httpx, pydantic-ai), an int `code` (google-genai) and
    `response.status_code`.
    """
    for attr in ("status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None)
    if isinstance(value, int) and 100 <= value <= 599:
        return value
    return None


def retry_after_of(exc: BaseException) -> float | None:
    """Seconds to wait that an error carries: a `retry_after` attribute or a Retry-After header."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, int | float | str):
        parsed = parse_retry_after(value)
        if parsed is not None:
            return parsed
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if isinstance(headers, Mapping) or hasattr(headers, "get"):
        try:
            header = headers.get("retry-after")  # type: ignore[union-attr]
        except Exception:
            header = None
        if isinstance(header, str):
            return parse_retry_after(header)
    return None


def token_usage_of(exc: BaseException) -> TokenUsage:
    """Tokens billed for a failed attempt, if the error (or one it wraps) carries them."""
    for link in exception_chain(exc):
        usage = getattr(link, "token_usage", None)
        if isinstance(usage, Mapping):
            counts = {k: v for k, v in usage.items() if isinstance(k, str) and isinstance(v, int)}
            return cast(TokenUsage, counts)
    return TokenUsage()


class DefaultErrorClassifier:
    """The classifier used when neither the processor nor the strategy names one.

    In order: an [`LLMCallError`][prefect_batch_llm.LLMCallError] says its own category; timeouts
    are `timeout`; pydantic/JSON validation errors are `validation`; an HTTP status found on the
    error (or a wrapped one) is classified by `classify_http_status()`; connection errors are
    `transient`; programming errors (`TypeError`, `KeyError`, ...) are `permanent`. Then, for
    errors that carry no status attribute at all, Gemini's documented error text is read (see
    `classify_text()`): code ported from batch-llm often re-raises a google-genai error as a
    plain `Exception(str(error))`. Anything else is `transient`.
    """

    #: The `code STATUS` pairs Gemini documents (google.rpc codes), with which the text of a
    #: google-genai `APIError` starts: `429 RESOURCE_EXHAUSTED. {'error': {...}}`.
    GEMINI_STATUS_CODES = {
        "INVALID_ARGUMENT": 400,
        "FAILED_PRECONDITION": 400,
        "UNAUTHENTICATED": 401,
        "PERMISSION_DENIED": 403,
        "NOT_FOUND": 404,
        "RESOURCE_EXHAUSTED": 429,
        "INTERNAL": 500,
        "UNAVAILABLE": 503,
        "DEADLINE_EXCEEDED": 504,
    }
    #: How Gemini names a context cache in its error messages.
    _CACHE_WORDS = ("cachedcontent", "cached content", "cache content", "cached_content")

    def classify(self, exception: BaseException) -> ErrorInfo:
        for link in exception_chain(exception):
            if isinstance(link, LLMCallError):
                return info_for_category(
                    link.category, suggested_wait=link.retry_after, message=None
                )
        if isinstance(exception, TimeoutError):
            return info_for_category(ErrorCategory.TIMEOUT)
        if isinstance(exception, pydantic.ValidationError | json.JSONDecodeError):
            return info_for_category(ErrorCategory.VALIDATION)
        for link in exception_chain(exception):
            status = http_status_of(link)
            if status is not None:
                return classify_http_status(status, retry_after=retry_after_of(link))
        if isinstance(exception, ConnectionError):
            return info_for_category(ErrorCategory.TRANSIENT)
        if isinstance(exception, _PROGRAMMING_ERRORS):
            return info_for_category(
                ErrorCategory.PERMANENT,
                message=f"{type(exception).__name__} looks like a bug in the strategy; "
                "not retried.",
            )
        for link in exception_chain(exception):
            info = self.classify_text(link)
            if info is not None:
                return info
        return info_for_category(ErrorCategory.TRANSIENT)

    def classify_text(self, exception: BaseException) -> ErrorInfo | None:
        """Classify one exception by Gemini's documented error text, or None.

        Only for an exception that carries no status attribute (`status`, `status_code`,
        `code`): an error that says its status is classified by it, never by its words. The
        text must start with one of Gemini's `code STATUS` pairs
        (`GEMINI_STATUS_CODES`), as `str()` of a google-genai `APIError` does:

        - `429 RESOURCE_EXHAUSTED`: `rate_limit`, waiting the body's `retryDelay` if present;
        - `400 INVALID_ARGUMENT ... Cache content X is expired.`: `cache_expired`;
        - `403 PERMISSION_DENIED` / `404 NOT_FOUND` about the cached content (a cache deleted
          on the server): `cache_expired`, the cached strategy re-creates it;
        - any other code as `classify_http_status()` (401/403 permanent with a key hint,
          5xx transient, other 4xx permanent).
        """
        if any(
            getattr(exception, attr, None) is not None for attr in ("status", "status_code", "code")
        ):
            return None
        text = str(exception)
        head = text.lstrip().split(None, 2)
        if len(head) < 2 or not head[0].isdigit():
            return None
        code = int(head[0])
        if self.GEMINI_STATUS_CODES.get(head[1].rstrip(".:,"), -1) != code:
            return None
        lowered = text.lower()
        about_cache = any(word in lowered for word in self._CACHE_WORDS)
        if code == 400 and about_cache and "is expired" in lowered:
            return info_for_category(ErrorCategory.CACHE_EXPIRED)
        if (
            code in (403, 404)
            and about_cache
            and ("not found" in lowered or "permission denied" in lowered)
        ):
            return info_for_category(
                ErrorCategory.CACHE_EXPIRED,
                message="the context cache is gone on the server; the strategy re-creates it",
            )
        return classify_http_status(code, retry_after=self._retry_delay_in(text))

    @staticmethod
    def _retry_delay_in(text: str) -> float | None:
        """The `retryDelay` of a RetryInfo quoted in an error's text (`'retryDelay': '17s'`)."""
        at = text.find("retryDelay")
        if at < 0:
            return None
        rest = text[at + len("retryDelay") :].lstrip("'\": ")
        number = ""
        for char in rest:
            if not (char.isdigit() or char == "."):
                break
            number += char
        return parse_retry_after(number) if number else None


def describe(exc: BaseException, *, limit: int = 500) -> str:
    """`Type: message`, shortened and scrubbed of credentials, for results and reports."""
    text = scrub(f"{type(exc).__name__}: {exc}")
    return text if len(text) <= limit else text[: limit - 3] + "..."
