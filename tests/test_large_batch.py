"""Large-batch mode: chunk tasks, the same retry policy, per-item results."""

from __future__ import annotations

import asyncio

import pydantic
import pytest
from helpers import CountingStrategy, ScriptedStrategy
from prefect import flow, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.context import get_run_context

from prefect_batch_llm import (
    LLMWorkItem,
    OutputValidationError,
    ParallelBatchProcessor,
    PermanentError,
    ProcessorConfig,
    RateLimitError,
    RetryConfig,
    TransientError,
)

FAST = RetryConfig(max_attempts=3, initial_wait=0.01, max_wait=0.05)


def chunked(**overrides) -> ProcessorConfig:
    return ProcessorConfig(**({"items_per_task": 25, "max_workers": 10, "retry": FAST} | overrides))


async def test_chunks_keep_lifecycle_and_one_result_per_item():
    strategy = CountingStrategy(prepare_delay=0.1, latency=0.01)

    @flow
    async def big() -> str:
        async with ParallelBatchProcessor(config=chunked()) as processor:
            for i in range(100):
                await processor.add_work(
                    LLMWorkItem(item_id=f"i{i}", strategy=strategy, prompt=f"p{i}")
                )
            result = await processor.process_all()
            assert strategy.cleanup_count == 0
        assert [r.item_id for r in result.results] == [f"i{i}" for i in range(100)]
        assert result.succeeded == 100 and result.total_input_tokens == 1000
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]

    flow_run_id = await big()
    assert (strategy.prepare_count, strategy.execute_count, strategy.cleanup_count) == (1, 100, 1)
    async with get_client() as client:
        for _ in range(50):
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            if len(runs) >= 4:
                break
            await asyncio.sleep(0.2)
    assert len(runs) == 4, "100 items in chunks of 25: four task runs"
    assert all(r.name.endswith("(25 items)") for r in runs)


async def test_chunk_items_follow_the_same_retry_policy():
    strategy = ScriptedStrategy(
        {
            "transient": [TransientError("503"), TransientError("503")],
            "permanent": [PermanentError("400")],
            "invalid": [OutputValidationError("bad", token_usage={"input_tokens": 7})],
            "limited": [RateLimitError("429", retry_after=1.0)],
        }
    )
    prompts = ["transient", "permanent", "invalid", "limited", *[f"ok{i}" for i in range(20)]]
    async with ParallelBatchProcessor(
        config=chunked(retry=RetryConfig(max_attempts=3, initial_wait=0.01, max_wait=0.05))
    ) as processor:
        for prompt in prompts:
            await processor.add_work(LLMWorkItem(item_id=prompt, strategy=strategy, prompt=prompt))
        result = await processor.process_all()
        stats = await processor.get_stats()
    by_id = {r.item_id: r for r in result.results}
    assert by_id["transient"].success and by_id["transient"].attempts == 3
    assert not by_id["permanent"].success and by_id["permanent"].attempts == 1
    assert by_id["invalid"].success and by_id["invalid"].token_usage["input_tokens"] == 107
    limited = strategy.calls_for("limited")
    assert by_id["limited"].success and limited[1][1] - limited[0][1] >= 1.0
    assert stats["rate_limit_count"] == 1 and result.succeeded == len(prompts) - 1


async def test_chunk_mode_bounds_calls_in_flight_by_max_workers():
    in_flight = peak = 0

    class Gauge(CountingStrategy):
        async def execute(self, prompt, attempt, timeout, state=None):
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.02)
            in_flight -= 1
            return "x", {"input_tokens": 1}

    async with ParallelBatchProcessor(config=chunked(items_per_task=40, max_workers=7)) as p:
        await p.process_stream(
            LLMWorkItem(item_id=str(i), strategy=Gauge(), prompt="x") for i in range(120)
        )
    assert peak == 7


def test_cache_results_needs_one_task_per_item():
    with pytest.raises(pydantic.ValidationError, match="cannot be combined with items_per_task"):
        ProcessorConfig(items_per_task=10, cache_results=True)


async def test_a_crashed_chunk_task_is_retried_without_rerunning_finished_items(monkeypatch):
    from prefect_batch_llm._engine.attempts import ItemRun

    strategy = ScriptedStrategy(latency=0.01)
    crashed: list[str] = []
    run_to_completion = ItemRun.run_to_completion

    async def crash_once(self: ItemRun):
        result = await run_to_completion(self)
        if not crashed:  # the engine itself fails once, after the first item finished
            crashed.append(self.item.item_id)
            raise RuntimeError("engine failure")
        return result

    monkeypatch.setattr(ItemRun, "run_to_completion", crash_once)
    config = chunked(items_per_task=10, max_workers=4)
    async with ParallelBatchProcessor(config=config) as processor:
        result = await processor.process_stream(
            LLMWorkItem(item_id=f"i{i}", strategy=strategy, prompt=f"i{i}") for i in range(10)
        )
    assert result.total_items == 10 and result.succeeded == 10
    assert sorted(r.item_id for r in result.results) == sorted(f"i{i}" for i in range(10))
    assert len(strategy.calls_for(crashed[0])) == 2, "the crashed item ran again"
    # Only the calls in flight when the chunk crashed (at most max_workers) run again.
    assert sum(len(strategy.calls_for(f"i{i}")) for i in range(10)) <= 10 + 4
