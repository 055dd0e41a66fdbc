"""Retries follow the classifier: per-category budgets, waits, cooldowns, Prefect retry states."""

from __future__ import annotations

import asyncio
from typing import Any

from helpers import ScriptedStrategy
from prefect import flow, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.context import get_run_context

from prefect_batch_llm import (
    CacheExpiredError,
    ErrorInfo,
    FrameworkTimeoutError,
    LLMWorkItem,
    OutputValidationError,
    ParallelBatchProcessor,
    PermanentError,
    ProcessorConfig,
    RateLimitError,
    RetryConfig,
    RetryState,
    TransientError,
)
from prefect_batch_llm.testing import MockFailure, MockStrategy

FAST = RetryConfig(max_attempts=3, initial_wait=0.01, max_wait=0.05)


async def run_batch(strategy: Any, prompts: list[str], **config: Any):
    config.setdefault("retry", FAST)
    async with ParallelBatchProcessor(config=ProcessorConfig(**config)) as processor:
        for prompt in prompts:
            await processor.add_work(LLMWorkItem(item_id=prompt, strategy=strategy, prompt=prompt))
        result = await processor.process_all()
        stats = await processor.get_stats()
    return result, stats


async def test_permanent_error_fails_after_one_call():
    strategy = ScriptedStrategy({"p": [PermanentError("400 bad request")]})
    result, stats = await run_batch(strategy, ["p"])
    [item] = result.results
    assert not item.success and item.error_category == "permanent"
    assert item.attempts == 1 and len(strategy.calls) == 1
    assert item.error == "PermanentError: 400 bad request"
    assert stats["retries"] == 0


async def test_programming_error_is_not_retried():
    strategy = ScriptedStrategy({"p": [KeyError("missing")]})
    result, _ = await run_batch(strategy, ["p"])
    assert len(strategy.calls) == 1 and result.results[0].error_category == "permanent"


async def test_transient_errors_retry_up_to_max_attempts_then_fail():
    strategy = ScriptedStrategy({"p": [TransientError("503")] * 5})
    result, stats = await run_batch(strategy, ["p"])
    [item] = result.results
    assert not item.success and item.error_category == "transient"
    assert [c[2] for c in strategy.calls] == [1, 2, 3], "attempt numbers passed to execute"
    assert item.attempts == 3 and item.retries_by_category == {"transient": 2}
    assert stats["retries"] == 2 and stats["error_counts"] == {"transient": 3}


async def test_transient_then_success_reports_attempts():
    strategy = ScriptedStrategy({"p": [ConnectionResetError("reset"), TransientError("502")]})
    result, _ = await run_batch(strategy, ["p"])
    [item] = result.results
    assert item.success and item.output == "ok: p" and item.attempts == 3


async def test_validation_errors_retry_at_once_without_backoff():
    strategy = ScriptedStrategy({"p": [OutputValidationError("bad json")] * 2})
    slow_backoff = RetryConfig(max_attempts=3, initial_wait=30, max_wait=60, jitter=False)
    result, _ = await run_batch(strategy, ["p"], retry=slow_backoff)
    assert result.results[0].success
    starts = [c[1] for c in strategy.calls]
    assert starts[-1] - starts[0] < 10, "a 30 s backoff would have been waited"


async def test_rate_limit_waits_retry_after_and_does_not_consume_attempts():
    strategy = ScriptedStrategy({"p": [RateLimitError("429", retry_after=1.0)]})
    result, stats = await run_batch(strategy, ["p"], retry=RetryConfig(max_attempts=1))
    [item] = result.results
    assert item.success, "with max_attempts=1 only a separate rate-limit budget allows a retry"
    first, second = strategy.calls_for("p")
    assert second[1] - first[1] >= 1.0
    assert second[2] == first[2] == 1, "the attempt number is not consumed by a rate limit"
    assert stats["rate_limit_count"] == 1 and item.retries_by_category == {"rate_limit": 1}


async def test_one_rate_limit_pauses_every_worker_of_the_scope():
    # "hot" hits a 429 with Retry-After=1 s; the other workers keep starting calls every
    # 50 ms until then. No call may start during the cooldown window.
    strategy = ScriptedStrategy({"hot": [RateLimitError("429", retry_after=1.0)]}, latency=0.05)
    prompts = ["hot"] + [f"other-{i}" for i in range(60)]
    result, _ = await run_batch(strategy, prompts, max_workers=4)
    assert result.succeeded == 61
    limited_at = strategy.calls_for("hot")[0][1] + 0.05  # the 429 arrives after the latency
    during = [c for c in strategy.calls if limited_at + 0.02 < c[1] < limited_at + 0.95]
    assert during == [], f"calls started during the cooldown: {during[:3]}"
    assert strategy.calls_for("hot")[1][1] >= limited_at + 0.95


async def test_rate_limit_budget_is_separate_and_bounded():
    strategy = ScriptedStrategy({"p": [RateLimitError("429", retry_after=0.01)] * 10})
    result, _ = await run_batch(
        strategy,
        ["p"],
        retry=RetryConfig(
            max_attempts=3, initial_wait=0.01, max_wait=0.01, max_rate_limit_retries=2
        ),
    )
    [item] = result.results
    assert not item.success and item.error_category == "rate_limit"
    assert len(strategy.calls) == 3, "1 call + 2 rate-limit retries"


async def test_attempt_timeout_raises_framework_timeout_and_retries():
    strategy = MockStrategy(failures=[MockFailure(kind="timeout", times=1)])
    result, _ = await run_batch(strategy, ["p"], timeout_per_item=0.3)
    [item] = result.results
    assert item.success and item.attempts == 2
    assert item.retries_by_category == {"timeout": 1}

    always = MockStrategy(failures=[MockFailure(kind="timeout", times=5)])
    result, _ = await run_batch(always, ["p"], timeout_per_item=0.2)
    [item] = result.results
    assert not item.success and item.error_category == "timeout"
    assert item.error is not None and item.error.startswith("FrameworkTimeoutError")
    assert "timeout_per_item" in item.error


async def test_framework_timeout_error_carries_item_elapsed_and_limit():
    seen: list[BaseException] = []

    class Slow(ScriptedStrategy):
        async def execute(self, prompt, attempt, timeout, state=None):
            await asyncio.sleep(5)

        async def on_error(self, exception, attempt, state=None):
            seen.append(exception)

    await run_batch(Slow(), ["slow-item"], timeout_per_item=0.2, retry=RetryConfig(max_attempts=1))
    [error] = seen
    assert isinstance(error, FrameworkTimeoutError)
    assert error.item_id == "slow-item" and error.timeout_limit == 0.2 and error.elapsed >= 0.2


async def test_total_timeout_per_item_stops_retrying():
    strategy = ScriptedStrategy({"p": [TransientError("503")] * 10})
    result, _ = await run_batch(
        strategy,
        ["p"],
        timeout_per_item=0.5,
        total_timeout_per_item=1.0,
        retry=RetryConfig(max_attempts=10, initial_wait=0.4, max_wait=0.4, jitter=False),
    )
    assert not result.results[0].success
    assert len(strategy.calls) <= 3, "waits of 0.4 s fit at most three calls into 1 s"


async def test_cache_expired_retries_without_consuming_an_attempt():
    strategy = ScriptedStrategy({"p": [CacheExpiredError("Cache content 42 is expired.")]})
    result, _ = await run_batch(strategy, ["p"], retry=RetryConfig(max_attempts=1))
    [item] = result.results
    assert item.success and item.retries_by_category == {"cache_expired": 1}
    assert [c[2] for c in strategy.calls] == [1, 1]


async def test_batch_timeout_gives_every_item_exactly_one_result():
    strategy = MockStrategy(latency=0.5)
    prompts = [f"p{i}" for i in range(10)]
    result, _ = await run_batch(strategy, prompts, max_workers=2, batch_timeout=0.8)
    assert [r.item_id for r in result.results] == prompts
    finished = [r for r in result.results if r.success]
    timed_out = [r for r in result.results if r.error_category == "batch_timeout"]
    assert len(finished) + len(timed_out) == 10
    assert 1 <= len(finished) <= 4 and "batch_timeout" in (timed_out[0].error or "")


async def test_retry_state_is_per_item_and_carries_feedback_between_attempts():
    class Feedback(ScriptedStrategy):
        async def execute(self, prompt, attempt, timeout, state: RetryState | None = None):
            assert state is not None
            history = state.get("feedback", [])
            self.calls.append((prompt, 0.0, attempt))
            await asyncio.sleep(0.01)  # interleave items
            if attempt == 1:
                raise OutputValidationError(f"bad answer for {prompt}")
            return history, {"input_tokens": 1}

        async def on_error(self, exception, attempt, state: RetryState | None = None):
            assert state is not None
            state.set("feedback", [*state.get("feedback", []), str(exception)])

    prompts = [f"item-{i}" for i in range(10)]
    result, _ = await run_batch(Feedback(), prompts, max_workers=10)
    for item in result.results:
        assert item.output == [f"bad answer for {item.item_id}"], "state leaked between items"


async def test_custom_classifier_on_processor_overrides_the_default():
    class EverythingPermanent:
        def classify(self, exception: BaseException) -> ErrorInfo:
            return ErrorInfo(is_retryable=False, error_category="custom")

    strategy = ScriptedStrategy({"p": [TransientError("503")]})
    async with ParallelBatchProcessor(error_classifier=EverythingPermanent()) as processor:
        await processor.add_work(LLMWorkItem(item_id="p", strategy=strategy, prompt="p"))
        result = await processor.process_all()
    assert result.results[0].error_category == "custom" and len(strategy.calls) == 1


async def test_each_item_is_a_task_run_named_by_id_with_retries_visible_in_prefect():
    strategy = ScriptedStrategy({"flaky": [TransientError("503"), TransientError("503")]})

    @flow
    async def batch() -> str:
        async with ParallelBatchProcessor(config=ProcessorConfig(retry=FAST)) as processor:
            for item_id in ["steady", "flaky"]:
                await processor.add_work(
                    LLMWorkItem(item_id=item_id, strategy=strategy, prompt=item_id)
                )
            await processor.process_all()
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]

    flow_run_id = await batch()
    async with get_client() as client:
        for _ in range(50):  # task-run events reach the server asynchronously
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            by_name = {r.name: r for r in runs}
            if (
                {"steady", "flaky"} <= set(by_name)
                and all(r.state and r.state.is_final() for r in by_name.values())
                and by_name["flaky"].run_count == 3
            ):
                break
            await asyncio.sleep(0.2)
    assert by_name["steady"].run_count == 1
    assert by_name["flaky"].run_count == 3, "two Prefect retries of the flaky item"
    assert by_name["flaky"].state is not None and by_name["flaky"].state.is_completed()
