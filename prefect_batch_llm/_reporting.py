"""What a batch shows while it runs and when it ends: Prefect artifacts and a progress bar.

Progress artifact updates are rate limited (one API call per `PROGRESS_INTERVAL` seconds at
most, never one per item); the table keeps a bounded sample (every failure up to the cap,
failures first), so memory does not grow with the batch.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.context import FlowRunContext
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from prefect_batch_llm.results import BatchResult, ModelPricing, WorkItemResult

logger = logging.getLogger("prefect_batch_llm")

PROGRESS_INTERVAL = 2.0
TABLE_ROWS = 1000


class BatchReport:
    """Observes one batch's results and reports them to the Prefect UI and the terminal."""

    def __init__(
        self,
        *,
        artifacts: bool,
        progress_bar: bool | None,
        key: str | None,
        pricing: ModelPricing | None = None,
    ) -> None:
        self._artifacts = artifacts and FlowRunContext.get() is not None
        self._bar_enabled = sys.stderr.isatty() if progress_bar is None else progress_bar
        self._key = key
        self._pricing = pricing
        self._progress_id: UUID | None = None
        self._last_update = 0.0
        self._total: int | None = None
        self._done = 0
        self._failed = 0
        self._failures: list[WorkItemResult[Any, Any]] = []
        self._successes: list[WorkItemResult[Any, Any]] = []
        self._bar: Progress | None = None
        self._bar_task: Any = None

    def _artifact_key(self, suffix: str) -> str | None:
        return f"{self._key}-{suffix}" if self._key else None

    async def start(self, total: int | None) -> None:
        self._total = total
        if self._bar_enabled:
            self._bar = Progress(
                TextColumn("[bold]LLM batch"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[failed]} failed"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._bar.start()
            self._bar_task = self._bar.add_task("items", total=total, failed=0)
        if self._artifacts:
            self._progress_id = await self._safely(
                acreate_progress_artifact(
                    0.0, key=self._artifact_key("progress"), description=self._describe()
                )
            )

    async def on_result(self, result: WorkItemResult[Any, Any]) -> None:
        self._done += 1
        if not result.success:
            self._failed += 1
            if len(self._failures) < TABLE_ROWS:
                self._failures.append(result)
        elif len(self._successes) < TABLE_ROWS:
            self._successes.append(result)
        if self._bar is not None:
            self._bar.update(self._bar_task, completed=self._done, failed=self._failed)
        now = time.monotonic()
        if self._progress_id is not None and now - self._last_update >= PROGRESS_INTERVAL:
            self._last_update = now
            await self._safely(
                aupdate_progress_artifact(
                    self._progress_id, self._percent(), description=self._describe()
                )
            )

    def _percent(self) -> float:
        if not self._total:
            return 0.0
        return min(100.0, 100.0 * self._done / self._total)

    def _describe(self) -> str:
        total = "?" if self._total is None else str(self._total)
        return f"{self._done} of {total} items done"

    async def finish(self, batch: BatchResult[Any, Any]) -> None:
        if self._bar is not None:
            self._bar.stop()
        if not self._artifacts:
            return
        if self._progress_id is not None:
            await self._safely(
                aupdate_progress_artifact(self._progress_id, 100.0, description=self._describe())
            )
        rows = [
            {
                "id": r.item_id,
                "success": r.success,
                "category": r.error_category or "",
                "error": r.error or "",
                "attempts": r.attempts,
            }
            for r in [*self._failures, *self._successes][:TABLE_ROWS]
        ]
        shown = (
            f"first {len(rows)} of {batch.total_items}" if batch.total_items > len(rows) else "all"
        )
        await self._safely(
            acreate_table_artifact(
                rows,
                key=self._artifact_key("results"),
                description=f"Items, failures first ({shown} items).",
            )
        )
        await self._safely(
            acreate_markdown_artifact(
                markdown_report(batch, self._pricing),
                key=self._artifact_key("report"),
                description="LLM batch report",
            )
        )

    @staticmethod
    async def _safely(call: Any) -> Any:
        """Reporting never fails a batch: an artifact API error is logged and skipped."""
        try:
            return await call
        except Exception as exc:
            logger.warning("Could not write a batch artifact: %s: %s", type(exc).__name__, exc)
            return None


def markdown_report(batch: BatchResult[Any, Any], pricing: ModelPricing | None) -> str:
    """The batch report: items, success rate, tokens, cache hit rate, cost, time, retries."""
    summary = batch.summary(pricing)
    lines = [
        "# LLM batch report",
        "",
        "| | |",
        "|---|---|",
        f"| Outcome | {summary['outcome']}: {summary['outcome_message']} |",
        f"| Items | {summary['total_items']} |",
        f"| Succeeded | {summary['succeeded']} |",
        f"| Failed | {summary['failed']} |",
        f"| Success rate | {summary['success_rate']:.1f}% |",
        f"| Input tokens | {summary['total_input_tokens']:,} |",
        f"| Output tokens | {summary['total_output_tokens']:,} |",
        f"| Cached input tokens | {summary['total_cached_tokens']:,} |",
        f"| Cache hit rate | {summary['cache_hit_rate']:.1f}% |",
        f"| Effective input tokens | {summary['effective_input_tokens']:,} |",
    ]
    if "estimated_cost_usd" in summary:
        lines.append(f"| Estimated cost | ${summary['estimated_cost_usd']:.4f} |")
    lines.append(f"| Wall time | {summary['duration_seconds']:.1f} s |")
    for title, counts in (
        ("Retries by category", summary["retries_by_category"]),
        ("Failures by category", summary["errors_by_category"]),
    ):
        lines += ["", f"## {title}", ""]
        if counts:
            lines += ["| category | count |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in sorted(counts.items())]
        else:
            lines.append("None.")
    return "\n".join(lines) + "\n"
