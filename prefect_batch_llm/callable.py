"""`CallableStrategy`: any async function as a strategy."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from prefect_batch_llm.strategy import ExecuteResult, LLMCallStrategy, RetryState

TOutput = TypeVar("TOutput")

#: `invoke(prompt, *, attempt, timeout, state)` -> (output, usage) or (output, usage, metadata)
Invoke = Callable[..., Awaitable[ExecuteResult]]
OnError = Callable[[BaseException, int, RetryState | None], Awaitable[None]]


class CallableStrategy(LLMCallStrategy[TOutput], Generic[TOutput]):
    """Wraps an existing async function (your own client call) as a strategy.

    `invoke(prompt, *, attempt, timeout, state)` makes one call and returns
    `(output, usage)` or `(output, usage, metadata)`; `usage` uses the
    [`TokenUsage`][prefect_batch_llm.TokenUsage] keys, and an unknown key or a negative count
    fails the item with a message naming it. Raise
    [`LLMCallError`][prefect_batch_llm.LLMCallError] subclasses to say how an error is retried
    (or pass an `error_classifier` to the processor).

    Example:
        ```python
        async def ask(prompt, *, attempt, timeout, state):
            reply = await my_client.complete(prompt, timeout=timeout)
            return reply.text, {"input_tokens": reply.prompt_tokens,
                                "output_tokens": reply.completion_tokens}

        strategy = CallableStrategy(ask)
        ```

    Args:
        invoke: The async function making one call.
        on_error: Optional `async fn(exception, attempt, state)` run after a failed attempt.
        name: A name for logs (default: the function's name).
    """

    def __init__(self, invoke: Invoke, *, on_error: OnError | None = None, name: str | None = None):
        if not _is_async(invoke):
            raise TypeError(
                f"CallableStrategy needs an async function; {invoke!r} is not one. Define it with "
                "`async def invoke(prompt, *, attempt, timeout, state)`."
            )
        if on_error is not None and not _is_async(on_error):
            raise TypeError("on_error must be an async function (exception, attempt, state).")
        self._invoke = invoke
        self._on_error = on_error
        self.name = name or getattr(invoke, "__name__", type(invoke).__name__)

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> ExecuteResult:
        return await self._invoke(prompt, attempt=attempt, timeout=timeout, state=state)

    async def on_error(
        self, exception: BaseException, attempt: int, state: RetryState | None = None
    ) -> None:
        if self._on_error is not None:
            await self._on_error(exception, attempt, state)

    def __repr__(self) -> str:
        return f"CallableStrategy({self.name})"


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )
