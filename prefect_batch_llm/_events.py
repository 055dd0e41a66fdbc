"""Prefect events a batch emits, for automations ("notify me when > 1% of items fail",
"page me when a rate-limit storm starts").

Every event is about the current flow run (resource `prefect.flow-run.<id>`); outside a flow
run nothing is emitted, and a failure to emit is a logged warning, never a failed batch.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect.context import FlowRunContext
from prefect.events import emit_event

from prefect_batch_llm._engine.rate_limit import CooldownEvent, CooldownObserver, CooldownStarted
from prefect_batch_llm._secrets import scrub
from prefect_batch_llm.results import BatchResult, ModelPricing

logger = logging.getLogger("prefect_batch_llm")

#: Emitted when a batch ends: `.completed`, or `.failed` when its failure policy says so
#: (or when it stopped early).
BATCH_EVENT_PREFIX = "prefect-batch-llm.batch"
#: Emitted once per rate-limit storm of a scope: `.started` at its first 429, `.ended` when
#: a call after the pause succeeded (or when the batch ended during the storm).
COOLDOWN_EVENT_PREFIX = "prefect-batch-llm.rate-limit.cooldown"
#: The summary keys about calls the batch event carries too.
CALL_SUMMARY_KEYS = (
    "latency_p50_seconds",
    "latency_p95_seconds",
    "latency_p99_seconds",
    "attempts_mean",
    "attempts_max",
    "calls",
    "rate_limited_calls",
    "cooldown_seconds",
)


def _flow_run_resource() -> dict[str, str] | None:
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    flow_run = context.flow_run
    return {
        "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
        "prefect.resource.name": flow_run.name,
    }


def _emit(event: str, resource: dict[str, str], payload: dict[str, Any]) -> None:
    try:
        emit_event(event=event, resource=resource, payload=payload)
    except Exception as exc:  # reporting never fails a batch
        logger.warning("Could not emit the %s event: %s: %s", event, type(exc).__name__, exc)


def cooldown_event_emitter() -> CooldownObserver | None:
    """A rate-limiter observer that emits the cooldown events about the current flow run;
    None outside a flow run.

    `prefect-batch-llm.rate-limit.cooldown.started` payload: `scope`, `wait_seconds`,
    `retry_after_seconds` (None when the provider gave none) and `cooldowns` (storms of the
    scope so far in this batch, this one included). `...cooldown.ended` payload: `scope`,
    `paused_seconds`, `rate_limited_calls` (429s in the storm) and `resumed` (False when the
    batch ended during the storm).
    """
    resource = _flow_run_resource()
    if resource is None:
        return None

    def emit(event: CooldownEvent) -> None:
        payload: dict[str, Any]
        if isinstance(event, CooldownStarted):
            name = "started"
            payload = {
                "scope": scrub(event.scope),
                "wait_seconds": round(event.wait_seconds, 3),
                "retry_after_seconds": event.retry_after_seconds,
                "cooldowns": event.cooldowns,
            }
        else:
            name = "ended"
            payload = {
                "scope": scrub(event.scope),
                "paused_seconds": round(event.paused_seconds, 3),
                "rate_limited_calls": event.rate_limited_calls,
                "resumed": event.resumed,
            }
        _emit(f"{COOLDOWN_EVENT_PREFIX}.{name}", resource, payload)

    return emit


async def emit_batch_event(
    batch: BatchResult[Any, Any],
    *,
    pricing: ModelPricing | None,
    destination: str | None,
    aborted: str | None = None,
) -> None:
    """Emit `prefect-batch-llm.batch.completed` or `.failed` about the current flow run.

    Payload: counts by outcome and error category, tokens, cost (when priced), the policy
    verdict, where the results went, and the call summary (`CALL_SUMMARY_KEYS`: latency
    percentiles, attempts, calls, rate-limited calls, cooldown seconds).
    """
    resource = _flow_run_resource()
    if resource is None:
        return
    outcome = batch.outcome
    failed = outcome.failed or aborted is not None
    summary = batch.summary(pricing)
    payload: dict[str, Any] = {
        "total_items": summary["total_items"],
        "succeeded": summary["succeeded"],
        "failed": summary["failed"],
        "errors_by_category": summary["errors_by_category"],
        "input_tokens": summary["total_input_tokens"],
        "output_tokens": summary["total_output_tokens"],
        "cached_input_tokens": summary["total_cached_tokens"],
        "estimated_cost_usd": summary.get("estimated_cost_usd"),
        "max_failed_fraction": batch.max_failed_fraction,
        "message": aborted or outcome.message,
        "output": destination,
        "duration_seconds": summary["duration_seconds"],
    }
    payload.update({key: summary[key] for key in CALL_SUMMARY_KEYS})
    _emit(f"{BATCH_EVENT_PREFIX}.{'failed' if failed else 'completed'}", resource, payload)
