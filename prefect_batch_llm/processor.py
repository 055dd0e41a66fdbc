"""`ParallelBatchProcessor`: the flow-level context manager that runs a batch of work items."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from types import TracebackType
from typing import Any, Generic, Self, TypedDict, TypeVar, cast

from prefect import Task, flow
from prefect.context import FlowRunContext

from prefect_batch_llm._attempts import BatchRuntime, BatchStats, ItemRun
from prefect_batch_llm._chunks import Chunk, run_chunk
from prefect_batch_llm._lifecycle import StrategyLifecycle
from prefect_batch_llm._reporting import BatchReport
from prefect_batch_llm._task import item_task
from prefect_batch_llm.config import ProcessorConfig
from prefect_batch_llm.errors import ErrorCategory, ErrorClassifier, describe
from prefect_batch_llm.items import LLMWorkItem
from prefect_batch_llm.results import BatchResult, ModelPricing, WorkItemResult

TInput = TypeVar("TInput")
TOutput = TypeVar("TOutput")
TContext = TypeVar("TContext")

logger = logging.getLogger("prefect_batch_llm")


def _duplicate(item_id: str) -> str:
    return (
        f"Duplicate item_id {item_id!r}: an earlier item of this batch has the same id; item "
        "ids must be unique because results are reported per id. Give this item another id."
    )


class _Source:
    """Where workers take their next item: a list, an iterator or an async iterator."""

    def __init__(self, items: Iterable[Any] | AsyncIterable[Any], total: int | None) -> None:
        self.total = total
        self._index = 0
        self._sync: Iterator[Any] | None = None
        self._async: AsyncIterator[Any] | None = None
        if isinstance(items, AsyncIterable):
            self._async = aiter(items)
        else:
            self._sync = iter(items)
        self._lock = asyncio.Lock()

    async def next(self) -> tuple[int, LLMWorkItem[Any, Any, Any]] | None:
        if self._sync is not None:
            item = next(self._sync, None)  # no await: atomic between workers
        else:
            async with self._lock:  # an async generator cannot be advanced concurrently
                assert self._async is not None
                item = await anext(self._async, None)
        if item is None:
            return None
        if not isinstance(item, LLMWorkItem):
            raise TypeError(
                f"process_stream() takes LLMWorkItems; item {self._index} is a "
                f"{type(item).__name__}."
            )
        self._index += 1
        return self._index - 1, item

    def drain(self) -> Iterator[tuple[int, LLMWorkItem[Any, Any, Any]]]:
        """Items never started (after a batch timeout), for their failed results."""
        if self._sync is None:
            return
        for item in self._sync:
            self._index += 1
            yield self._index - 1, item


class ProcessingStats(TypedDict):
    """Live counters of a batch, as returned by `get_stats()`."""

    total: int
    processed: int
    succeeded: int
    failed: int
    calls: int
    retries: int
    rate_limit_count: int
    error_counts: dict[str, int]
    total_input_tokens: int
    total_output_tokens: int
    total_cached_tokens: int
    duration: float


class ParallelBatchProcessor(Generic[TInput, TOutput, TContext]):
    """Runs work items as Prefect tasks, at most `max_workers` at a time.

    Use it as a context manager so every strategy is cleaned up exactly once when the block
    exits, whether the body returns, raises or is cancelled (SIGTERM/SIGINT of a flow run
    arrive as cancellation):

    ```python
    async with ParallelBatchProcessor(config=ProcessorConfig(max_workers=8)) as processor:
        for i, doc in enumerate(docs):
            await processor.add_work(LLMWorkItem(item_id=f"doc-{i}", strategy=strategy, prompt=doc))
        result = await processor.process_all()
    ```

    Inside a flow, each item is a task run of that flow, named after its `item_id`. Outside any
    flow (a script, a notebook), `process_all()` opens a flow run named `llm-batch` for it.
    Without the context manager, `cleanup()` is never called. A processor runs one batch.

    Args:
        config: Processor settings; defaults to `ProcessorConfig()`.
        error_classifier: Classifier for every item's errors. By default each strategy's
            own `error_classifier` is used, else the `DefaultErrorClassifier`.
        on_result: Called with each item's result as soon as it is final (sync or async),
            e.g. to write results incrementally.
        pricing: Prices for the cost line of the batch report artifact.
    """

    def __init__(
        self,
        config: ProcessorConfig | None = None,
        *,
        error_classifier: ErrorClassifier | None = None,
        on_result: Callable[[WorkItemResult[Any, Any]], Awaitable[None] | None] | None = None,
        pricing: ModelPricing | None = None,
    ) -> None:
        self.config = config or ProcessorConfig()
        self._classifier = error_classifier
        self._on_result = on_result
        self._pricing = pricing
        self._items: list[LLMWorkItem[TInput, TOutput, TContext]] = []
        self._ids: set[str] = set()
        self._started = False
        self._lifecycle = StrategyLifecycle()
        self._stats = BatchStats()
        self._runner: asyncio.Runner | None = None
        self._source: _Source | None = None

    # -- context manager -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Shielded: a second cancellation while cleaning up must not skip the cleanups.
        await asyncio.shield(self._lifecycle.cleanup_all())

    def __enter__(self) -> Self:
        """Sync entry point (e.g. in a sync flow): every async step runs on one private loop."""
        self._runner = asyncio.Runner()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            runner.run(self._lifecycle.cleanup_all())
        finally:
            runner.close()

    # -- building the batch ----------------------------------------------------------------

    async def add_work(self, work_item: LLMWorkItem[TInput, TOutput, TContext]) -> None:
        """Queue an item. Raises `RuntimeError` once `process_all()` has started."""
        self.add_work_nowait(work_item)

    def add_work_nowait(self, work_item: LLMWorkItem[TInput, TOutput, TContext]) -> None:
        """`add_work()` for synchronous code."""
        if self._started:
            raise RuntimeError(
                "add_work() called after process_all() started. A processor runs one batch: "
                "create a new ParallelBatchProcessor for the next batch."
            )
        if not isinstance(work_item, LLMWorkItem):
            raise TypeError(f"add_work() takes an LLMWorkItem, got {type(work_item).__name__}.")
        if work_item.item_id in self._ids:
            raise ValueError(
                f"Duplicate item_id {work_item.item_id!r}: item ids must be unique within a "
                "batch, because results are reported per id. Give this item another id."
            )
        self._ids.add(work_item.item_id)
        self._items.append(work_item)

    # -- running it ------------------------------------------------------------------------

    async def process_all(self) -> BatchResult[TOutput, TContext]:
        """Run every queued item to exactly one terminal result, in the order added."""
        self._begin()
        return await self._run_here_or_in_own_flow(_Source(self._items, len(self._items)))

    async def process_stream(
        self,
        items: Iterable[LLMWorkItem[TInput, TOutput, TContext]]
        | AsyncIterable[LLMWorkItem[TInput, TOutput, TContext]],
        *,
        total: int | None = None,
    ) -> BatchResult[TOutput, TContext]:
        """Run items as they are read from `items`, never holding more than the workers need.

        For inputs too large to queue with `add_work()`. Each item becomes one result; an
        item whose id was already seen in this batch becomes a failed result (category
        `invalid_input`) instead of running. `total`, if known, drives progress reporting.
        """
        self._begin()
        return await self._run_here_or_in_own_flow(_Source(items, total))

    def process_all_sync(self) -> BatchResult[TOutput, TContext]:
        """`process_all()` for synchronous code (a sync flow, a script).

        Inside `with ParallelBatchProcessor(...)` it runs on the processor's loop, so the
        cleanup at exit sees the same clients `prepare()` created.
        """
        if self._runner is not None:
            return self._runner.run(self.process_all())
        return asyncio.run(self.process_all())

    def _begin(self) -> None:
        if self._started:
            raise RuntimeError(
                "process_all() was already called on this processor. Create a new "
                "ParallelBatchProcessor for the next batch."
            )
        self._started = True

    async def _run_here_or_in_own_flow(self, source: _Source) -> BatchResult[TOutput, TContext]:
        if FlowRunContext.get() is not None:
            return await self._run(source)
        # Not a flow parameter: Prefect serialises parameters, which would consume iterators.
        self._source = source
        in_own_flow = cast(
            Callable[[], Awaitable[BatchResult[TOutput, TContext]]], self._run_in_own_flow
        )
        return await in_own_flow()

    @flow(name="llm-batch", validate_parameters=False)
    async def _run_in_own_flow(self) -> BatchResult[TOutput, TContext]:
        assert self._source is not None
        return await self._run(self._source)

    async def _run(self, source: _Source) -> BatchResult[TOutput, TContext]:
        stats, config = self._stats, self.config
        stats.total = source.total or 0
        stats.started_at = time.monotonic()
        runtime = BatchRuntime(config, self._lifecycle, self._classifier, stats)
        run_item = item_task(runtime)
        report = BatchReport(
            artifacts=config.report_artifacts,
            progress_bar=config.progress_bar,
            key=config.artifact_key,
            pricing=self._pricing,
        )
        totals = stats.results
        kept: list[tuple[int, WorkItemResult[Any, Any]]] = []
        in_flight: dict[int, ItemRun] = {}
        seen_ids: set[str] = set()
        await report.start(source.total)

        async def finish(index: int, result: WorkItemResult[Any, Any]) -> None:
            totals.add(result)
            if config.keep_results:
                kept.append((index, result))
            await report.on_result(result)
            if self._on_result is not None:
                outcome: Any = self._on_result(result)
                if inspect.isawaitable(outcome):
                    await outcome

        async def take() -> tuple[int, ItemRun] | None:
            """The next item to run (duplicate ids are finished as invalid on the way)."""
            while (taken := await source.next()) is not None:
                index, item = taken
                run = ItemRun(item, runtime)
                if item.item_id in seen_ids:
                    await finish(index, run.fail(_duplicate(item.item_id), "invalid_input"))
                    continue
                seen_ids.add(item.item_id)
                return index, run
            return None

        async def item_worker() -> None:
            # Workers pull one item at a time: no coroutine exists for an item until a worker
            # takes it, so memory stays flat however many items the source holds.
            while (taken := await take()) is not None:
                index, run = taken
                in_flight[index] = run
                result = await self._run_one(run_item, run)
                del in_flight[index]
                await finish(index, result)

        size = config.items_per_task
        slots = asyncio.Semaphore(config.max_workers)

        async def chunk_worker() -> None:
            assert size is not None
            while True:
                items: list[tuple[int, ItemRun]] = []
                while len(items) < size and (taken := await take()) is not None:
                    items.append(taken)
                if not items:
                    return
                await run_chunk(Chunk(items, slots, finish, in_flight))

        if size is None:
            workers = [item_worker] * config.max_workers
        else:
            # Enough chunks in flight to keep max_workers calls busy while one drains its tail.
            workers = [chunk_worker] * (math.ceil(config.max_workers / size) + 1)
        try:
            async with asyncio.timeout(config.batch_timeout):
                async with asyncio.TaskGroup() as group:
                    for worker in workers:
                        group.create_task(worker())
        except TimeoutError:
            logger.error(
                "Batch timeout: %.1fs elapsed before every item finished; unfinished items "
                "are reported as failed (category batch_timeout).",
                config.batch_timeout or 0.0,
            )
            message = (
                f"ProcessorConfig.batch_timeout ({config.batch_timeout}s) elapsed before this "
                "item finished; raise batch_timeout or max_workers."
            )
            unstarted = [(i, ItemRun(item, runtime)) for i, item in source.drain()]
            for index, run in [*sorted(in_flight.items()), *unstarted]:
                await finish(index, run.fail(message, ErrorCategory.BATCH_TIMEOUT))
        finally:
            stats.finished_at = time.monotonic()
        kept.sort(key=lambda pair: pair[0])
        batch: BatchResult[TOutput, TContext] = BatchResult(
            results=[result for _, result in kept], totals=totals
        )
        batch.duration = stats.finished_at - stats.started_at
        await report.finish(batch)
        return batch

    @staticmethod
    async def _run_one(run_item: Task[..., Any], run: ItemRun) -> WorkItemResult[Any, Any]:
        runs = run.runtime.runs_by_task_run
        try:
            state = await run_item(run.item.item_id, run, return_state=True)
            if state.is_completed() and not run.success and run.calls == 0:
                # An earlier run completed this item (cache_results): its stored output.
                return run.cached(await state.aresult())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the task engine itself failed, not the strategy
            error = f"the item's task run crashed: {describe(exc)}"
            return run.fail(error, ErrorCategory.TRANSIENT)
        finally:
            if run.task_run_id is not None:
                runs.pop(run.task_run_id, None)
        if not state.is_completed() and run.last_error is None:
            return run.fail(
                f"the item's task run ended in state {state.name}: {state.message}",
                ErrorCategory.TRANSIENT,
            )
        return run.result()

    # -- observing -------------------------------------------------------------------------

    async def get_stats(self) -> ProcessingStats:
        """Counters so far (usable while `process_all()` runs, from another task)."""
        stats = self._stats
        end = stats.finished_at or time.monotonic()
        return ProcessingStats(
            total=stats.total,
            processed=stats.results.total_items,
            succeeded=stats.results.succeeded,
            failed=stats.results.failed,
            calls=stats.calls,
            retries=stats.retries,
            rate_limit_count=stats.rate_limit_count,
            error_counts=dict(stats.error_counts),
            total_input_tokens=stats.input_tokens,
            total_output_tokens=stats.output_tokens,
            total_cached_tokens=stats.cached_input_tokens,
            duration=(end - stats.started_at) if stats.started_at is not None else 0.0,
        )
