"""Lazy sources, the result hook, totals without results, UI artifacts and result caching."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from helpers import CountingStrategy, ScriptedStrategy

from prefect_batch_llm import (
    LLMWorkItem,
    ParallelBatchProcessor,
    PermanentError,
    ProcessorConfig,
)


def items(strategy, n: int, prefix: str = "i"):
    for i in range(n):
        yield LLMWorkItem(item_id=f"{prefix}{i}", strategy=strategy, prompt=f"p{i}")


async def test_process_stream_outside_a_flow_runs_every_item_of_an_iterator():
    # Regression: Prefect serialises flow parameters with jsonable_encoder, which consumed
    # the first item when the iterator was passed as one.
    strategy = CountingStrategy()
    async with ParallelBatchProcessor(config=ProcessorConfig(max_workers=3)) as processor:
        result = await processor.process_stream(items(strategy, 25))
    assert [r.item_id for r in result.results] == [f"i{i}" for i in range(25)]
    assert strategy.execute_count == 25 and strategy.cleanup_count == 1


async def test_process_stream_reads_lazily_and_accepts_async_iterables():
    strategy = CountingStrategy(latency=0.01)
    read = 0

    async def source():
        nonlocal read
        for item in items(strategy, 40):
            read += 1
            yield item

    seen_read_counts: list[int] = []
    async with ParallelBatchProcessor(
        config=ProcessorConfig(max_workers=4),
        on_result=lambda result: seen_read_counts.append(read),
    ) as processor:
        result = await processor.process_stream(source(), total=40)
    assert result.succeeded == 40
    assert seen_read_counts[0] <= 8, "the source was read ahead of the workers"


async def test_duplicate_ids_in_a_stream_become_invalid_input_results():
    strategy = CountingStrategy()
    stream = [*items(strategy, 3), LLMWorkItem(item_id="i1", strategy=strategy, prompt="again")]
    async with ParallelBatchProcessor() as processor:
        result = await processor.process_stream(stream)
    assert result.total_items == 4 and result.succeeded == 3
    duplicate = result.results[3]
    assert duplicate.error_category == "invalid_input" and "Duplicate item_id 'i1'" in (
        duplicate.error or ""
    )
    assert strategy.execute_count == 3


async def test_on_result_sees_every_result_as_it_finishes_and_totals_need_no_results():
    strategy = ScriptedStrategy({"p3": [PermanentError("bad")]})
    written: list[str] = []

    async def write(result):
        written.append(json.dumps({"id": result.item_id, "ok": result.success}))

    async with ParallelBatchProcessor(
        config=ProcessorConfig(max_workers=2, keep_results=False), on_result=write
    ) as processor:
        result = await processor.process_stream(items(strategy, 10))
    assert result.results == []
    assert (result.total_items, result.succeeded, result.failed) == (10, 9, 1)
    assert result.total_input_tokens == 900 and result.errors_by_category() == {"permanent": 1}
    assert sorted(json.loads(line)["id"] for line in written) == sorted(f"i{i}" for i in range(10))


async def test_cached_results_skip_completed_items_and_recompute_changed_ones(tmp_path: Path):
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path}):
        first = CountingStrategy("v1")
        config = ProcessorConfig(cache_results=True, max_workers=4)

        async def run(strategy, n, cfg=config):
            async with ParallelBatchProcessor(config=cfg) as processor:
                return await processor.process_stream(items(strategy, n))

        await run(first, 6)
        again = CountingStrategy("v1")  # same configuration, a later run
        result = await run(again, 8)
        assert again.execute_count == 2, "only the 2 new items are computed"
        assert [r.output for r in result.results[:2]] == ["v1: p0", "v1: p1"]
        assert result.results[0].metadata == {"cached_result": True}
        assert result.results[0].attempts == 0 and result.total_input_tokens == 20

        changed = CountingStrategy("v2")  # another configuration: everything recomputed
        await run(changed, 8)
        assert changed.execute_count == 8

        fresh = CountingStrategy("v1")
        await run(fresh, 8, ProcessorConfig(cache_results=True, refresh_cache=True))
        assert fresh.execute_count == 8, "refresh_cache recomputes and overwrites"
    await asyncio.sleep(0)


async def test_progress_bar_on_the_terminal(capsys):
    strategy = CountingStrategy()
    config = ProcessorConfig(progress_bar=True, max_workers=2)
    async with ParallelBatchProcessor(config=config) as processor:
        await processor.process_stream(items(strategy, 5), total=5)
    err = capsys.readouterr().err
    assert "LLM batch" in err and "5/5" in err and "0 failed" in err
