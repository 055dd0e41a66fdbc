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
# A cache deleted on the server (by hand, by another run's cleanup, or lost in a restart): the
# hosted API answers 403 "CachedContent not found (or permission denied)", others 404
# "CachedContent not found: cachedContents/x".
_CACHE_GONE = re.compile(
    r"cached?[ _]?contents?\b.*\b(not found|permission denied)"
    r"|\b(not found|permission denied)\b.*\bcached?[ _]?contents?\b",
    re.IGNORECASE | re.DOTALL,
)
_TOO_SMALL = re.compile(r"cached content is too small", re.IGNORECASE)
_TEXT_CLASSIFIER = DefaultErrorClassifier()


class GeminiContentBlockedError(PermanentError):
    """Gemini blocked the prompt or the answer (safety, recitation, prohibited content)."""

    category = ErrorCategory.CONTENT_FILTER


class GeminiEmptyResponseError(TransientError):
    """Gemini answered without any text (and without a block reason)."""


def _request_used_cache(error: genai_errors.APIError) -> bool | None:
    """Whether the failed request named a context cache: a `cachedContent` in its body or a
    `cachedContents/...` URL. None when the SDK kept no request to look at."""
    try:
        request = getattr(error.response, "request", None)  # httpx raises if it has none
    except RuntimeError:
        return None
    if request is None:
        return None
    if "cachedContents" in str(getattr(request, "url", "")):
        return True
    try:
        body = getattr(request, "content", None)
    except Exception:  # a streamed body that was not read
        return None
    if isinstance(body, bytes):
        return b'"cachedContent"' in body
    return None


def _cache_problem(error: genai_errors.APIError) -> str | None:
    """`"expired"` for Gemini's 400 "Cache content X is expired", `"gone"` for a 403/404 about
    a cache deleted on the server, else None. A 403 that does not name the cached content (a
    bad or suspended API key) is never taken for a lost cache, nor is one on a request that
    used no cache."""
    message = error.message or ""
    if error.code == 400 and _CACHE_EXPIRED.search(message):
        return "expired"
    if (
        error.code in (403, 404)
        and _CACHE_GONE.search(message)
        and _request_used_cache(error) is not False
    ):
        return "gone"
    return None


def is_cache_expired(exc: BaseException) -> bool:
    """Whether `exc` (or an error it wraps) says the request's context cache is no longer
    usable: Gemini's 400 "Cache content X is expired", or a 403/404 "CachedContent not found"
    for a cache deleted on the server. Both are recovered alike: find or create the cache
    again and repeat the call. Read from a google-genai `APIError`, or from Gemini's error
    text for an exception that carries no status attribute (see
    `DefaultErrorClassifier.classify_text()`)."""
    for link in exception_chain(exc):
        if isinstance(link, genai_errors.APIError):
            if _cache_problem(link) is not None:
                return True
            continue
        info = _TEXT_CLASSIFIER.classify_text(link)
        if info is not None and info.error_category == ErrorCategory.CACHE_EXPIRED:
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
    - 403/404 "CachedContent not found" on a request that used a cache (the cache was deleted
      on the server, by hand, by another run or in a restart): `cache_expired` too, the
      cached strategy re-creates it;
    - 400 "Cached content is too small": `permanent`, with a hint;
    - other 401/403: `permanent`, "check your API key"; other 4xx: `permanent`;
    - 500/502/503/504: `transient`;
    - httpx2 timeouts: `timeout`; connection errors and malformed bodies: `transient`;
    - blocked content: `content_filter`; everything else as the `DefaultErrorClassifier`
      (which reads Gemini's error text, `429 RESOURCE_EXHAUSTED. {...}`, from exceptions that
      carry no status attribute).
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
        problem = _cache_problem(error)
        if problem == "expired":
            return info_for_category(ErrorCategory.CACHE_EXPIRED)
        if problem == "gone":
            return info_for_category(
                ErrorCategory.CACHE_EXPIRED,
                message="the context cache is gone on the server; the strategy re-creates it",
            )
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
