"""The processor's API contract: ordering rules, validation, flows, sync use."""

from __future__ import annotations

import pydantic
import pytest
from helpers import CountingStrategy
from prefect import flow
from prefect.context import FlowRunContext

from prefect_batch_llm import (
    LLMCallStrategy,
    LLMWorkItem,
    ParallelBatchProcessor,
    ProcessorConfig,
    RetryConfig,
    __version__,
)


async def test_add_work_after_process_all_raises():
    strategy = CountingStrategy()
    async with ParallelBatchProcessor() as processor:
        await processor.add_work(LLMWorkItem(item_id="1", strategy=strategy, prompt="x"))
        await processor.process_all()
        with pytest.raises(RuntimeError, match="create a new ParallelBatchProcessor"):
            await processor.add_work(LLMWorkItem(item_id="2", strategy=strategy, prompt="x"))
        with pytest.raises(RuntimeError, match="already called"):
            await processor.process_all()


async def test_duplicate_item_id_is_rejected_and_the_rest_still_runs():
    strategy = CountingStrategy()
    async with ParallelBatchProcessor() as processor:
        await processor.add_work(LLMWorkItem(item_id="same", strategy=strategy, prompt="x"))
        with pytest.raises(ValueError, match=r"Duplicate item_id 'same'.*another id"):
            await processor.add_work(LLMWorkItem(item_id="same", strategy=strategy, prompt="y"))
        await processor.add_work(LLMWorkItem(item_id="other", strategy=strategy, prompt="z"))
        result = await processor.process_all()
    assert [r.item_id for r in result.results] == ["same", "other"] and result.succeeded == 2


def test_work_item_validation_messages():
    strategy = CountingStrategy()
    with pytest.raises(ValueError, match="item_id must be a non-empty string"):
        LLMWorkItem(item_id="", strategy=strategy, prompt="x")
    with pytest.raises(ValueError, match="item_id must be a non-empty string"):
        LLMWorkItem(item_id=3, strategy=strategy, prompt="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strategy must not be None for item 'a'"):
        LLMWorkItem(item_id="a", strategy=None, prompt="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not an LLMCallStrategy"):
        LLMWorkItem(item_id="a", strategy=object(), prompt="x")  # type: ignore[arg-type]


def test_config_validation_messages():
    with pytest.raises(pydantic.ValidationError, match="max_workers"):
        ProcessorConfig(max_workers=0)
    with pytest.raises(pydantic.ValidationError, match=r"total_timeout_per_item .* is shorter"):
        ProcessorConfig(timeout_per_item=60, total_timeout_per_item=30)
    with pytest.raises(pydantic.ValidationError, match=r"max_wait .* is smaller than initial_wait"):
        RetryConfig(initial_wait=10, max_wait=1)
    with pytest.raises(pydantic.ValidationError, match="max_attempts"):
        RetryConfig(max_attempts=0)
    with pytest.raises(pydantic.ValidationError, match="extra"):
        ProcessorConfig(max_worker=3)  # type: ignore[call-arg]


async def test_outside_a_flow_process_all_opens_its_own_flow_run():
    seen: list[str | None] = []

    class Observe(LLMCallStrategy[str]):
        async def execute(self, prompt, attempt, timeout, state=None):
            context = FlowRunContext.get()
            seen.append(context.flow.name if context and context.flow else None)
            return "x", {}

    assert FlowRunContext.get() is None
    async with ParallelBatchProcessor() as processor:
        await processor.add_work(LLMWorkItem(item_id="1", strategy=Observe(), prompt="x"))
        result = await processor.process_all()
    assert result.succeeded == 1 and seen == ["llm-batch"]


async def test_inside_a_flow_items_run_in_that_flow_run():
    seen: list[object] = []

    class Observe(LLMCallStrategy[str]):
        async def execute(self, prompt, attempt, timeout, state=None):
            seen.append(FlowRunContext.get().flow_run.id)  # type: ignore[union-attr]
            return "x", {}

    @flow(name="my-pipeline")
    async def pipeline():
        async with ParallelBatchProcessor() as processor:
            for i in range(3):
                await processor.add_work(
                    LLMWorkItem(item_id=str(i), strategy=Observe(), prompt="x")
                )
            await processor.process_all()
        return FlowRunContext.get().flow_run.id  # type: ignore[union-attr]

    outer = await pipeline()
    assert seen == [outer, outer, outer]


def test_sync_flow_uses_the_sync_entry_point():
    strategy = CountingStrategy(latency=0.01)

    @flow
    def sync_batch() -> tuple[int, int]:
        with ParallelBatchProcessor(config=ProcessorConfig(max_workers=4)) as processor:
            for i in range(12):
                processor.add_work_nowait(
                    LLMWorkItem(item_id=str(i), strategy=strategy, prompt="x")
                )
            result = processor.process_all_sync()
            assert strategy.cleanup_count == 0
        return result.succeeded, result.total_input_tokens

    assert sync_batch() == (12, 120)
    assert (strategy.prepare_count, strategy.cleanup_count) == (1, 1)


def test_sync_script_without_a_flow():
    strategy = CountingStrategy()
    with ParallelBatchProcessor() as processor:
        processor.add_work_nowait(LLMWorkItem(item_id="a", strategy=strategy, prompt="x"))
        result = processor.process_all_sync()
    assert result.succeeded == 1 and strategy.cleanup_count == 1


async def test_v01_strategies_without_a_state_parameter_still_run():
    class Legacy(LLMCallStrategy[str]):
        async def execute(self, prompt, attempt, timeout):  # type: ignore[override]
            return f"Response: {prompt}", {"input_tokens": 10}

    async with ParallelBatchProcessor() as processor:
        await processor.add_work(LLMWorkItem(item_id="1", strategy=Legacy(), prompt="Test"))
        result = await processor.process_all()
    assert result.results[0].output == "Response: Test"


def test_version_matches_installed_metadata():
    from importlib.metadata import version

    assert __version__ == version("prefect-batch-llm")
