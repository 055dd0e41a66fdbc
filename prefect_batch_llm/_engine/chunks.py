"""Large-batch mode: items run in chunk tasks, each item under the same retry policy.

A Prefect task run per item costs a few ms of client CPU and a server write; past a few
hundred items per second that, not the LLM, is the limit. Here one task run carries
`items_per_task` items, executed concurrently in-process by `ItemRun.run_to_completion()` —
the very policy the per-item tasks use — with a batch-wide bound of `max_workers` calls in
flight. Each item's result is handed back to the batch as soon as it is final. A chunk task
that crashes is retried once by Prefect; its items that already finished are not run again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from prefect_batch_llm._engine.attempts import ItemRun
from prefect_batch_llm.results import WorkItemResult

#: Gives the batch an item's final result and the task run that produced it.
HandBack = Callable[[int, WorkItemResult[Any, Any], str | None], None]


class Chunk:
    """One chunk task's items and what they share (a plain object: Prefect does not walk it)."""

    def __init__(
        self, items: list[tuple[int, ItemRun]], slots: asyncio.Semaphore, hand_back: HandBack
    ) -> None:
        self.items = items
        self.slots = slots
        self.hand_back = hand_back
        self.finished: set[int] = set()

    @property
    def name(self) -> str:
        first, last = self.items[0][1].item.item_id, self.items[-1][1].item.item_id
        return f"{first} .. {last} ({len(self.items)} items)"

    async def run_item(self, index: int, run: ItemRun) -> None:
        async with self.slots:
            result = await run.run_to_completion()
        self.finished.add(index)
        self.hand_back(index, result, run.task_run_id)


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
