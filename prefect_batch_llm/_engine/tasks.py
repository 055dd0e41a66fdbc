"""The two Prefect tasks, each defined once: one item, and one chunk of items.

A batch configures them with `.with_options()` (retry bound, result persistence); the
retry decision travels with the raised `ItemAttemptFailed`, read by `retry_condition_fn`.
An item's task run ends with a state message that says what happened to it (outcome, calls,
tokens, the prompt's start); a failed item's task run also gets a small markdown artifact.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import Completed, State

from prefect_batch_llm._engine.attempts import ItemAttemptFailed, ItemRun
from prefect_batch_llm._reporting import report_failed_item
from prefect_batch_llm.config import ProcessorConfig


async def _llm_item(item_id: str, run: ItemRun) -> Any:
    """The item's attempts: Prefect retries a failed attempt when its decision says so;
    rate-limit and cache-renewal retries, which use no attempt, repeat within this run."""
    while True:
        try:
            output = await run.attempt()
        except ItemAttemptFailed as failure:
            if failure.retry and failure.in_place:
                continue
            if failure.retry:
                raise
            # A failed item is never persisted: only successful outputs are resume data.
            context = TaskRunContext.get()
            if context is not None:
                context.persist_result = False
            await report_failed_item(run)
            raise ItemAttemptFailed(f"{failure} · {run.facts()}") from None
        # The state message is what the UI shows for the item: outcome, calls, tokens, prompt.
        return Completed(data=output, message=f"succeeded · {run.facts()}")


def _retry_as_decided(_task: Task[..., Any], _task_run: TaskRun, state: State[Any]) -> bool:
    failure = state.data
    return isinstance(failure, ItemAttemptFailed) and failure.retry


llm_item: Task[..., Any] = task(
    name="llm-item",
    task_run_name="{item_id}",
    retry_delay_seconds=0,
    retry_condition_fn=_retry_as_decided,
    cache_policy=NO_CACHE,
    persist_result=False,
)(_llm_item)


def resume_key(_context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Result key of an item: its id, prompt and context and its strategy's answer
    fingerprint (model, generation settings, cached content; no secrets, no timeouts)."""
    run: ItemRun = parameters["run"]
    item = run.item
    payload = json.dumps(
        [item.item_id, item.prompt, item.context, run.runtime.fingerprint_for(item.strategy)],
        default=repr,
        sort_keys=True,
    )
    return f"llm-item-{hashlib.sha256(payload.encode()).hexdigest()}"


def item_task_for(config: ProcessorConfig) -> Task[..., Any]:
    """The item task with this batch's retry bound and result persistence."""
    retry = config.retry
    # Prefect retries an attempt the policy allows; each one is decided by the item's policy.
    retries = retry.max_attempts - 1
    if not config.cache_results:
        return llm_item.with_options(retries=retries)
    ttl = config.result_ttl_seconds
    return llm_item.with_options(
        retries=retries,
        cache_policy=CacheKeyFnPolicy(cache_key_fn=resume_key),
        persist_result=True,
        refresh_cache=config.refresh_cache,
        cache_expiration=timedelta(seconds=ttl) if ttl is not None else None,
    )
