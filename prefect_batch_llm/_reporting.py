"""What a batch shows while it runs and when it ends: Prefect artifacts and a progress bar.

Progress artifact updates are rate limited (one API call per `PROGRESS_INTERVAL` seconds at
most, never one per item); the table keeps a bounded sample (every failure up to the cap,
failures first), so memory does not grow with the batch.
"""

from __future__ import annotations

import heapq
import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    aupdate_progress_artifact,
)
from prefect.context import FlowRunContext
from prefect.utilities.urls import url_for
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from prefect_batch_llm.results import BatchResult, ModelPricing, WorkItemResult

if TYPE_CHECKING:
    from prefect_batch_llm._engine.attempts import ItemRun

logger = logging.getLogger("prefect_batch_llm")

PROGRESS_INTERVAL = 2.0
TABLE_ROWS = 1000
#: Characters of an output or error in the results table.
CELL = 120


@dataclass(frozen=True)
class _Row:
    """One line of the results table: a few short strings, never the item's whole output."""

    index: int
    item_id: str
    success: bool
    category: str
    text: str  # the output (success) or the error (failure), cut to CELL characters
    tokens: str
    attempts: int
    task_run_id: str | None


def _row(index: int, result: WorkItemResult[Any, Any], task_run_id: str | None) -> _Row:
    usage = result.token_usage
    if result.success:
        text = _cut(result.output, CELL)
        if result.metadata.get("cached_result"):
            text = f"(stored result) {text}"
    else:
        text = _cut(result.error, CELL)
    return _Row(
        index=index,
        item_id=result.item_id,
        success=result.success,
        category=result.error_category or "",
        text=text,
        tokens=(
            f"{usage.get('input_tokens', 0):,} in ({usage.get('cached_input_tokens', 0):,} "
            f"cached) / {usage.get('output_tokens', 0):,} out"
        ),
        attempts=result.attempts,
        task_run_id=task_run_id,
    )


def _cut(value: Any, limit: int) -> str:
    text = "" if value is None else " ".join(str(value)[: limit * 4].split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _quoted(text: str) -> str:
    """Text as a markdown block quote, its markup characters escaped."""
    return "> " + re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|")


class BatchReport:
    """Observes one batch's results and reports them to the Prefect UI and the terminal.

    The results table keeps at most `TABLE_ROWS` rows whatever the batch size: every failure
    up to that many, then the successes that come first in the input.
    """

    def __init__(
        self,
        *,
        artifacts: bool,
        progress_bar: bool | None,
        key: str | None,
        pricing: ModelPricing | None = None,
        details: Mapping[str, str] | None = None,
        failed_first: bool = False,
    ) -> None:
        self._artifacts = artifacts and FlowRunContext.get() is not None
        self._bar_enabled = sys.stderr.isatty() if progress_bar is None else progress_bar
        self._key = key
        self._pricing = pricing
        self._details = dict(details or {})
        self._failed_first = failed_first
        self._progress_id: UUID | None = None
        self._last_update = 0.0
        self._total: int | None = None
        self._done = 0
        self._failed = 0
        self._failures: list[_Row] = []
        # The successes of lowest input index, as a max-heap on the index.
        self._successes: list[tuple[int, _Row]] = []
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

    async def on_result(
        self, index: int, result: WorkItemResult[Any, Any], task_run_id: str | None = None
    ) -> None:
        self._done += 1
        if not result.success:
            self._failed += 1
        if self._artifacts:
            self._keep_row(index, result, task_run_id)
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

    def _keep_row(
        self, index: int, result: WorkItemResult[Any, Any], task_run_id: str | None
    ) -> None:
        if not result.success:
            if len(self._failures) < TABLE_ROWS:
                self._failures.append(_row(index, result, task_run_id))
        elif len(self._successes) < TABLE_ROWS:
            heapq.heappush(self._successes, (-index, _row(index, result, task_run_id)))
        elif index < -self._successes[0][0]:
            heapq.heapreplace(self._successes, (-index, _row(index, result, task_run_id)))

    def _percent(self) -> float:
        if not self._total:
            return 0.0
        return min(100.0, 100.0 * self._done / self._total)

    def _describe(self) -> str:
        total = "?" if self._total is None else str(self._total)
        return f"{self._done} of {total} items done"

    def _rows(self) -> list[_Row]:
        room = max(0, TABLE_ROWS - len(self._failures))
        successes = sorted((row for _, row in self._successes), key=lambda row: row.index)
        rows = sorted([*self._failures, *successes[:room]], key=lambda row: row.index)
        if self._failed_first:
            rows.sort(key=lambda row: row.success)
        return rows

    async def finish(self, batch: BatchResult[Any, Any]) -> None:
        if self._bar is not None:
            self._bar.stop()
        if not self._artifacts:
            return
        if self._progress_id is not None:
            await self._safely(
                aupdate_progress_artifact(self._progress_id, 100.0, description=self._describe())
            )
        rows = self._rows()
        shown = (
            f"{len(rows)} of {batch.total_items} items: every failure up to {TABLE_ROWS}, then "
            "the first successes in input order"
            if batch.total_items > len(rows)
            else f"all {len(rows)} items"
        )
        order = "failures first, then input order" if self._failed_first else "input order"
        await self._safely(
            acreate_markdown_artifact(
                results_table(rows, shown, order),
                key=self._artifact_key("results"),
                description=f"Results per item ({shown}; {order}), linked to their task runs.",
            )
        )
        await self._safely(
            acreate_markdown_artifact(
                markdown_report(batch, self._pricing, self._details),
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


#: The task names of a batch's task runs (one item, one chunk of items).
ITEM_TASK_NAMES = frozenset({"llm-item", "llm-chunk"})


class _QuietItems(logging.Filter):
    """Drops the item task runs' lines below WARNING; retries and failures stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or (
            getattr(record, "task_name", None) not in ITEM_TASK_NAMES
        )


@contextmanager
def quiet_item_logs(enabled: bool) -> Iterator[None]:
    """While the batch runs, keep its item task runs' INFO lines out of the logs (console,
    the Prefect API and the UI): `ProcessorConfig.quiet_item_logs`."""
    if not enabled:
        yield
        return
    task_runs = logging.getLogger("prefect.task_runs")
    quiet = _QuietItems()
    task_runs.addFilter(quiet)
    try:
        yield
    finally:
        task_runs.removeFilter(quiet)


def _task_run_link(item_id: str, task_run_id: str | None) -> str:
    label = _cell(item_id)
    if task_run_id is None:
        return label
    url = url_for("task-run", obj_id=task_run_id) or f"/runs/task-run/{task_run_id}"
    return f"[{label}]({url})"


def results_table(rows: list[_Row], shown: str, order: str) -> str:
    """The results artifact: a markdown table, each id linked to the item's task run."""
    lines = [
        "# Results per item",
        "",
        f"{shown.capitalize()}; {order}. Every item is in the results file.",
        "",
        "| # | id | outcome | output or error | tokens | calls |",
        "|---:|---|---|---|---|---:|",
    ]
    for row in rows:
        outcome = "succeeded" if row.success else f"**failed** ({row.category})"
        lines.append(
            f"| {row.index + 1} | {_task_run_link(row.item_id, row.task_run_id)} | {outcome} | "
            f"{_cell(row.text)} | {row.tokens} | {row.attempts} |"
        )
    return "\n".join(lines) + "\n"


async def report_failed_item(run: ItemRun) -> None:
    """A small markdown artifact on a failed item's task run (the first 100 failures of a
    batch, `FAILED_ITEM_ARTIFACTS`; every failure's error is in its state message)."""
    if not run.runtime.take_failure_artifact():
        return
    result = run.result()
    usage = result.token_usage
    retries = ", ".join(f"{k}: {v}" for k, v in sorted(result.retries_by_category.items()))
    rows = [
        ("Category", result.error_category or ""),
        ("Calls", str(result.attempts)),
        ("Retries", retries or "none"),
        (
            "Tokens",
            f"{usage.get('input_tokens', 0):,} in ({usage.get('cached_input_tokens', 0):,} "
            f"cached) / {usage.get('output_tokens', 0):,} out",
        ),
    ]
    # The error and the prompt are long: quoted paragraphs wrap, where a table cell would not.
    markdown = "\n".join(
        [f"# Item `{result.item_id}` failed", "", "| | |", "|---|---|"]
        + [f"| {name} | {_cell(value)} |" for name, value in rows]
        + ["", "## Error", "", _quoted(_cut(result.error, 2000))]
        + ["", "## Prompt", "", _quoted(_cut(run.item.prompt, 500))]
    )
    try:
        await acreate_markdown_artifact(markdown, description=f"Why item {result.item_id} failed")
    except Exception as exc:  # reporting never fails an item
        logger.warning("Could not write a failed item's artifact: %s", type(exc).__name__)


def markdown_report(
    batch: BatchResult[Any, Any],
    pricing: ModelPricing | None,
    details: Mapping[str, str] | None = None,
) -> str:
    """The batch report: where it ran (`details`: input, strategy, model, output), the
    verdict, items, tokens, cache hit rate, cost, latency, time, retries and failures."""
    summary = batch.summary(pricing)
    lines = ["# LLM batch report", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in (details or {}).items()]
    lines += [
        f"| Outcome | {summary['outcome']}: {_cell(summary['outcome_message'])} |",
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
    if summary["price_paths"]:
        lines.append(f"| Price paths | {', '.join(summary['price_paths'])} |")
    if "estimated_cost_usd" in summary:
        cost = f"${summary['estimated_cost_usd']:.4f}"
        by_path = summary.get("cost_by_path_usd")
        if by_path and pricing is not None:
            split = ", ".join(f"{path} ${usd:.4f}" for path, usd in sorted(by_path.items()))
            standard = pricing.cost(
                batch.total_input_tokens, batch.total_output_tokens, batch.total_cached_tokens
            )
            cost += f" ({split}; ${standard:.4f} at standard prices)"
        lines.append(f"| Estimated cost | {cost} |")
    if summary.get("latency_p50_seconds") is not None:
        lines.append(
            "| Call latency p50 / p95 / p99 | "
            f"{summary['latency_p50_seconds']:.2f} / {summary['latency_p95_seconds']:.2f} / "
            f"{summary['latency_p99_seconds']:.2f} s |"
        )
    if summary.get("attempts_mean") is not None:
        lines.append(
            f"| Calls per item (mean / max) | {summary['attempts_mean']:.2f} / "
            f"{summary['attempts_max']} |"
        )
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
