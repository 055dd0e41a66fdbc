"""The two Prefect tasks, each defined once: one item, and one chunk of items.

A batch configures them with `.with_options()` (retry bound, result persistence); the
retry decision travels with the raised `ItemAttemptFailed`, read by `retry_condition_fn`.
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
from prefect.states import State

from prefect_batch_llm._engine.attempts import ItemAttemptFailed, ItemRun
from prefect_batch_llm._engine.decision import CACHE_EXPIRED_RETRIES
from prefect_batch_llm.config import ProcessorConfig


async def _llm_item(item_id: str, run: ItemRun) -> Any:
    """One attempt of one item; Prefect retries it when the attempt's decision says so."""
    try:
        return await run.attempt()
    except ItemAttemptFailed as failure:
        if not failure.retry:
            # A failed item is never persisted: only successful outputs are resume data.
            context = TaskRunContext.get()
            if context is not None:
                context.persist_result = False
        raise


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
    # The most retries an item can take; each one is decided by the item's policy.
    retries = retry.max_attempts - 1 + retry.max_rate_limit_retries + CACHE_EXPIRED_RETRIES
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
