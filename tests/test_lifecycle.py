"""Strategy lifecycle: prepare once per instance, cleanup once per instance at exit."""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import CountingStrategy
from prefect import flow

from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig, RetryConfig


async def test_shared_strategy_prepared_once_by_20_workers_over_100_items():
    strategy = CountingStrategy(prepare_delay=0.1)

    @flow
    async def batch():
        async with ParallelBatchProcessor[str, str, None](
            config=ProcessorConfig(max_workers=20)
        ) as processor:
            for i in range(100):
                await processor.add_work(
                    LLMWorkItem(item_id=f"item_{i}", strategy=strategy, prompt=f"Test {i}")
                )
            result = await processor.process_all()
            cleanup_before_exit = strategy.cleanup_count
        return result, cleanup_before_exit

    result, cleanup_before_exit = await batch()
    assert result.total_items == 100 and result.succeeded == 100
    assert strategy.prepare_count == 1
    assert strategy.execute_count == 100
    assert cleanup_before_exit == 0, "cleanup must not run before the context manager exits"
    assert strategy.cleanup_count == 1


async def test_each_distinct_instance_prepared_and_cleaned_once():
    strategies = {name: CountingStrategy(name) for name in "ABC"}
    async with ParallelBatchProcessor(config=ProcessorConfig(max_workers=5)) as processor:
        for name, strategy in strategies.items():
            for i in range(10):
                await processor.add_work(
                    LLMWorkItem(item_id=f"{name}_{i}", strategy=strategy, prompt="Test")
                )
        result = await processor.process_all()
    assert result.succeeded == 30
    assert {n: s.prepare_count for n, s in strategies.items()} == {"A": 1, "B": 1, "C": 1}
    assert {n: s.cleanup_count for n, s in strategies.items()} == {"A": 1, "B": 1, "C": 1}
    assert [r.output for r in result.results[:2]] == ["A: Test", "A: Test"]


async def test_failing_prepare_fails_only_that_strategys_items():
    class BrokenPrepare(CountingStrategy):
        async def prepare(self) -> None:
            self.prepare_count += 1
            raise ConnectionError("cache service unreachable")

    broken, healthy = BrokenPrepare("broken"), CountingStrategy("healthy")
    fast = RetryConfig(max_attempts=3, initial_wait=0.01, max_wait=0.02)
    config = ProcessorConfig(max_workers=4, retry=fast)
    async with ParallelBatchProcessor(config=config) as processor:
        for i in range(6):
            await processor.add_work(LLMWorkItem(item_id=f"b{i}", strategy=broken, prompt="x"))
            await processor.add_work(LLMWorkItem(item_id=f"h{i}", strategy=healthy, prompt="x"))
        result = await processor.process_all()

    by_id = {r.item_id: r for r in result.results}
    # A transient prepare error is retried under the retry policy, once for all the items.
    assert broken.prepare_count == 3, "prepare is retried max_attempts times, not per item"
    assert broken.execute_count == 0
    for i in range(6):
        failed = by_id[f"b{i}"]
        assert not failed.success and failed.error_category == "prepare_failed"
        assert "cache service unreachable" in (failed.error or "")
        assert by_id[f"h{i}"].success
    # cleanup runs for every strategy whose prepare() started, so partial resources are freed
    assert (broken.cleanup_count, healthy.cleanup_count) == (1, 1)


async def test_cleanup_runs_once_when_the_body_raises():
    strategy = CountingStrategy()
    with pytest.raises(RuntimeError, match="downstream failure"):
        async with ParallelBatchProcessor() as processor:
            await processor.add_work(LLMWorkItem(item_id="a", strategy=strategy, prompt="x"))
            await processor.process_all()
            raise RuntimeError("downstream failure")
    assert strategy.cleanup_count == 1


async def test_cleanup_runs_once_when_cancelled_mid_batch():
    strategy = CountingStrategy(latency=30)
    started = asyncio.Event()

    class Signalling(CountingStrategy):
        async def execute(self, prompt, attempt, timeout, state=None):
            started.set()
            return await strategy.execute(prompt, attempt, timeout, state)

    signalling = Signalling()

    @flow
    async def long_batch():
        async with ParallelBatchProcessor(config=ProcessorConfig(max_workers=4)) as processor:
            for i in range(8):
                await processor.add_work(
                    LLMWorkItem(item_id=f"i{i}", strategy=signalling, prompt="x")
                )
            await processor.process_all()

    task = asyncio.create_task(long_batch())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(BaseException):  # noqa: B017 - cancellation surfaces as Prefect wraps it
        await task
    assert signalling.prepare_count == 1
    assert signalling.cleanup_count == 1


async def test_a_failing_cleanup_is_logged_and_the_others_still_run(caplog):
    class BadCleanup(CountingStrategy):
        async def cleanup(self) -> None:
            self.cleanup_count += 1
            raise OSError("disk gone")

    bad, good = BadCleanup("bad"), CountingStrategy("good")
    with caplog.at_level(logging.ERROR, logger="prefect_batch_llm"):
        async with ParallelBatchProcessor() as processor:
            await processor.add_work(LLMWorkItem(item_id="1", strategy=bad, prompt="x"))
            await processor.add_work(LLMWorkItem(item_id="2", strategy=good, prompt="x"))
            result = await processor.process_all()
    assert result.succeeded == 2
    assert (bad.cleanup_count, good.cleanup_count) == (1, 1)
    assert "cleanup() of BadCleanup failed: OSError: disk gone" in caplog.text


async def test_without_context_manager_cleanup_is_never_called():
    strategy = CountingStrategy()
    processor = ParallelBatchProcessor()
    await processor.add_work(LLMWorkItem(item_id="1", strategy=strategy, prompt="x"))
    result = await processor.process_all()
    assert result.succeeded == 1
    assert strategy.prepare_count == 1
    assert not strategy.cleanup_called


async def test_dry_run_neither_prepares_nor_calls_the_strategy():
    strategy = CountingStrategy()
    async with ParallelBatchProcessor(config=ProcessorConfig(dry_run=True)) as processor:
        for i in range(3):
            await processor.add_work(LLMWorkItem(item_id=str(i), strategy=strategy, prompt="hi"))
        result = await processor.process_all()
    assert result.succeeded == 3
    assert strategy.prepare_count == strategy.execute_count == strategy.cleanup_count == 0
    assert result.results[0].output == "[dry-run] hi"
    assert result.total_input_tokens == 0
