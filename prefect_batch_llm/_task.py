"""The Prefect task that runs one work item, retried by the item's own retry policy."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.utilities.annotations import NotSet

from prefect_batch_llm._attempts import BatchRuntime, ItemRun


async def _llm_item(item_id: str, run: ItemRun) -> Any:
    """One attempt of one item; Prefect retries it when the item's policy says so."""
    context = TaskRunContext.get()
    if context is not None:
        run.task_run_id = context.task_run.id
        run.runtime.runs_by_task_run[run.task_run_id] = run
    return await run.attempt()


def item_task(runtime: BatchRuntime) -> Task[..., Any]:
    """A task whose `retry_condition_fn` reads the retry decision its last attempt took.

    Prefect's own retry delay stays 0: the item waits (Retry-After, backoff, shared
    cooldown) at the start of its next attempt, which Prefect cannot do per exception.
    """
    runs: dict[UUID, ItemRun] = runtime.runs_by_task_run

    async def retry_by_policy(_task: Task[..., Any], task_run: TaskRun, _state: State) -> bool:
        run = runs.get(task_run.id)
        return run is not None and run.retry

    # With cache_results, completed items' outputs are persisted under a key of item id,
    # prompt, context and strategy configuration: a re-run (even after SIGKILL) skips them.
    caching = runtime.config.cache_results
    return task(
        name="llm-item",
        task_run_name="{item_id}",
        retries=runtime.prefect_retries,
        retry_delay_seconds=0,
        retry_condition_fn=retry_by_policy,
        cache_policy=NotSet if caching else NO_CACHE,
        cache_key_fn=_cache_key if caching else None,
        persist_result=caching,
        refresh_cache=runtime.config.refresh_cache if caching else None,
    )(_llm_item)


def _cache_key(_context: TaskRunContext, parameters: dict[str, Any]) -> str:
    run: ItemRun = parameters["run"]
    return run.cache_key()
