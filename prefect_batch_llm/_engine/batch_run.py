"""`BatchRun`: one batch, from its source to one delivered result per item.

BatchRun owns the source, the items taken and not yet finished, the batch deadline and the
delivery of every result, whichever the mode. Workers take items and execute them (one
item task per item, or chunk tasks); they hand each final result back to BatchRun's inbox
and never call user code. One deliverer, outside the batch deadline, takes results from the
inbox in turn: totals, report, `on_result`. When the deadline passes, BatchRun stops the
workers and itself gives every item it ever took and every item it never took its result.
An `on_result` that raises stops the batch: no new item starts, items in flight finish and
are accounted, the rest of the source gets `aborted` results, and the error is raised at
the end.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from uuid import UUID

from prefect import Task
from prefect.context import FlowRunContext

from prefect_batch_llm._budget import Budget
from prefect_batch_llm._engine.attempts import ItemRun
from prefect_batch_llm._engine.chunks import Chunk, chunk_task
from prefect_batch_llm._engine.provider_batch import ProviderBatch
from prefect_batch_llm._engine.runtime import BatchRuntime
from prefect_batch_llm._engine.source import Source
from prefect_batch_llm._engine.tasks import item_task_for
from prefect_batch_llm._reporting import BatchReport
from prefect_batch_llm.errors import ErrorCategory, describe
from prefect_batch_llm.items import LLMWorkItem
from prefect_batch_llm.results import BatchResult, WorkItemResult

logger = logging.getLogger("prefect_batch_llm")

OnResult = Callable[[WorkItemResult[Any, Any]], Awaitable[None] | None]
_DONE = object()


class ResultHandlerError(RuntimeError):
    """`on_result` raised: the batch stopped early. `result` holds what was accounted."""

    def __init__(self, message: str, result: BatchResult[Any, Any]) -> None:
        super().__init__(message)
        self.result = result


class FinishedTaskRuns:
    """Drops what the flow run context keeps per finished item task run.

    Prefect's `FlowRunContext` links every task run's return value to its state
    (`run_results`, for dependency tracking) and keeps its assets (`task_run_assets`), for the
    flow run's whole life: about 2 KB per item. An item's output reaches the caller only
    through its `WorkItemResult`, never as a task future, so nothing needs those links once
    the item is done; they are dropped in batches, and per-item mode stays flat in memory.
    """

    BATCH = 256

    def __init__(self) -> None:
        self._ids: set[UUID] = set()

    def add(self, task_run_id: UUID | None) -> None:
        if task_run_id is not None:
            self._ids.add(task_run_id)
            if len(self._ids) >= self.BATCH:
                self.prune()

    def prune(self) -> None:
        context = FlowRunContext.get()
        ids, self._ids = self._ids, set()
        if context is None or not ids:
            return
        for task_run_id in ids:
            context.task_run_assets.pop(task_run_id, None)
        stale = [
            key
            for key, (state, *_) in context.run_results.items()
            if state.state_details.task_run_id in ids
        ]
        for key in stale:
            del context.run_results[key]


class BatchRun:
    """Runs one batch to exactly one delivered result per item read from the source."""

    def __init__(
        self,
        source: Source,
        runtime: BatchRuntime,
        report: BatchReport,
        on_result: OnResult | None,
        budget: Budget | None = None,
    ) -> None:
        self.source = source
        self.budget = budget
        self._budget_stopped = False
        self.runtime = runtime
        self.config = runtime.config
        self.report = report
        self.on_result = on_result
        self.taken: dict[int, ItemRun] = {}
        self._seen_ids: set[str] = set()
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._kept: list[tuple[int, WorkItemResult[Any, Any]]] = []
        self._handler_error: BaseException | None = None
        self._forget = FinishedTaskRuns()
        self._stopped: str | None = None
        #: Items taken and not yet given to a worker (Batch Mode reads every item first).
        self._ready: deque[tuple[int, ItemRun]] = deque()
        #: Items read without a slot of `_room` or a budget admission (Batch Mode).
        self._unbounded: set[int] = set()
        # Undelivered results are bounded: a worker takes an item only when there is room.
        size = self.config.items_per_task
        in_flight = self.config.max_workers if size is None else self._chunk_workers() * size
        self._room = asyncio.Semaphore(in_flight + self.config.max_workers)

    def _chunk_workers(self) -> int:
        # Enough chunks in flight to keep max_workers calls busy while one drains its tail.
        size = self.config.items_per_task or 1
        return math.ceil(self.config.max_workers / size) + 1

    # -- taking items ----------------------------------------------------------------------

    async def _take(self, *, may_wait: bool = True) -> tuple[int, ItemRun] | None:
        """The next item to run; ids seen before and non-items become failed results.

        Under a budget cap, the item must be admitted first; a worker that may not wait (a
        chunk worker holding items not yet running) gets None when the budget says wait."""
        while self._stopped is None:
            if self._ready:
                return self._ready.popleft()
            await self._room.acquire()
            if not await self._admit(may_wait):
                self._room.release()
                return None
            taken = await self.source.next()
            if taken is None:
                self._room.release()
                self._unadmit()
                return None
            index, item = taken
            rejected = self._reject(index, item)
            if rejected is not None:
                self._unadmit()
                self._hand_back(index, rejected)
                continue
            run = ItemRun(item, self.runtime)
            self.taken[index] = run
            return index, run
        return None

    async def _admit(self, may_wait: bool) -> bool:
        """Whether the budget cap lets one more item start (always, without a cap)."""
        if self.budget is None:
            return True
        admitted = await self.budget.admit(may_wait=may_wait)
        if admitted and self._stopped is not None:  # stopped while this worker waited
            self._unadmit()
            return False
        if admitted is False and self._stopped is None:
            self._stopped, self._budget_stopped = self.budget.stop_message(), True
        return bool(admitted)

    def _unadmit(self) -> None:
        if self.budget is not None:
            self.budget.unused()

    def _reject(self, index: int, item: Any) -> WorkItemResult[Any, Any] | None:
        if not isinstance(item, LLMWorkItem):
            return WorkItemResult(
                item_id=f"item-{index}",
                success=False,
                error=f"item {index} of the stream is a {type(item).__name__}, not an "
                "LLMWorkItem; yield LLMWorkItem(item_id, strategy, prompt) objects.",
                error_category=ErrorCategory.INVALID_INPUT,
            )
        if item.item_id in self._seen_ids:
            return WorkItemResult(
                item_id=item.item_id,
                success=False,
                error=f"Duplicate item_id {item.item_id!r}: an earlier item of this batch has "
                "the same id; item ids must be unique because results are reported per id. "
                "Give this item another id.",
                error_category=ErrorCategory.INVALID_INPUT,
                context=item.context,
            )
        self._seen_ids.add(item.item_id)
        return None

    def _hand_back(
        self, index: int, result: WorkItemResult[Any, Any], task_run_id: str | None = None
    ) -> None:
        """A final result: off the taken set and into the inbox (never blocks)."""
        run = self.taken.pop(index, None)
        if run is not None and self.budget is not None and index not in self._unbounded:
            self.budget.done(result)
        self._inbox.put_nowait((index, result, task_run_id))

    # -- executing them --------------------------------------------------------------------

    async def _item_worker(self, run_item: Task[..., Any]) -> None:
        while (taken := await self._take()) is not None:
            index, run = taken
            self._hand_back(index, await self._run_item(run_item, run), run.task_run_id)

    async def _run_item(self, run_item: Task[..., Any], run: ItemRun) -> WorkItemResult[Any, Any]:
        try:
            state = await run_item(run.item.item_id, run, return_state=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the task engine itself failed, not the strategy
            return run.fail(
                f"the item's task run crashed: {describe(exc)}", ErrorCategory.TRANSIENT
            )
        task_run_id = state.state_details.task_run_id
        self._forget.add(task_run_id)
        if task_run_id is not None:
            run.task_run_id = str(task_run_id)
        if state.is_completed() and not run.success and run.calls == 0:
            # An earlier run completed this item (cache_results): its stored output.
            return run.cached(await state.aresult())
        if not state.is_completed() and run.error is None:
            return run.fail(
                f"the item's task run ended in state {state.name}: {state.message}",
                ErrorCategory.TRANSIENT,
            )
        return run.result()

    async def _chunk_worker(self, slots: asyncio.Semaphore) -> None:
        size = self.config.items_per_task or 1
        while True:
            items: list[tuple[int, ItemRun]] = []
            while len(items) < size and (taken := await self._take(may_wait=not items)):
                items.append(taken)
            if not items:
                return
            chunk = Chunk(items, slots, self._hand_back)
            state = await chunk_task(chunk.name, chunk, return_state=True)
            if state.is_completed():
                continue
            reason = f"state {state.name}: {state.message}"
            for index, run in items:
                if index in self.taken:
                    self._hand_back(
                        index,
                        run.fail(
                            f"the item's chunk task failed: {reason}", ErrorCategory.TRANSIENT
                        ),
                        run.task_run_id,
                    )

    # -- delivering results ----------------------------------------------------------------

    async def _deliver_all(self) -> None:
        while (entry := await self._inbox.get()) is not _DONE:
            index, result, task_run_id = entry
            try:
                await self._deliver(index, result, task_run_id)
            finally:
                if index in self._unbounded:
                    self._unbounded.discard(index)
                else:
                    self._room.release()

    async def _deliver(
        self, index: int, result: WorkItemResult[Any, Any], task_run_id: str | None
    ) -> None:
        self.runtime.stats.results.add(result)
        if self.config.keep_results:
            self._kept.append((index, result))
        await self.report.on_result(index, result, task_run_id)
        if self.on_result is None or self._handler_error is not None:
            return
        try:
            outcome = self.on_result(result)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as exc:
            self._handler_error = exc
            self._stopped = f"on_result raised {describe(exc)}"
            logger.error(
                "The batch's on_result raised %s: no new items start; the items in flight "
                "finish and are accounted.",
                describe(exc),
            )

    # -- the batch -------------------------------------------------------------------------

    async def run(self) -> BatchResult[Any, Any]:
        stats = self.runtime.stats
        stats.total = self.source.total or 0
        stats.started_at, stats.started_at_wall = time.monotonic(), time.time()
        await self.report.start(self.source.total)
        deliverer = asyncio.create_task(self._deliver_all(), name="deliver results")
        try:
            await self._execute()
            self._finish_unfinished()
            await self._drain_source()
            self._inbox.put_nowait(_DONE)
            await deliverer
        except BaseException:
            deliverer.cancel()
            raise
        finally:
            stats.finished_at = time.monotonic()
            self._forget.prune()
            self.runtime.close()  # a rate-limit storm still open ends with the batch
        self._kept.sort(key=lambda pair: pair[0])
        batch: BatchResult[Any, Any] = BatchResult(
            results=[result for _, result in self._kept],
            totals=stats.results,
            call_totals=stats.call_totals(),
        )
        batch.duration = stats.finished_at - stats.started_at
        if self._handler_error is not None:
            raise ResultHandlerError(
                f"The batch stopped early because on_result raised "
                f"{describe(self._handler_error)}; {batch.total_items} items were accounted "
                f"({batch.succeeded} succeeded).",
                batch,
            ) from self._handler_error
        return batch

    async def _execute(self) -> None:
        config = self.config
        try:
            async with asyncio.timeout(config.batch_timeout):
                await self._provider_jobs()
                async with asyncio.TaskGroup() as group:
                    for worker in self._workers():
                        group.create_task(worker)
        except TimeoutError:
            self._stopped = (
                f"ProcessorConfig.batch_timeout ({config.batch_timeout}s) elapsed before this "
                "item finished; raise batch_timeout or max_workers."
            )
            logger.error(
                "Batch timeout: %.1fs elapsed before every item finished; unfinished items "
                "are reported as failed (category batch_timeout).",
                config.batch_timeout or 0.0,
            )

    def _workers(self) -> list[Coroutine[Any, Any, None]]:
        config = self.config
        if config.items_per_task is None:
            run_item = item_task_for(config)
            return [self._item_worker(run_item) for _ in range(config.max_workers)]
        slots = asyncio.Semaphore(config.max_workers)
        return [self._chunk_worker(slots) for _ in range(self._chunk_workers())]

    async def _provider_jobs(self) -> None:
        """Batch Mode, when the first item's strategy runs its items as provider batch jobs:
        every item is read first, each such strategy's items go through its jobs
        (`ProviderBatch`), then every item goes through its task run as online items do
        (an item its jobs settled only reports its result there; the others retry online)."""
        if self.config.dry_run:
            return  # no provider call at all, jobs included
        first = await self._take()
        if first is None:
            return
        self._ready.append(first)
        # Invalid input lines stand in for items without a strategy of their own: the first
        # real item decides (a malformed first line must not turn Batch Mode off).
        while getattr(first[1].item.strategy, "stands_in", False):
            first = await self._take_unbounded()
            if first is None:
                return
        if first[1].item.strategy.batch_jobs() is None:
            return
        while await self._take_unbounded() is not None:
            pass
        groups: dict[int, list[ItemRun]] = {}
        for _, run in self._ready:
            groups.setdefault(id(run.item.strategy), []).append(run)
        batches = []
        for runs in groups.values():
            strategy = runs[0].item.strategy
            jobs = strategy.batch_jobs()
            if jobs is not None:
                batches.append(ProviderBatch(self.runtime, strategy, jobs, runs).run())
        await asyncio.gather(*batches)

    async def _take_unbounded(self) -> tuple[int, ItemRun] | None:
        """The next item of the source, queued to run, without a slot (Batch Mode)."""
        while (taken := await self.source.next()) is not None:
            index, item = taken
            self._unbounded.add(index)
            rejected = self._reject(index, item)
            if rejected is not None:
                self._hand_back(index, rejected)
                continue
            run = ItemRun(item, self.runtime)
            self.taken[index] = run
            self._ready.append((index, run))
            return index, run
        return None

    def _stop_category(self) -> str:
        if self._handler_error is not None:
            return ErrorCategory.ABORTED
        if self._budget_stopped:
            return ErrorCategory.BUDGET_EXCEEDED
        return ErrorCategory.BATCH_TIMEOUT

    def _finish_unfinished(self) -> None:
        """After the workers stopped: a result for every item taken and not finished."""
        if self._stopped is None:
            return
        for index, run in sorted(self.taken.items()):
            self._hand_back(index, run.fail(self._stopped, self._stop_category()), run.task_run_id)

    async def _drain_source(self) -> None:
        """Items never taken (after a timeout or an abort) get their failed result too."""
        if self._stopped is None:
            return
        message = self._stopped
        if self._handler_error is not None:
            message = f"the batch stopped before this item ran: {message}"
        not_started = 0
        while True:
            await self._room.acquire()
            taken = await self.source.next()
            if taken is None:
                self._room.release()
                break
            index, item = taken
            rejected = self._reject(index, item)
            if rejected is None:
                not_started += 1
                rejected = ItemRun(item, self.runtime).fail(message, self._stop_category())
            self._hand_back(index, rejected)
        if self._budget_stopped and not_started:
            logger.error(
                "%d item(s) not started (category budget_exceeded). %s",
                not_started,
                message,
            )
