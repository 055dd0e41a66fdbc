"""The batch-llm seeds' own test scenarios, run against this API.

Ported as written; the one deliberate change: seed 002's first test still expects
`cleanup()` per item (v0.3 behaviour). The v0.4 guide (seed 000) stands: once per strategy.
"""

from __future__ import annotations

import asyncio

import pytest

from prefect_batch_llm import LLMCallStrategy, LLMWorkItem, ParallelBatchProcessor, ProcessorConfig

# -- seed 002, section 1.2 -----------------------------------------------------------------


async def test_shared_strategy_prepare_called_once():
    prepare_count = 0
    cleanup_count = 0
    execute_count = 0

    class CountingStrategy(LLMCallStrategy[str]):
        async def prepare(self):
            nonlocal prepare_count
            prepare_count += 1
            await asyncio.sleep(0.01)

        async def cleanup(self):
            nonlocal cleanup_count
            cleanup_count += 1

        async def execute(self, prompt, attempt, timeout, state):
            nonlocal execute_count
            execute_count += 1
            return f"Result: {prompt}", {"input_tokens": 10, "output_tokens": 5}

    strategy = CountingStrategy()
    config = ProcessorConfig(max_workers=5, timeout_per_item=10.0)
    async with ParallelBatchProcessor[str, str, None](config=config) as processor:
        for i in range(100):
            await processor.add_work(
                LLMWorkItem(item_id=f"item_{i}", strategy=strategy, prompt=f"Test {i}")
            )
        result = await processor.process_all()

    assert result.total_items == 100
    assert result.succeeded == 100
    assert prepare_count == 1, "prepare() should be called exactly once"
    assert execute_count == 100, "execute() should be called per item"
    assert cleanup_count == 1, "v0.4 (seed 000): cleanup() once per strategy, at exit"


async def test_shared_strategy_concurrent_prepare():
    prepare_count = 0
    prepare_lock = asyncio.Lock()

    class ConcurrentStrategy(LLMCallStrategy[str]):
        async def prepare(self):
            nonlocal prepare_count
            async with prepare_lock:
                prepare_count += 1
            await asyncio.sleep(0.1)

        async def execute(self, prompt, attempt, timeout, state):
            return "Result", {"input_tokens": 10, "output_tokens": 5}

    strategy = ConcurrentStrategy()
    config = ProcessorConfig(max_workers=20, timeout_per_item=10.0)
    async with ParallelBatchProcessor[str, str, None](config=config) as processor:
        for i in range(100):
            await processor.add_work(
                LLMWorkItem(item_id=f"item_{i}", strategy=strategy, prompt=f"Test {i}")
            )
        result = await processor.process_all()

    assert result.succeeded == 100
    assert prepare_count == 1, "Race condition: prepare() called multiple times"


async def test_different_strategies_prepare_separately():
    prepare_counts: dict[str, int] = {}

    class TrackedStrategy(LLMCallStrategy[str]):
        def __init__(self, name: str):
            self.name = name

        async def prepare(self):
            prepare_counts[self.name] = prepare_counts.get(self.name, 0) + 1

        async def execute(self, prompt, attempt, timeout, state):
            return f"{self.name}: {prompt}", {"input_tokens": 10}

    strategy_a, strategy_b, strategy_c = (TrackedStrategy(n) for n in "ABC")
    config = ProcessorConfig(max_workers=5, timeout_per_item=10.0)
    async with ParallelBatchProcessor[str, str, None](config=config) as processor:
        for i in range(10):
            await processor.add_work(
                LLMWorkItem(item_id=f"a_{i}", strategy=strategy_a, prompt="Test")
            )
        for i in range(10):
            await processor.add_work(
                LLMWorkItem(item_id=f"b_{i}", strategy=strategy_b, prompt="Test")
            )
        for i in range(10):
            await processor.add_work(
                LLMWorkItem(item_id=f"c_{i}", strategy=strategy_c, prompt="Test")
            )
        result = await processor.process_all()

    assert result.total_items == 30
    assert result.succeeded == 30
    assert prepare_counts == {"A": 1, "B": 1, "C": 1}


# -- seed 004 (v0.1 strategies: execute() without a state parameter) ----------------------


async def test_v01_shared_strategy_prepare_called_once():
    class CountingStrategy(LLMCallStrategy[str]):
        prepare_count = 0

        async def prepare(self):
            self.prepare_count += 1
            await asyncio.sleep(0.1)

        async def execute(self, prompt, attempt, timeout):  # type: ignore[override]
            return f"Response: {prompt}", {"input_tokens": 10}

    strategy = CountingStrategy()
    config = ProcessorConfig(max_workers=5, timeout_per_item=10.0)
    async with ParallelBatchProcessor[str, str, None](config=config) as processor:
        for i in range(20):
            await processor.add_work(
                LLMWorkItem(item_id=f"item_{i}", strategy=strategy, prompt=f"Test {i}")
            )
        result = await processor.process_all()

    assert result.succeeded == 20
    assert strategy.prepare_count == 1


async def test_v01_different_strategies_prepare_called_separately():
    class CountingStrategy(LLMCallStrategy[str]):
        def __init__(self):
            self.prepare_count = 0

        async def prepare(self):
            self.prepare_count += 1

        async def execute(self, prompt, attempt, timeout):  # type: ignore[override]
            return "Response", {"input_tokens": 10}

    strategy1, strategy2 = CountingStrategy(), CountingStrategy()
    config = ProcessorConfig(max_workers=5, timeout_per_item=10.0)
    async with ParallelBatchProcessor[str, str, None](config=config) as processor:
        await processor.add_work(LLMWorkItem(item_id="item_1", strategy=strategy1, prompt="Test"))
        await processor.add_work(LLMWorkItem(item_id="item_2", strategy=strategy2, prompt="Test"))
        result = await processor.process_all()

    assert result.succeeded == 2
    assert strategy1.prepare_count == 1
    assert strategy2.prepare_count == 1


# -- seed 000, "Testing Your Migration" --------------------------------------------------


class YourStrategy(LLMCallStrategy[str]):
    def __init__(self):
        self.cleanup_called = False

    async def execute(self, prompt, attempt, timeout, state=None):
        return "output", {"input_tokens": 1}

    async def cleanup(self):
        self.cleanup_called = True


async def test_migration_cleanup_called_with_context_manager():
    config = ProcessorConfig()
    strategy = YourStrategy()
    async with ParallelBatchProcessor(config=config) as processor:
        await processor.add_work(LLMWorkItem(item_id="1", strategy=strategy, prompt="p"))
        await processor.process_all()
        assert not strategy.cleanup_called, "Cleanup not called yet"
    assert strategy.cleanup_called, "Cleanup should be called on exit"


async def test_migration_no_cleanup_without_context_manager():
    strategy = YourStrategy()
    processor = ParallelBatchProcessor(config=ProcessorConfig())
    await processor.add_work(LLMWorkItem(item_id="1", strategy=strategy, prompt="p"))
    await processor.process_all()
    assert not strategy.cleanup_called, "Cleanup not called without context manager"


async def test_migration_runtime_error_on_late_add_work():
    async with ParallelBatchProcessor(config=ProcessorConfig()) as processor:
        await processor.add_work(LLMWorkItem(item_id="1", strategy=YourStrategy(), prompt="p"))
        await processor.process_all()
        with pytest.raises(RuntimeError):
            await processor.add_work(LLMWorkItem(item_id="2", strategy=YourStrategy(), prompt="p"))
