"""Unknown constructor arguments of strategy blocks: rejected, with what to use instead.

Prefect blocks accept any extra keyword (`extra="allow"`), so code ported from batch-llm,
`GeminiStrategy(client=..., response_parser=...)`, would build and only fail at the first
call. Strategy blocks check their arguments with `check_arguments()` in a "before" model
validator: an unknown one is a `ValidationError` naming it and saying what to use instead.

Saved block documents are read more kindly: `Block.load()` validates them with
`model_validate()`, which strategy blocks run under `lenient_arguments()`, so a key the class
no longer has (a document saved by another version) is dropped with a warning rather than
making the block unloadable. Prefect's own keys (`block_type_slug`, ...) always pass.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel

logger = logging.getLogger("prefect_batch_llm")

#: Keys Prefect itself puts in block data (block documents, nested block references).
PREFECT_KEYS = frozenset(
    {"block_type_slug", "_block_document_id", "_block_document_name", "_is_anonymous"}
)
# A context variable, not pydantic's validation context: blocks have their own __init__, and
# pydantic validates them through it, which drops the context of model_validate().
_lenient: ContextVar[bool] = ContextVar("prefect_batch_llm_lenient_arguments", default=False)

#: What batch-llm (and common habit) called things that live elsewhere here, for Gemini.
GEMINI_HINTS: Mapping[str, str] = {
    "client": "pass credentials=GeminiCredentials(...) instead: the strategy takes its client "
    "from its credentials (one shared client per key and event loop)",
    "genai_client": "pass credentials=GeminiCredentials(...) instead",
    "api_key": "pass credentials=GeminiCredentials(api_key=...) instead",
    "base_url": "pass credentials=GeminiCredentials(base_url=...) instead",
    "response_parser": "subclass the strategy and override parse_response() instead",
    "parser": "subclass the strategy and override parse_response() instead",
    "config": "set the generation fields directly instead (temperature, max_output_tokens, "
    "response_mime_type, response_json_schema, safety_settings, thinking_budget)",
    "generation_config": "set the generation fields directly instead (temperature, "
    "max_output_tokens, response_mime_type, response_json_schema, safety_settings, "
    "thinking_budget)",
    "model_name": "use model",
    "system_prompt": "use system_instruction",
    "instructions": "use system_instruction",
    "timeout": "set the per-attempt timeout in ProcessorConfig(timeout_per_item=...); the "
    "HTTP timeout is GeminiCredentials(timeout_seconds=...)",
}

#: The same for context-cache arguments, on a strategy that has the cache fields.
GEMINI_CACHE_HINTS: Mapping[str, str] = {
    "cache_ttl": "use cache_ttl_seconds",
    "ttl": "use cache_ttl_seconds",
    "ttl_seconds": "use cache_ttl_seconds",
    "cached_content": "use cached_documents (texts) or cached_document_paths (files)",
    "cached_contents": "use cached_documents (texts) or cached_document_paths (files)",
    "contents": "use cached_documents (texts) or cached_document_paths (files)",
    "cache_refresh_threshold": "use cache_renewal_buffer_seconds (seconds before expiry, "
    "not a fraction of the TTL)",
    "cache_renewal_buffer": "use cache_renewal_buffer_seconds",
    "renewal_buffer_seconds": "use cache_renewal_buffer_seconds",
    "delete_on_cleanup": "use delete_cache_on_cleanup",
}

#: What batch-llm's PydanticAIStrategy and pydantic-ai's Agent take that lives elsewhere here.
PYDANTIC_AI_HINTS: Mapping[str, str] = {
    "agent": "wrap a live Agent with PydanticAIStrategy.from_agent(agent) instead (not "
    "savable), or describe it with model, instructions and output_type",
    "system_prompt": "use instructions",
    "result_type": "use output_type, an import path such as 'myapp.models:Invoice'",
    "client": "pass credentials=GeminiCredentials(...) instead",
    "api_key": "pass credentials=GeminiCredentials(api_key=...) instead",
    "provider": "pass credentials=GeminiCredentials(...) for google: models instead",
    "cache": "use context_cache=GeminiCachedStrategy(...)",
    "cached_content": "use context_cache=GeminiCachedStrategy(cached_documents=...)",
    "retries": "retries belong to the processor: ProcessorConfig(retry=RetryConfig(...))",
    "output_retries": "retries belong to the processor: ProcessorConfig(retry=RetryConfig(...))",
    "response_parser": "set output_type to a pydantic model instead",
}

#: Cache arguments given to a strategy without a cache.
GEMINI_UNCACHED_HINTS: Mapping[str, str] = {
    name: "context caching is GeminiCachedStrategy(cached_documents=..., cache_ttl_seconds=...)"
    for name in (*GEMINI_CACHE_HINTS, "cache_ttl_seconds", "cached_documents", "cache_tags")
}


@contextmanager
def lenient_arguments() -> Iterator[None]:
    """Validation inside this block drops unknown arguments with a warning (saved data)."""
    token = _lenient.set(True)
    try:
        yield
    finally:
        _lenient.reset(token)


def passed_options(**options: Any) -> dict[str, Any]:
    """The `model_validate()` options a caller set (Prefect's `Block.model_validate()` takes
    fewer than pydantic's: only those given are passed on)."""
    return {name: value for name, value in options.items() if value is not None}


def check_arguments(cls: type[BaseModel], values: Any, hints: Mapping[str, str]) -> Any:
    """`values`, or a `ValueError` naming each unknown key (under `lenient_arguments()`:
    `values` without them, and a warning).

    Args:
        cls: The block class being built.
        values: The raw input of a "before" model validator.
        hints: Unknown name -> what to do instead; other names get the closest field name
            and the list of valid fields.
    """
    if not isinstance(values, Mapping):
        return values
    fields = cls.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias} | PREFECT_KEYS
    unknown = [key for key in values if isinstance(key, str) and key not in known]
    if not unknown:
        return values
    if _lenient.get():
        logger.warning(
            "%s: ignoring unknown saved field(s) %s (saved by another version of the block?); "
            "save the block again to drop them.",
            cls.__name__,
            ", ".join(repr(key) for key in unknown),
        )
        return {key: value for key, value in values.items() if key not in unknown}
    problems = []
    for key in unknown:
        hint = hints.get(key)
        if hint is None:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "it is not a field"
        problems.append(f"{key!r}: {hint}")
    plural = "s" if len(unknown) > 1 else ""
    raise ValueError(
        f"{cls.__name__}() got unknown argument{plural} "
        + "; ".join(problems)
        + f". Valid fields: {', '.join(sorted(fields))}."
    )
