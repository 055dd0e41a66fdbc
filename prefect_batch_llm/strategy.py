"""The strategy contract: how one LLM call is made, plus its per-item retry state.

A strategy is shared by many work items. The processor calls `prepare()` once per strategy
instance before its first item, `execute()` once per attempt, `on_error()` after each failed
attempt, and `cleanup()` once when the processor's context manager exits. The cost preview
calls `prepare_counting()`, then `count_tokens()` per counted prompt, then `cleanup()`.
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Self, TypeVar

from prefect.blocks.core import Block
from pydantic import GetJsonSchemaHandler, HttpUrl, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from prefect_batch_llm._links import LOGO_URL, docs_page
from prefect_batch_llm._unknown_args import check_arguments, lenient_arguments, passed_options
from prefect_batch_llm.errors import ErrorClassifier
from prefect_batch_llm.results import TokenUsage

if TYPE_CHECKING:
    from prefect_batch_llm.batch_mode import BatchJobs

TOutput = TypeVar("TOutput")

#: The `RetryState` key under which `execute()` records the price path of the call it makes
#: (`standard`, `flex`; calls that do not record one are `standard`). The processor prices
#: each call's tokens at its path's prices.
PRICE_PATH = "price_path"

# What `execute()` returns: (output, usage) or (output, usage, metadata).
ExecuteResult = tuple[Any, TokenUsage] | tuple[Any, TokenUsage, dict[str, Any]]


class RetryState:
    """Per-item scratch space that survives across that item's attempts.

    One instance per work item, passed to `execute()` and `on_error()` on every attempt and
    never shared between items, so a strategy can carry feedback from a failed attempt to the
    next one (e.g. the validation error, or "escalate to a stronger model").
    """

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under `key`, or `default`."""
        return self._data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        """Store `value` under `key`."""
        self._data[key] = value

    def delete(self, key: str, raise_if_missing: bool = False) -> None:
        """Remove `key`; a missing key is ignored unless `raise_if_missing`."""
        if raise_if_missing and key not in self._data:
            raise KeyError(f"RetryState has no key {key!r}.")
        self._data.pop(key, None)

    def clear(self) -> None:
        """Remove every key."""
        self._data.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"RetryState(keys={sorted(self._data)})"


class LLMCallStrategy(ABC, Generic[TOutput]):
    """Base class of every strategy: subclass it and implement `execute()`.

    A plain subclass may have its own `__init__` (it lives only in memory). To save a strategy
    as a Prefect block, subclass [`StrategyBlock`][prefect_batch_llm.StrategyBlock] instead.

    Example:
        ```python
        class Summarize(LLMCallStrategy[str]):
            async def execute(self, prompt, attempt, timeout, state=None):
                return f"summary of {prompt}", {"input_tokens": 10, "output_tokens": 5}
        ```
    """

    #: Classifier used for this strategy's errors unless the processor is given one.
    error_classifier: ClassVar[ErrorClassifier | None] = None

    async def prepare(self) -> None:
        """Create shared resources (clients, caches). Called once per instance per batch."""

    @abstractmethod
    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> ExecuteResult:
        """Make one LLM call.

        Args:
            prompt: The work item's prompt.
            attempt: 1 for the first attempt; rate-limit and cache-expired retries repeat it.
            timeout: Seconds this attempt has (the processor enforces it too).
            state: The item's [`RetryState`][prefect_batch_llm.RetryState].

        Returns:
            `(output, token_usage)` or `(output, token_usage, metadata)`.
        """

    async def on_error(
        self, exception: BaseException, attempt: int, state: RetryState | None = None
    ) -> None:
        """Called after each failed attempt, before the retry decision takes effect."""

    async def cleanup(self) -> None:
        """Release what `prepare()` made. Called once, when the processor's context exits."""

    async def prepare_counting(self) -> None:
        """Make what `count_tokens()` needs (a client), billing nothing: no context cache is
        created. The cost preview calls it once before counting and `cleanup()` once after."""

    async def count_tokens(self, prompt: Any) -> TokenUsage | None:
        """The input tokens one `execute()` of `prompt` would send, counted without billing.

        Returns `input_tokens` (everything the call reads, cached tokens included, as in a
        call's usage) and `cached_input_tokens` (those read from a context cache, billed at
        the cached rate). The default returns None: this strategy cannot count, and the cost
        preview ([`preview_cost`][prefect_batch_llm.preview_cost]) refuses it. Gemini
        strategies count with Gemini's `countTokens` API, which is free.
        """
        return None

    async def dry_run(self, prompt: Any) -> ExecuteResult:
        """What `execute()` returns under `ProcessorConfig(dry_run=True)`: no call, no tokens."""
        text = prompt if isinstance(prompt, str) else repr(prompt)
        return f"[dry-run] {text[:80]}", TokenUsage(input_tokens=0, output_tokens=0)

    def batch_jobs(self) -> BatchJobs | None:
        """This strategy's provider Batch Mode, when its items run as batch jobs.

        The default, None, runs every attempt online through `execute()`. Gemini strategies
        return their Batch Mode when `execution="batch"`.
        """
        return None

    def rate_limit_scope(self) -> str:
        """Strategies returning the same scope share one rate-limit cooldown and pacing.

        The default puts every strategy of a processor in one scope; provider strategies
        narrow it to their endpoint and model.
        """
        return "default"

    def cache_fingerprint(self) -> str:
        """Identifies this strategy's configuration in result-cache keys (`cache_results`).

        A changed configuration gives another fingerprint, so its items are recomputed. The
        default uses the class and the public attributes; blocks use their saved fields, with
        secrets masked. It is taken once per batch, before the strategy's first item runs.
        Override it if your attributes do not describe the calls.
        """
        public = {k: v for k, v in sorted(vars(self).items()) if not k.startswith("_")}
        return f"{type(self).__module__}.{type(self).__qualname__}:{public!r}"


class StrategyBlock(Block, LLMCallStrategy[Any], ABC):
    """Base class of savable strategies: a Prefect block that is also a strategy.

    Configuration goes in pydantic fields (saved with `.save(name)`, editable in the UI,
    loaded with `.load(name)`); runtime state (clients, caches, locks) goes in `PrivateAttr`s,
    which are never saved. Use `block_initialization()` instead of `__init__`.
    """

    _block_type_name = "LLM Strategy"
    _logo_url = HttpUrl(LOGO_URL)
    _documentation_url = HttpUrl(docs_page("concepts/strategies/"))

    #: What to use instead of arguments the block does not have (ported code's names).
    _argument_hints: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_arguments(cls, values: Any) -> Any:
        return check_arguments(cls, values, cls._argument_hints)

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """Fields with a plain default are `required` in the block's JSON schema.

        A flow parameter typed with a block is picked in the run form, which sends
        `{"$ref": {"block_document_id": ...}}`; the server accepts it when exactly one of
        "the block's fields" and "a reference" matches (`oneOf`). A block whose fields all have
        defaults matches any object, the reference included, and the run is refused ("not
        valid under any of the given schemas"). A saved block document always holds every
        field and the UI's block form fills in defaults, so requiring them costs nothing.
        """
        json_schema = handler.resolve_ref_schema(handler(core_schema))
        defaulted = [
            name
            for name, field in json_schema.get("properties", {}).items()
            if isinstance(field.get("default"), str | int | float | bool)
        ]
        json_schema["required"] = sorted({*json_schema.get("required", []), *defaulted})
        return json_schema

    @classmethod
    def model_validate(
        cls,
        obj: Any,
        *,
        strict: bool | None = None,
        extra: Literal["allow", "ignore", "forbid"] | None = None,
        from_attributes: bool | None = None,
        context: Any | None = None,
        by_alias: bool | None = None,
        by_name: bool | None = None,
    ) -> Self:
        """Validate saved data, as `Block.load()` does: a key this class does not have (a
        document saved by another version) is dropped with a warning, not refused."""
        with lenient_arguments():
            return super().model_validate(
                obj,
                strict=strict,
                from_attributes=from_attributes,
                context=context,
                **passed_options(extra=extra, by_alias=by_alias, by_name=by_name),
            )

    #: Fields that do not change an answer (lifetimes, renewal, clean-up): not fingerprinted.
    fingerprint_exclude: ClassVar[frozenset[str]] = frozenset()

    def cache_fingerprint(self) -> str:
        """Everything that determines an answer, and nothing that does not.

        The saved fields, except `fingerprint_exclude` and nested blocks that are not
        strategies (credentials: key, endpoint, timeouts, pool size never change an answer);
        a nested strategy contributes its own fingerprint; `fingerprint_extras()` adds what
        the fields only point at (e.g. the content of cached document files).
        """
        data: dict[str, Any] = {}
        for name in type(self).model_fields:
            if name in self.fingerprint_exclude:
                continue
            value = getattr(self, name)
            if isinstance(value, StrategyBlock):
                data[name] = value.cache_fingerprint()
            elif not isinstance(value, Block):
                data[name] = self.model_dump(mode="json", include={name}).get(name)
        data.update(self.fingerprint_extras())
        canonical = json.dumps(data, sort_keys=True, default=repr)
        return f"{type(self).__module__}.{type(self).__qualname__}:{canonical}"

    def fingerprint_extras(self) -> dict[str, Any]:
        """What the fields point at and that changes answers (override to add it)."""
        return {}


def accepts_state(strategy: LLMCallStrategy[Any]) -> bool:
    """Whether `strategy.execute` takes a `state` argument (batch-llm v0.1 strategies did not)."""
    try:
        parameters = inspect.signature(strategy.execute).parameters
    except (TypeError, ValueError):
        return True
    return "state" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def unpack_execute_result(result: Any, *, source: str) -> tuple[Any, Any, dict[str, Any]]:
    """Split `execute()`'s return value into (output, usage, metadata) with a clear error."""
    if isinstance(result, tuple) and len(result) == 2:
        return result[0], result[1], {}
    if isinstance(result, tuple) and len(result) == 3:
        metadata = result[2] if result[2] is not None else {}
        if not isinstance(metadata, dict):
            raise TypeError(
                f"{source} returned metadata of type {type(metadata).__name__}; use a dict."
            )
        return result[0], result[1], metadata
    raise TypeError(
        f"{source} returned {type(result).__name__}; return (output, token_usage) or "
        "(output, token_usage, metadata)."
    )


__all__ = [
    "PRICE_PATH",
    "ExecuteResult",
    "LLMCallStrategy",
    "RetryState",
    "StrategyBlock",
    "accepts_state",
    "unpack_execute_result",
]
