"""Porting parity with batch-llm: Gemini's error text, and its constructor arguments.

batch-llm classified errors partly by their text, and ported code often re-raises a
google-genai error as a plain `Exception(str(error))`: Gemini's documented error shapes
(`429 RESOURCE_EXHAUSTED. {...}`) are recognised in the text of exceptions that carry no
status attribute, never in one that says its status. batch-llm's strategies took `client=`
and `response_parser=`: the strategy blocks refuse such arguments, saying what to use.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from google import genai
from google.genai import errors as genai_errors
from prefect import get_client
from prefect.blocks.core import Block
from prefect.client.schemas.actions import BlockDocumentUpdate
from pydantic import SecretStr, ValidationError

from prefect_batch_llm import (
    DefaultErrorClassifier,
    ErrorCategory,
    LLMCallError,
)
from prefect_batch_llm.gemini import (
    GeminiCachedStrategy,
    GeminiCredentials,
    GeminiErrorClassifier,
    GeminiStrategy,
)
from prefect_batch_llm.gemini.errors import is_cache_expired
from prefect_batch_llm.pydantic_ai import PydanticAIErrorClassifier, PydanticAIStrategy

CLASSIFIERS = [DefaultErrorClassifier(), GeminiErrorClassifier(), PydanticAIErrorClassifier()]
CLASSIFIER_IDS = ["default", "gemini", "pydantic-ai"]


def gemini_text(code: int, status: str, message: str, details: str = "") -> str:
    """What str() of a google-genai APIError reads: `{code} {status}. {response body}`."""
    extra = f", 'details': [{details}]" if details else ""
    return (
        f"{code} {status}. {{'error': {{'code': {code}, 'message': '{message}', "
        f"'status': '{status}'{extra}}}}}"
    )


RETRY_INFO = "{'@type': 'type.googleapis.com/google.rpc.RetryInfo', 'retryDelay': '17s'}"

# (text, category, suggested wait, words of the hint)
SHAPES = [
    pytest.param(
        "400 INVALID_ARGUMENT. {'error': {'code': 400, 'message': 'Cache content 1234 is "
        "expired.', 'status': 'INVALID_ARGUMENT'}}",
        ErrorCategory.CACHE_EXPIRED,
        None,
        None,
        id="400-cache-expired-the-seed-text",
    ),
    pytest.param(
        gemini_text(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.", RETRY_INFO),
        ErrorCategory.RATE_LIMIT,
        17.0,
        None,
        id="429-resource-exhausted-with-retry-delay",
    ),
    pytest.param(
        gemini_text(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted."),
        ErrorCategory.RATE_LIMIT,
        None,
        None,
        id="429-resource-exhausted",
    ),
    pytest.param(
        gemini_text(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
        ErrorCategory.TRANSIENT,
        None,
        None,
        id="503-unavailable",
    ),
    pytest.param(
        gemini_text(500, "INTERNAL", "An internal error has occurred."),
        ErrorCategory.TRANSIENT,
        None,
        None,
        id="500-internal",
    ),
    pytest.param(
        gemini_text(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
        ErrorCategory.TRANSIENT,
        None,
        None,
        id="504-deadline-exceeded",
    ),
    pytest.param(
        gemini_text(400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
        ErrorCategory.PERMANENT,
        None,
        None,
        id="400-invalid-argument",
    ),
    pytest.param(
        gemini_text(400, "FAILED_PRECONDITION", "User location is not supported."),
        ErrorCategory.PERMANENT,
        None,
        None,
        id="400-failed-precondition",
    ),
    pytest.param(
        gemini_text(404, "NOT_FOUND", "models/gemini-9 is not found for API version v1beta."),
        ErrorCategory.PERMANENT,
        None,
        None,
        id="404-model-not-found",
    ),
    pytest.param(
        gemini_text(404, "NOT_FOUND", "CachedContent not found: cachedContents/abc."),
        ErrorCategory.CACHE_EXPIRED,
        None,
        None,
        id="404-cached-content-not-found",
    ),
    pytest.param(
        gemini_text(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."),
        ErrorCategory.PERMANENT,
        None,
        "API key",
        id="401-unauthenticated",
    ),
    pytest.param(
        gemini_text(403, "PERMISSION_DENIED", "Permission denied: Consumer has been suspended."),
        ErrorCategory.PERMANENT,
        None,
        "API key",
        id="403-permission-denied-bad-key",
    ),
    pytest.param(
        gemini_text(403, "PERMISSION_DENIED", "CachedContent not found (or permission denied)"),
        ErrorCategory.CACHE_EXPIRED,
        None,
        None,
        id="403-cached-content-gone-hosted-wording",
    ),
]


@pytest.mark.parametrize("classifier", CLASSIFIERS, ids=CLASSIFIER_IDS)
@pytest.mark.parametrize(("text", "category", "wait", "hint"), SHAPES)
def test_gemini_error_text_of_a_plain_exception_is_classified_by_its_shape(
    classifier: Any, text: str, category: str, wait: float | None, hint: str | None
) -> None:
    info = classifier.classify(Exception(text))
    assert info.error_category == category
    assert info.suggested_wait == wait
    if hint is not None:
        assert hint in (info.message or "")
    # A wrapper around it changes nothing: the text is read along the exception chain.
    try:
        try:
            raise Exception(text)
        except Exception as inner:
            raise RuntimeError("item q1 failed") from inner
    except RuntimeError as outer:
        assert classifier.classify(outer).error_category == category


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("Processed 4290 tokens before the socket closed", id="digits-in-prose"),
        pytest.param("429 Too Many Requests", id="http-reason-not-a-gemini-status"),
        pytest.param("404 UNAVAILABLE. {}", id="code-and-status-disagree"),
        pytest.param("call failed: 429 RESOURCE_EXHAUSTED. {}", id="not-leading"),
    ],
)
@pytest.mark.parametrize("classifier", CLASSIFIERS, ids=CLASSIFIER_IDS)
def test_text_that_is_not_a_documented_shape_stays_transient(classifier: Any, text: str) -> None:
    assert classifier.classify(Exception(text)).error_category == ErrorCategory.TRANSIENT


class StatusCodeError(Exception):
    def __init__(self, text: str, status_code: int) -> None:
        super().__init__(text)
        self.status_code = status_code


class GrpcStyleError(Exception):
    def __init__(self, text: str, status: str) -> None:
        super().__init__(text)
        self.status = status


EXPIRED_TEXT = (
    "400 INVALID_ARGUMENT. {'error': {'code': 400, 'message': 'Cache content 1234 is "
    "expired.', 'status': 'INVALID_ARGUMENT'}}"
)


@pytest.mark.parametrize("classifier", CLASSIFIERS, ids=CLASSIFIER_IDS)
def test_an_exception_with_a_status_attribute_is_not_reclassified_by_its_text(
    classifier: Any,
) -> None:
    # Its HTTP status says 500: transient, whatever the words say.
    assert (
        classifier.classify(StatusCodeError(EXPIRED_TEXT, 500)).error_category
        == ErrorCategory.TRANSIENT
    )
    # A status that is not an HTTP code still means "do not read my text".
    rate_limit_text = gemini_text(429, "RESOURCE_EXHAUSTED", "quota", RETRY_INFO)
    info = classifier.classify(GrpcStyleError(rate_limit_text, "UNAVAILABLE"))
    assert info.error_category == ErrorCategory.TRANSIENT and not info.is_rate_limit
    # A strategy's own LLMCallError category wins.
    assert (
        classifier.classify(LLMCallError(EXPIRED_TEXT, category="permanent")).error_category
        == ErrorCategory.PERMANENT
    )


def test_google_genai_errors_are_classified_by_code_never_by_their_text() -> None:
    overloaded = genai_errors.ServerError(
        503, {"error": {"code": 503, "message": "Cache content 1 is expired.", "status": "X"}}
    )
    for classifier in CLASSIFIERS[1:]:
        assert classifier.classify(overloaded).error_category == ErrorCategory.TRANSIENT
    assert not is_cache_expired(overloaded)


def test_cached_strategy_recovers_from_the_text_shapes_it_classifies_as_expired() -> None:
    """`on_error()` recovers exactly when the classifier says `cache_expired`."""
    assert is_cache_expired(Exception(EXPIRED_TEXT))
    gone = gemini_text(404, "NOT_FOUND", "CachedContent not found: cachedContents/abc.")
    assert is_cache_expired(Exception(gone))
    assert not is_cache_expired(StatusCodeError(EXPIRED_TEXT, 500))
    assert not is_cache_expired(Exception(gemini_text(404, "NOT_FOUND", "models/x not found")))


# -- constructor arguments of ported batch-llm code -------------------------------------------


@pytest.mark.parametrize(
    ("cls", "arguments", "says"),
    [
        pytest.param(
            GeminiStrategy,
            {"client": object()},
            "'client': pass credentials=GeminiCredentials(...)",
            id="gemini-client",
        ),
        pytest.param(
            GeminiStrategy,
            {"response_parser": lambda response: response.text},
            "'response_parser': subclass the strategy and override parse_response()",
            id="gemini-response-parser",
        ),
        pytest.param(
            GeminiStrategy,
            {"api_key": "AIza-not-here"},
            "'api_key': pass credentials=GeminiCredentials(api_key=...)",
            id="gemini-api-key",
        ),
        pytest.param(
            GeminiStrategy,
            {"cache_ttl": 600},
            "GeminiCachedStrategy(",
            id="gemini-cache-argument-without-a-cache",
        ),
        pytest.param(
            GeminiCachedStrategy,
            {"cache_ttl": 600},
            "'cache_ttl': use cache_ttl_seconds",
            id="cached-cache-ttl",
        ),
        pytest.param(
            GeminiCachedStrategy,
            {"cache_refresh_threshold": 0.1},
            "use cache_renewal_buffer_seconds",
            id="cached-refresh-threshold",
        ),
        pytest.param(
            GeminiCachedStrategy,
            {"client": object()},
            "'client': pass credentials=GeminiCredentials(...)",
            id="cached-client",
        ),
        pytest.param(
            PydanticAIStrategy,
            {"agent": object()},
            "'agent': wrap a live Agent with PydanticAIStrategy.from_agent(agent)",
            id="pydantic-ai-agent",
        ),
        pytest.param(
            PydanticAIStrategy,
            {"result_type": "myapp.models:Invoice"},
            "use output_type",
            id="pydantic-ai-result-type",
        ),
        pytest.param(
            GeminiStrategy,
            {"temprature": 0.2},
            "'temprature': did you mean 'temperature'?",
            id="typo",
        ),
        pytest.param(
            GeminiCachedStrategy,
            {"frobnicate": True},
            "'frobnicate': it is not a field. Valid fields: auto_renew, batch_inline_max_bytes, "
            "cache_renewal_buffer",
            id="generic-lists-the-fields",
        ),
    ],
)
def test_unknown_constructor_arguments_are_refused_with_what_to_use(
    cls: type[Block], arguments: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        cls(**arguments)
    assert says in str(refused.value)
    assert f"{cls.__name__}() got unknown argument" in str(refused.value)


def test_ported_batch_llm_gemini_strategy_fails_at_construction_not_at_the_first_call() -> None:
    client = genai.Client(api_key="AIza-test")
    with pytest.raises(ValidationError) as refused:
        GeminiStrategy(model="gemini-2.5-flash", client=client, response_parser=lambda r: r.text)
    message = str(refused.value)
    assert "unknown arguments 'client'" in message and "'response_parser'" in message
    assert "No Gemini API key" not in message


def test_nested_strategy_arguments_are_checked_too() -> None:
    with pytest.raises(ValidationError, match="'cache_ttl': use cache_ttl_seconds"):
        PydanticAIStrategy(
            output_mode="native", context_cache={"cached_documents": ["x"], "cache_ttl": 60}
        )


def test_prefects_own_keys_are_accepted() -> None:
    strategy = GeminiCachedStrategy(block_type_slug="gemini-cached-strategy")
    assert isinstance(strategy, GeminiCachedStrategy)
    nested = PydanticAIStrategy(
        output_mode="native",
        context_cache={"block_type_slug": "gemini-cached-strategy", "cached_documents": ["x"]},
    )
    assert nested.context_cache is not None


async def test_saved_strategy_blocks_still_load_by_class_and_by_slug() -> None:
    cached = GeminiCachedStrategy(
        credentials=GeminiCredentials(api_key=SecretStr("k"), base_url="http://127.0.0.1:9"),
        cached_documents=["The handbook."],
        cache_ttl_seconds=900,
    )
    await cached.save("parity-cached", overwrite=True)
    agent = PydanticAIStrategy(output_mode="native", context_cache=cached, retry_feedback=False)
    await agent.save("parity-agent", overwrite=True)

    loaded = await GeminiCachedStrategy.aload("parity-cached")
    assert loaded.cache_ttl_seconds == 900 and loaded.cached_documents == ["The handbook."]
    assert loaded.credentials.api_key is not None
    assert loaded.credentials.api_key.get_secret_value() == "k"
    by_slug = await Block.aload("gemini-cached-strategy/parity-cached")
    assert isinstance(by_slug, GeminiCachedStrategy) and by_slug.cache_ttl_seconds == 900

    loaded_agent = await PydanticAIStrategy.aload("parity-agent")
    assert loaded_agent.context_cache is not None
    assert loaded_agent.context_cache.cache_ttl_seconds == 900
    assert loaded_agent.retry_feedback is False
    agent_by_slug = await Block.aload("pydantic-ai-strategy/parity-agent")
    assert isinstance(agent_by_slug, PydanticAIStrategy)


async def test_a_saved_document_with_a_field_this_version_lacks_loads_with_a_warning(
    caplog,
) -> None:
    strategy = GeminiStrategy(model="gemini-2.5-flash", temperature=0.3)
    document_id = await strategy.save("parity-old-document", overwrite=True)
    # What a document saved by another version of the block could hold.
    async with get_client() as client:
        await client.update_block_document(
            document_id, BlockDocumentUpdate(data={"cache_refresh_threshold": 0.1})
        )
        saved = await client.read_block_document(document_id)
    assert saved.data["cache_refresh_threshold"] == 0.1

    with caplog.at_level(logging.WARNING, logger="prefect_batch_llm"):
        loaded = await GeminiStrategy.aload("parity-old-document")
        by_slug = await Block.aload("gemini-strategy/parity-old-document")
    assert loaded.temperature == 0.3 and isinstance(by_slug, GeminiStrategy)
    assert "cache_refresh_threshold" not in (loaded.__pydantic_extra__ or {})
    assert "ignoring unknown saved field(s) 'cache_refresh_threshold'" in caplog.text
