"""One engine for both modes: every item ends in exactly one delivered result, whatever stops
the batch; the retry decision is a pure function; prepare is retried like a call."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time

import pytest
from helpers import CountingStrategy, ScriptedStrategy

from prefect_batch_llm import (
    ErrorInfo,
    LLMWorkItem,
    ParallelBatchProcessor,
    PermanentError,
    ProcessorConfig,
    RateLimitError,
    ResultHandlerError,
    RetryConfig,
    TransientError,
)
from prefect_batch_llm._engine.decision import CACHE_EXPIRED_RETRIES, Used, decide
from prefect_batch_llm.errors import info_for_category

FAST = RetryConfig(max_attempts=3, initial_wait=0.01, max_wait=0.05)
MODES = {"per-item": None, "chunked": 5}

# -- the decision table --------------------------------------------------------------------

NO_JITTER = RetryConfig(
    max_attempts=3, initial_wait=1.0, max_wait=8.0, jitter=False, max_rate_limit_retries=2
)


def info(category: str, wait: float | None = None) -> ErrorInfo:
    return info_for_category(category, suggested_wait=wait)


@pytest.mark.parametrize(
    ("error", "used", "deadline", "retry", "wait", "budget"),
    [
        # transient and timeout: backoff 1, 2 s; attempts bounded by max_attempts
        (info("transient"), Used(attempt=1), None, True, 1.0, "attempt"),
        (info("transient"), Used(attempt=2), None, True, 2.0, "attempt"),
        (info("transient"), Used(attempt=3), None, False, 0.0, None),
        (info("timeout"), Used(attempt=1), None, True, 1.0, "attempt"),
        # the provider's suggested wait wins over a shorter backoff
        (info("transient", wait=5.0), Used(attempt=1), None, True, 5.0, "attempt"),
        # validation: at once
        (info("validation"), Used(attempt=1), None, True, 0.0, "attempt"),
        (info("validation"), Used(attempt=3), None, False, 0.0, None),
        # rate limit: its own budget, never an attempt; waits at least Retry-After
        (info("rate_limit", wait=4.0), Used(attempt=3), None, True, 4.0, "rate_limit"),
        (info("rate_limit", wait=0.1), Used(rate_limit_retries=1), None, True, 2.0, "rate_limit"),
        (info("rate_limit", wait=4.0), Used(rate_limit_retries=2), None, False, 0.0, None),
        # cache expired: own budget, no wait
        (info("cache_expired"), Used(attempt=3), None, True, 0.0, "cache"),
        (info("cache_expired"), Used(cache_retries=CACHE_EXPIRED_RETRIES), None, False, 0.0, None),
        # never retried
        (info("permanent"), Used(), None, False, 0.0, None),
        (info("content_filter"), Used(), None, False, 0.0, None),
        (info("prepare_failed"), Used(), None, False, 0.0, None),
        (info("invalid_input"), Used(), None, False, 0.0, None),
        # the item's deadline bounds every wait
        (info("transient"), Used(attempt=1), 100.5, False, 0.0, None),
        (info("transient"), Used(attempt=1), 101.5, True, 1.0, "attempt"),
        (info("rate_limit", wait=30.0), Used(), 110.0, False, 0.0, None),
        (info("validation"), Used(attempt=1), 100.1, True, 0.0, "attempt"),
    ],
)
def test_decision_table(error, used, deadline, retry, wait, budget):
    decision = decide(error, used, NO_JITTER, now=100.0, deadline=deadline)
    assert (decision.retry, decision.wait, decision.budget) == (retry, wait, budget)
    after = decision.used_after(used)
    if budget == "attempt":
        assert after == Used(used.attempt + 1, used.rate_limit_retries, used.cache_retries)
    elif budget is None:
        assert after == used


def test_a_rate_limit_pauses_the_scope_even_when_the_item_does_not_retry():
    spent = decide(
        info("rate_limit", wait=4.0), Used(rate_limit_retries=2), NO_JITTER, now=0, deadline=None
    )
    assert not spent.retry and spent.cooldown == 4.0


def test_jittered_backoff_stays_in_the_upper_half_and_is_reproducible():
    config = RetryConfig(max_attempts=5, initial_wait=2.0, max_wait=60.0)
    waits = [
        decide(
            info("transient"), Used(attempt=3), config, now=0, deadline=None, rng=random.Random(7)
        ).wait
        for _ in range(3)
    ]
    assert len(set(waits)) == 1 and 4.0 <= waits[0] <= 8.0


# -- every item gets one result, whatever stops the batch ----------------------------------


def work(strategy, n: int, prefix: str = "i"):
    return [
        LLMWorkItem(item_id=f"{prefix}{k}", strategy=strategy, prompt=f"{prefix}{k}")
        for k in range(n)
    ]


async def as_async(items):
    for item in items:
        await asyncio.sleep(0)
        yield item


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("source_kind", ["list", "async"])
async def test_batch_timeout_gives_every_item_exactly_one_result(mode, source_kind):
    strategy = CountingStrategy(latency=0.2)
    delivered: list[str] = []
    # 120 items need 4 s at 6 workers; the 2 s timeout leaves room for the first to finish
    # on a loaded machine (1 s flaked under load: no item had finished).
    items = work(strategy, 120)
    config = ProcessorConfig(max_workers=6, batch_timeout=2.0, items_per_task=MODES[mode])
    async with ParallelBatchProcessor(
        config=config, on_result=lambda r: delivered.append(r.item_id)
    ) as p:
        source = items if source_kind == "list" else as_async(items)
        result = await p.process_stream(source)
    assert sorted(delivered) == sorted(i.item_id for i in items), "each item delivered once"
    assert result.total_items == 120 and len(result.results) == 120
    categories = {r.error_category for r in result.results if not r.success}
    assert categories == {"batch_timeout"}
    assert 0 < result.succeeded < 120


async def test_batch_timeout_never_cancels_a_slow_async_on_result():
    strategy = CountingStrategy()
    started: list[str] = []
    completed: list[str] = []

    async def slow_sink(result) -> None:
        started.append(result.item_id)
        await asyncio.sleep(0.05)
        completed.append(result.item_id)

    config = ProcessorConfig(max_workers=4, batch_timeout=0.5)
    t0 = time.monotonic()
    async with ParallelBatchProcessor(config=config, on_result=slow_sink) as p:
        result = await p.process_stream(work(strategy, 40))
    elapsed = time.monotonic() - t0
    assert started == completed and len(completed) == 40, "no delivery cancelled mid-way"
    assert result.total_items == 40
    assert elapsed < 0.5 + 40 * 0.05 + 5, "the batch ends once the deliveries are done"


@pytest.mark.parametrize("mode", MODES)
async def test_an_on_result_error_stops_the_batch_the_same_way_in_both_modes(mode):
    strategy = CountingStrategy(latency=0.02)
    seen: list[str] = []

    def sink(result) -> None:
        seen.append(result.item_id)
        if len(seen) == 3:
            raise OSError(28, "No space left on device")

    config = ProcessorConfig(max_workers=2, items_per_task=MODES[mode])
    with pytest.raises(ResultHandlerError, match="No space left on device") as raised:
        async with ParallelBatchProcessor(config=config, on_result=sink) as p:
            await p.process_stream(work(strategy, 50))
    batch = raised.value.result
    assert batch.total_items == 50, "every item is accounted, run or not"
    assert batch.errors_by_category().get("aborted", 0) == 50 - batch.succeeded
    assert strategy.execute_count == batch.succeeded < 50, "no new item started after the error"
    assert len(seen) == 3, "on_result is not called again after it failed"


@pytest.mark.parametrize("mode", MODES)
async def test_a_non_item_in_a_stream_fails_alone(mode):
    strategy = CountingStrategy()
    stream = [*work(strategy, 3), "not an item", *work(strategy, 3, prefix="j")]
    async with ParallelBatchProcessor(config=ProcessorConfig(items_per_task=MODES[mode])) as p:
        result = await p.process_stream(stream)
    assert result.total_items == 7 and result.succeeded == 6
    (bad,) = [r for r in result.results if not r.success]
    assert bad.item_id == "item-3" and bad.error_category == "invalid_input"
    assert "str, not an LLMWorkItem" in (bad.error or "")


async def test_the_same_fault_script_gives_the_same_outcome_per_item_in_both_modes():
    def script():
        return {
            "i1": [TransientError("503")],
            "i2": [PermanentError("400 bad request")],
            "i3": [RateLimitError("429", retry_after=0.05)],
            "i4": [TransientError("503")] * 3,
            "i5": [TimeoutError("slow")],
        }

    outcomes = {}
    for mode, size in MODES.items():
        strategy = ScriptedStrategy(script())
        config = ProcessorConfig(max_workers=4, retry=FAST, items_per_task=size)
        async with ParallelBatchProcessor(config=config) as p:
            result = await p.process_stream(work(strategy, 8))
        outcomes[mode] = {
            r.item_id: (r.success, r.error_category, r.attempts, r.retries_by_category)
            for r in result.results
        }
    assert outcomes["per-item"] == outcomes["chunked"]
    assert outcomes["per-item"]["i4"] == (False, "transient", 3, {"transient": 2})
    assert outcomes["per-item"]["i3"] == (True, None, 2, {"rate_limit": 1})


# -- prepare is retried like a call --------------------------------------------------------


class FlakyPrepare(CountingStrategy):
    def __init__(self, failures: list[Exception]) -> None:
        super().__init__(prepare_delay=0.0)
        self.failures = failures

    async def prepare(self) -> None:
        self.prepare_count += 1
        if self.failures:
            raise self.failures.pop(0)


@pytest.mark.parametrize("mode", MODES)
async def test_a_transient_prepare_error_is_retried_once_for_all_items(mode):
    strategy = FlakyPrepare([ConnectionError("unreachable"), ConnectionError("unreachable")])
    config = ProcessorConfig(max_workers=4, retry=FAST, items_per_task=MODES[mode])
    async with ParallelBatchProcessor(config=config) as p:
        result = await p.process_stream(work(strategy, 12))
    assert result.succeeded == 12
    assert strategy.prepare_count == 3


async def test_a_permanent_prepare_error_fails_the_items_without_retrying():
    strategy = FlakyPrepare([PermanentError("bad key")])
    async with ParallelBatchProcessor(config=ProcessorConfig(retry=FAST)) as p:
        result = await p.process_stream(work(strategy, 6))
    assert strategy.prepare_count == 1 and strategy.execute_count == 0
    assert result.errors_by_category() == {"prepare_failed": 6}


# -- the item's budget bounds every wait ---------------------------------------------------


async def test_total_timeout_per_item_bounds_the_wait_for_a_cooldown():
    strategy = ScriptedStrategy({"i0": [RateLimitError("429", retry_after=30.0)]}, latency=0.05)
    config = ProcessorConfig(
        max_workers=4, timeout_per_item=1.0, total_timeout_per_item=1.5, retry=FAST
    )
    t0 = time.monotonic()
    async with ParallelBatchProcessor(config=config) as p:
        result = await p.process_stream(work(strategy, 8))
    assert time.monotonic() - t0 < 15, "no item waited out the 30 s cooldown"
    failed = {r.item_id: r.error_category for r in result.results if not r.success}
    assert failed["i0"] == "rate_limit", "a retry whose wait ends past the deadline is not taken"
    assert set(failed.values()) <= {"rate_limit", "timeout"}


# -- what the logs and the stats say -------------------------------------------------------


async def test_get_stats_has_the_keys_batch_llm_users_read():
    strategy = CountingStrategy()
    async with ParallelBatchProcessor() as p:
        await p.process_stream(work(strategy, 3))
        stats = await p.get_stats()
    assert stats["total_tokens"] == 45 and stats["cached_input_tokens"] == 0
    assert stats["start_time"] is not None and stats["start_time"] <= time.time()


def test_importing_the_package_loads_neither_the_emulator_nor_the_test_kit():
    code = (
        "import sys, inspect, prefect_batch_llm\n"
        "from prefect.blocks.core import Block\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('uvicorn', "
        "'prefect_batch_llm.testing')))\n"
        "blocks = [n for n, c in inspect.getmembers(prefect_batch_llm) "
        "if isinstance(c, type) and issubclass(c, Block)]\n"
        "print(loaded, 'MockStrategy' in blocks)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] False", out.stdout + out.stderr


async def test_per_item_mode_does_not_grow_the_flow_run_context_with_the_batch():
    from prefect import flow
    from prefect.context import FlowRunContext

    strategy = CountingStrategy()

    @flow
    async def big_batch() -> tuple[int, int, int]:
        config = ProcessorConfig(max_workers=16, keep_results=False, report_artifacts=False)
        async with ParallelBatchProcessor(config=config) as p:
            result = await p.process_stream(work(strategy, 600))
        context = FlowRunContext.get()
        assert context is not None
        return result.succeeded, len(context.run_results), len(context.task_run_assets)

    succeeded, linked, assets = await big_batch()
    assert succeeded == 600
    assert (linked, assets) == (0, 0), "nothing is kept per finished item task run"
