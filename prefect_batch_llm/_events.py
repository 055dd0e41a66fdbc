"""Prefect events a batch emits, for automations ("notify me when > 1% of items fail")."""

from __future__ import annotations

import logging
from typing import Any

from prefect.context import FlowRunContext
from prefect.events import emit_event

from prefect_batch_llm.results import BatchResult, ModelPricing

logger = logging.getLogger("prefect_batch_llm")

#: Emitted when a batch ends: `.completed`, or `.failed` when its failure policy says so
#: (or when it stopped early).
BATCH_EVENT_PREFIX = "prefect-batch-llm.batch"


async def emit_batch_event(
    batch: BatchResult[Any, Any],
    *,
    pricing: ModelPricing | None,
    destination: str | None,
    aborted: str | None = None,
) -> None:
    """Emit `prefect-batch-llm.batch.completed` or `.failed` about the current flow run.

    Payload: counts by outcome and error category, tokens, cost (when priced), the policy
    verdict and where the results went.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
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
    flow_run = context.flow_run
    try:
        emit_event(
            event=f"{BATCH_EVENT_PREFIX}.{'failed' if failed else 'completed'}",
            resource={
                "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                "prefect.resource.name": flow_run.name,
            },
            payload=payload,
        )
    except Exception as exc:  # reporting never fails a batch
        logger.warning("Could not emit the batch event: %s: %s", type(exc).__name__, exc)
