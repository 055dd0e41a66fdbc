"""`ParallelBatchProcessor`: the flow-level context manager that runs a batch of work items."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Generic, Self, TypedDict, TypeVar, cast

from prefect import flow
from prefect.context import FlowRunContext

from prefect_batch_llm._budget import Budget, missing_pricing_message
from prefect_batch_llm._engine import (
    BatchRun,
    BatchRuntime,
    BatchStats,
    ResultHandlerError,
    Source,
    StrategyLifecycle,
)
from prefect_batch_llm._events import cooldown_event_emitter, emit_batch_event
from prefect_batch_llm._reporting import BatchReport, quiet_item_logs
from prefect_batch_llm.config import ProcessorConfig
from prefect_batch_llm.errors import ErrorClassifier
from prefect_batch_llm.items import LLMWorkItem
from prefect_batch_llm.metrics import metrics_for_current_flow_run
from prefect_batch_llm.results import BatchResult, ModelPricing, WorkItemResult

TInput = TypeVar("TInput")
TOutput = TypeVar("TOutput")
TContext = TypeVar("TContext")


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
    cached_input_tokens: int
    total_tokens: int
    start_time: float | None
    duration: float
    latency_p50_seconds: float | None
    latency_p95_seconds: float | None
    latency_p99_seconds: float | None
    cooldown_seconds: float


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
            one call at a time, e.g. to write results incrementally. It is never cancelled
            by `batch_timeout`. If it raises, the batch stops: no new item starts, items in
            flight finish and are accounted, every item not run gets an `aborted` result,
            and `process_all()` raises `ResultHandlerError` (its `result` holds the totals).
        pricing: Prices for the cost line of the batch report artifact, and for the budget
            cap (`ProcessorConfig.max_cost_usd` needs them: refused without).
        destination: Where the caller writes the results (shown in the report and event).
        report_details: Rows at the top of the report artifact, e.g. `{"Input": path,
            "Strategy": "gemini-cached-strategy/handbook-qa", "Model": "gemini-2.5-flash"}`.
            `destination`, if given, is shown as the `Output` row unless one is given here.
    """

    def __init__(
        self,
        config: ProcessorConfig | None = None,
        *,
        error_classifier: ErrorClassifier | None = None,
        on_result: Callable[[WorkItemResult[Any, Any]], Awaitable[None] | None] | None = None,
        pricing: ModelPricing | None = None,
        destination: str | None = None,
        report_details: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config or ProcessorConfig()
        self._destination = destination
        self._report_details = dict(report_details or {})
        if destination is not None:
            self._report_details.setdefault("Output", destination)
        self._classifier = error_classifier
        self._on_result = on_result
        self._pricing = pricing
        if self.config.max_cost_usd is not None and pricing is None:
            raise ValueError(missing_pricing_message(self.config.max_cost_usd))
        self._items: list[LLMWorkItem[TInput, TOutput, TContext]] = []
        self._ids: set[str] = set()
        self._started = False
        self._lifecycle = StrategyLifecycle(self.config.retry, error_classifier)
        self._stats = BatchStats()
        self._runner: asyncio.Runner | None = None
        self._source: Source | None = None

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
        return await self._run_here_or_in_own_flow(Source(self._items, len(self._items)))

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
        return await self._run_here_or_in_own_flow(Source(items, total))

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

    async def _run_here_or_in_own_flow(self, source: Source) -> BatchResult[TOutput, TContext]:
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

    async def _run(self, source: Source) -> BatchResult[TOutput, TContext]:
        config = self.config
        runtime = BatchRuntime(
            config,
            self._lifecycle,
            self._classifier,
            self._stats,
            on_cooldown=cooldown_event_emitter(),
        )
        report = BatchReport(
            artifacts=config.report_artifacts,
            progress_bar=config.progress_bar,
            key=config.artifact_key,
            pricing=self._pricing,
            details=self._report_details,
            failed_first=config.report_failed_first,
        )
        budget = Budget.for_batch(config, self._pricing, self._stats)
        batch_run = BatchRun(source, runtime, report, self._on_result, budget)
        metrics = metrics_for_current_flow_run(config, self._stats, self._pricing)
        await metrics.start()
        try:
            with quiet_item_logs(config.quiet_item_logs):
                batch = await batch_run.run()
        except ResultHandlerError as error:
            await self._conclude(report, error.result, aborted=str(error))
            raise
        finally:
            await metrics.finish()  # the final values, whatever ended the batch
        batch.max_failed_fraction = config.max_failed_fraction
        await self._conclude(report, batch)
        return batch

    async def _conclude(
        self, report: BatchReport, batch: BatchResult[Any, Any], aborted: str | None = None
    ) -> None:
        await report.finish(batch)
        await emit_batch_event(
            batch, pricing=self._pricing, destination=self._destination, aborted=aborted
        )

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
            cached_input_tokens=stats.cached_input_tokens,
            total_tokens=stats.input_tokens + stats.output_tokens,
            start_time=stats.started_at_wall,
            duration=(end - stats.started_at) if stats.started_at is not None else 0.0,
            latency_p50_seconds=stats.latency.percentile(0.5),
            latency_p95_seconds=stats.latency.percentile(0.95),
            latency_p99_seconds=stats.latency.percentile(0.99),
            cooldown_seconds=stats.cooldown_seconds,
        )
