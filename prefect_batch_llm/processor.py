"""`ParallelBatchProcessor`: the flow-level context manager that runs a batch of work items."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, Self, TypedDict, TypeVar, cast

from prefect import Task, flow
from prefect.context import FlowRunContext

from prefect_batch_llm._attempts import BatchRuntime, BatchStats, ItemRun
from prefect_batch_llm._lifecycle import StrategyLifecycle
from prefect_batch_llm._task import item_task
from prefect_batch_llm.config import ProcessorConfig
from prefect_batch_llm.errors import ErrorCategory, ErrorClassifier, describe
from prefect_batch_llm.items import LLMWorkItem
from prefect_batch_llm.results import BatchResult, WorkItemResult

TInput = TypeVar("TInput")
TOutput = TypeVar("TOutput")
TContext = TypeVar("TContext")

logger = logging.getLogger("prefect_batch_llm")


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
    """

    def __init__(
        self,
        config: ProcessorConfig | None = None,
        *,
        error_classifier: ErrorClassifier | None = None,
    ) -> None:
        self.config = config or ProcessorConfig()
        self._classifier = error_classifier
        self._items: list[LLMWorkItem[TInput, TOutput, TContext]] = []
        self._ids: set[str] = set()
        self._started = False
        self._lifecycle = StrategyLifecycle()
        self._stats = BatchStats()
        self._runner: asyncio.Runner | None = None

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
        if self._started:
            raise RuntimeError(
                "process_all() was already called on this processor. Create a new "
                "ParallelBatchProcessor for the next batch."
            )
        self._started = True
        if FlowRunContext.get() is None:
            in_own_flow = cast(
                Callable[[], Awaitable[BatchResult[TOutput, TContext]]], self._run_in_own_flow
            )
            return await in_own_flow()
        return await self._run()

    def process_all_sync(self) -> BatchResult[TOutput, TContext]:
        """`process_all()` for synchronous code (a sync flow, a script).

        Inside `with ParallelBatchProcessor(...)` it runs on the processor's loop, so the
        cleanup at exit sees the same clients `prepare()` created.
        """
        if self._runner is not None:
            return self._runner.run(self.process_all())
        return asyncio.run(self.process_all())

    @flow(name="llm-batch", validate_parameters=False)
    async def _run_in_own_flow(self) -> BatchResult[TOutput, TContext]:
        return await self._run()

    async def _run(self) -> BatchResult[TOutput, TContext]:
        stats, config = self._stats, self.config
        stats.total = len(self._items)
        stats.started_at = time.monotonic()
        runtime = BatchRuntime(config, self._lifecycle, self._classifier, stats)
        run_item = item_task(runtime)
        runs: list[ItemRun | None] = [None] * len(self._items)
        results: list[WorkItemResult[Any, Any] | None] = [None] * len(self._items)
        queue = enumerate(self._items)

        async def worker() -> None:
            # Workers share one iterator: no coroutine exists for an item until a worker
            # takes it, so memory stays flat however many items are queued.
            for index, item in queue:
                run = runs[index] = ItemRun(item, runtime)
                result = results[index] = await self._run_one(run_item, run)
                stats.processed += 1
                if result.success:
                    stats.succeeded += 1
                else:
                    stats.failed += 1

        try:
            async with asyncio.timeout(config.batch_timeout):
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(config.max_workers, len(self._items))):
                        group.create_task(worker())
        except TimeoutError:
            logger.error(
                "Batch timeout: %.1fs elapsed before every item finished; unfinished items "
                "are reported as failed (category batch_timeout).",
                config.batch_timeout or 0.0,
            )
        finally:
            stats.finished_at = time.monotonic()
        for index, item in enumerate(self._items):
            if results[index] is None:
                run = runs[index] or ItemRun(item, runtime)
                results[index] = run.fail(
                    f"ProcessorConfig.batch_timeout ({config.batch_timeout}s) elapsed before "
                    "this item finished; raise batch_timeout or max_workers.",
                    ErrorCategory.BATCH_TIMEOUT,
                )
                stats.processed += 1
                stats.failed += 1
        batch: BatchResult[TOutput, TContext] = BatchResult(results=results)  # type: ignore[arg-type]
        batch.duration = stats.finished_at - stats.started_at
        return batch

    @staticmethod
    async def _run_one(run_item: Task[..., Any], run: ItemRun) -> WorkItemResult[Any, Any]:
        runs = run.runtime.runs_by_task_run
        try:
            state = await run_item(run.item.item_id, run, return_state=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the task engine itself failed, not the strategy
            return run.fail(
                f"the item's task run crashed: {describe(exc)}", ErrorCategory.TRANSIENT
            )
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
            processed=stats.processed,
            succeeded=stats.succeeded,
            failed=stats.failed,
            calls=stats.calls,
            retries=stats.retries,
            rate_limit_count=stats.rate_limit_count,
            error_counts=dict(stats.error_counts),
            total_input_tokens=stats.input_tokens,
            total_output_tokens=stats.output_tokens,
            total_cached_tokens=stats.cached_input_tokens,
            duration=(end - stats.started_at) if stats.started_at is not None else 0.0,
        )
