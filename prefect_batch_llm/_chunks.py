"""Large-batch mode: items run in chunk tasks, each item under the same retry policy.

A Prefect task run per item costs a few ms of client CPU and a server write; past a few
hundred items per second that, not the LLM, is the limit. Here one task run carries
`items_per_task` items, executed concurrently in-process by `ItemRun.run_to_completion()` —
the very policy the per-item tasks use (classifier, waits, cooldowns, deadlines, accounting,
lifecycle) — with a batch-wide bound of `max_workers` calls in flight. Each item still gets
its own result as soon as it is final. A chunk task that crashes is retried by Prefect; its
items that already finished are not run again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from prefect_batch_llm._attempts import ItemRun
from prefect_batch_llm.errors import ErrorCategory, describe
from prefect_batch_llm.results import WorkItemResult

Finish = Callable[[int, WorkItemResult[Any, Any]], Awaitable[None]]


class Chunk:
    """One chunk task's items and what they share (a plain object: Prefect does not walk it)."""

    def __init__(
        self,
        items: list[tuple[int, ItemRun]],
        slots: asyncio.Semaphore,
        finish: Finish,
        in_flight: dict[int, ItemRun],
    ) -> None:
        self.items = items
        self.slots = slots
        self.finish = finish
        self.in_flight = in_flight
        self.finished: set[int] = set()

    @property
    def name(self) -> str:
        first, last = self.items[0][1].item.item_id, self.items[-1][1].item.item_id
        return f"{first} .. {last} ({len(self.items)} items)"

    async def run_item(self, index: int, run: ItemRun) -> None:
        async with self.slots:
            self.in_flight[index] = run
            try:
                result = await run.run_to_completion()
            finally:
                self.in_flight.pop(index, None)
        self.finished.add(index)
        await self.finish(index, result)


async def _llm_chunk(chunk_name: str, chunk: Chunk) -> int:
    """Run the chunk's unfinished items concurrently; returns how many finished."""
    async with asyncio.TaskGroup() as group:
        for index, run in chunk.items:
            if index not in chunk.finished:
                group.create_task(chunk.run_item(index, run))
    return len(chunk.finished)


chunk_task: Task[..., Any] = task(
    name="llm-chunk",
    task_run_name="{chunk_name}",
    retries=1,
    retry_delay_seconds=0,
    cache_policy=NO_CACHE,
    persist_result=False,
)(_llm_chunk)


async def run_chunk(chunk: Chunk) -> None:
    """Run one chunk task; items it could not finish get a failed result each."""
    state = await chunk_task(chunk.name, chunk, return_state=True)
    if state.is_completed():
        return
    try:
        await state.aresult()
        reason = f"state {state.name}"
    except Exception as exc:
        reason = describe(exc)
    for index, run in chunk.items:
        if index not in chunk.finished:
            chunk.finished.add(index)
            result = run.fail(f"the item's chunk task failed: {reason}", ErrorCategory.TRANSIENT)
            await chunk.finish(index, result)
