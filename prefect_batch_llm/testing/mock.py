"""`MockStrategy`: a configurable fake LLM for tests, demos and dry rehearsals of a pipeline."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, Field, HttpUrl, PrivateAttr

from prefect_batch_llm._links import docs_page
from prefect_batch_llm.errors import (
    CacheExpiredError,
    OutputValidationError,
    PermanentError,
    RateLimitError,
    TransientError,
)
from prefect_batch_llm.results import TokenUsage
from prefect_batch_llm.strategy import ExecuteResult, RetryState, StrategyBlock

FailureKind = Literal[
    "rate_limit", "transient", "timeout", "permanent", "validation", "cache_expired"
]


class MockFailure(BaseModel):
    """A failure a `MockStrategy` injects into the first calls of matching prompts."""

    kind: FailureKind = Field(description="What the failing call does.")
    times: int = Field(1, ge=1, description="How many consecutive calls of a prompt fail.")
    prompt_contains: str | None = Field(
        None, description="Only prompts containing this text fail (default: every prompt)."
    )
    retry_after: float | None = Field(
        None, ge=0, description="For rate_limit: the Retry-After the fake provider sends."
    )


class MockStrategy(StrategyBlock):
    """A fake LLM: answers after `latency`, bills fixed tokens, fails as scripted.

    Failures are a sequence per prompt: with `failures=[MockFailure(kind="rate_limit"),
    MockFailure(kind="transient", times=2)]` every prompt's 1st call is rate limited, its 2nd
    and 3rd fail transiently and its 4th succeeds. A `timeout` failure hangs past the attempt's
    timeout. Failed `validation` attempts bill tokens (the model answered); others bill none.

    Example:
        ```python
        from prefect_batch_llm.testing import MockStrategy

        MockStrategy(latency=0.05).save("mock-llm")
        strategy = MockStrategy.load("mock-llm")
        ```
    """

    _block_type_name = "Mock LLM Strategy"
    _description = "A fake LLM for tests and demos: fixed latency, tokens and scripted failures."
    _documentation_url = HttpUrl(docs_page("guides/testing/"))
    _code_example = """
```python
from prefect_batch_llm.testing import MockStrategy

mock_strategy = MockStrategy.load("BLOCK_NAME")
```
"""

    latency: float = Field(0.0, ge=0, description="Seconds each call takes.")
    latency_jitter: float = Field(0.0, ge=0, description="Extra random seconds, up to this.")
    response_template: str = Field(
        "mock answer to: {prompt}", description="Output; `{prompt}` is replaced by the prompt."
    )
    input_tokens: int = Field(10, ge=0, description="Input tokens billed per call.")
    output_tokens: int = Field(5, ge=0, description="Output tokens billed per call.")
    cached_input_tokens: int = Field(0, ge=0, description="Of the input tokens, how many cached.")
    failures: list[MockFailure] = Field(
        default_factory=list, description="Failures injected into each prompt's first calls."
    )
    prepare_delay: float = Field(0.0, ge=0, description="Seconds prepare() takes.")

    _calls_by_prompt: Counter[str] = PrivateAttr(default_factory=Counter)
    _prepare_count: int = PrivateAttr(default=0)
    _cleanup_count: int = PrivateAttr(default=0)
    _call_count: int = PrivateAttr(default=0)

    @property
    def prepare_count(self) -> int:
        """How many times `prepare()` ran on this instance."""
        return self._prepare_count

    @property
    def cleanup_count(self) -> int:
        """How many times `cleanup()` ran on this instance."""
        return self._cleanup_count

    @property
    def call_count(self) -> int:
        """How many times `execute()` was called on this instance."""
        return self._call_count

    async def prepare(self) -> None:
        self._prepare_count += 1
        if self.prepare_delay:
            await asyncio.sleep(self.prepare_delay)

    async def cleanup(self) -> None:
        self._cleanup_count += 1

    def _usage(self) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            total_tokens=self.input_tokens + self.output_tokens,
            cached_input_tokens=min(self.cached_input_tokens, self.input_tokens),
        )

    def _failure_for(self, prompt: str, call: int) -> MockFailure | None:
        position = 0
        for failure in self.failures:
            if failure.prompt_contains is not None and failure.prompt_contains not in prompt:
                continue
            position += failure.times
            if call <= position:
                return failure
        return None

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> ExecuteResult:
        text = prompt if isinstance(prompt, str) else repr(prompt)
        self._call_count += 1
        self._calls_by_prompt[text] += 1
        delay = self.latency + (
            random.uniform(0, self.latency_jitter) if self.latency_jitter else 0
        )
        if delay:
            await asyncio.sleep(delay)
        failure = self._failure_for(text, self._calls_by_prompt[text])
        if failure is not None:
            self._raise(failure, timeout)
            await asyncio.sleep(timeout * 2 + 1)  # "timeout": hang past the attempt's limit
        return self.response_template.format(prompt=text), self._usage(), {"mock": True}

    def _raise(self, failure: MockFailure, timeout: float) -> None:
        if failure.kind == "rate_limit":
            raise RateLimitError("mock 429 RESOURCE_EXHAUSTED", retry_after=failure.retry_after)
        if failure.kind == "transient":
            raise TransientError("mock 503 UNAVAILABLE")
        if failure.kind == "permanent":
            raise PermanentError("mock 400 INVALID_ARGUMENT")
        if failure.kind == "validation":
            raise OutputValidationError("mock output failed validation", token_usage=self._usage())
        if failure.kind == "cache_expired":
            raise CacheExpiredError("mock 400: Cache content mock is expired.")
