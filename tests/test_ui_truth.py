"""What a user sees per item and per run in the Prefect UI, read back through the API:
task run names and state messages, the retry bound, failed items' artifacts, the report and
the results table linked to the task runs, and the quiet item logs."""

from __future__ import annotations

import asyncio
import logging
import re
from uuid import UUID

import pytest
from helpers import ScriptedStrategy
from prefect import flow, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.context import get_run_context
from prefect.logging.handlers import APILogHandler

from prefect_batch_llm import (
    LLMWorkItem,
    ModelPricing,
    ParallelBatchProcessor,
    PermanentError,
    ProcessorConfig,
    RateLimitError,
    RetryConfig,
    TransientError,
)
from prefect_batch_llm._reporting import BatchReport, _row, results_table
from prefect_batch_llm.results import WorkItemResult

FAST = RetryConfig(max_attempts=3, initial_wait=0.0, max_wait=0.0, jitter=False)


def items(strategy, n: int):
    for i in range(n):
        yield LLMWorkItem(item_id=f"i{i}", strategy=strategy, prompt=f"p{i} " + "word " * 40)


async def run_in_flow(strategy, n: int, **settings) -> UUID:
    @flow
    async def reported() -> str:
        config = ProcessorConfig(max_workers=2, artifact_key="ui-truth", retry=FAST, **settings)
        pricing = ModelPricing(input_per_million=0.3, output_per_million=2.5)
        details = {"Input": "/data/in.jsonl", "Strategy": "gemini-strategy/x", "Model": "m-1"}
        async with ParallelBatchProcessor(
            config=config, pricing=pricing, destination="/data/out.jsonl", report_details=details
        ) as processor:
            await processor.process_stream(items(strategy, n), total=n)
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]

    return UUID(await reported())


def script(prompt_start: str, errors):
    return {f"{prompt_start} " + "word " * 40: errors}


@pytest.fixture
async def finished_run():
    strategy = ScriptedStrategy(
        {
            **script("p1", [RateLimitError("429 quota", retry_after=0.01)] * 2),
            **script("p2", [PermanentError("400 bad request: field 'x'")]),
            **script("p3", [TransientError("503 overloaded")]),
        }
    )
    flow_run_id = await run_in_flow(strategy, 5)
    await APILogHandler.aflush()
    async with get_client() as client:
        # Task run states reach the server as events: wait until it has recorded them all.
        for _ in range(300):
            task_runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            if len(task_runs) == 5 and all(r.state and r.state.is_final() for r in task_runs):
                break
            await asyncio.sleep(0.1)
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return {r.name: r for r in task_runs}, artifacts, logs


async def test_each_items_task_run_says_outcome_calls_tokens_and_prompt(finished_run):
    task_runs, _, _ = finished_run
    assert set(task_runs) == {"i0", "i1", "i2", "i3", "i4"}, "one task run per item, its id"
    ok = task_runs["i0"].state
    assert ok.is_completed()
    assert ok.message.startswith("succeeded · 1 call(s) · tokens in 100 (cached 0) / out 20")
    assert "prompt: 'p0 word word" in ok.message and "…'" in ok.message, "prompt, truncated"
    failed = task_runs["i2"].state
    assert failed.is_failed()
    assert "permanent" in failed.message and "400 bad request: field 'x'" in failed.message
    assert "1 call(s)" in failed.message and "prompt: 'p2 word" in failed.message


async def test_the_retry_bound_prefect_shows_is_the_attempts_the_policy_allows(finished_run):
    task_runs, _, logs = finished_run
    for run in task_runs.values():
        assert run.empirical_policy.retries == FAST.max_attempts - 1
    # Two rate limits are repeated within one Prefect run: they use no attempt.
    assert task_runs["i1"].state.is_completed() and task_runs["i1"].run_count == 1
    assert "3 call(s)" in task_runs["i1"].state.message
    # A transient error is a Prefect retry: the second run succeeds.
    assert task_runs["i3"].state.is_completed() and task_runs["i3"].run_count == 2
    retry_lines = [log.message for log in logs if log.task_run_id == task_runs["i1"].id]
    assert any(
        "rate_limit: RateLimitError: 429 quota; retry: rate limit 1/10, waiting" in line
        for line in retry_lines
    ), "the task run's logs explain each retry: category, budget and wait"


async def test_a_failed_item_has_an_artifact_on_its_task_run(finished_run):
    task_runs, artifacts, _ = finished_run
    on_task_runs = [a for a in artifacts if a.task_run_id is not None]
    assert [a.task_run_id for a in on_task_runs] == [task_runs["i2"].id], "failed items only"
    text = str(on_task_runs[0].data)
    assert "# Item `i2` failed" in text and "400 bad request: field 'x'" in text
    assert "## Prompt\n\n> p2 word word" in text and "| Category | permanent |" in text
    assert "## Error\n\n> PermanentError: 400 bad request: field 'x'" in text


async def test_report_names_where_it_ran_and_results_link_each_item_in_input_order(finished_run):
    task_runs, artifacts, _ = finished_run
    by_key = {a.key: a for a in artifacts if a.key}
    assert set(by_key) == {"ui-truth-progress", "ui-truth-results", "ui-truth-report"}
    assert by_key["ui-truth-progress"].data == 100.0
    report = str(by_key["ui-truth-report"].data)
    for row in (
        "| Input | /data/in.jsonl |",
        "| Strategy | gemini-strategy/x |",
        "| Model | m-1 |",
        "| Output | /data/out.jsonl |",
        "| Outcome | completed: 1 of 5 items failed (20.0% <= 100% allowed): 1 permanent |",
    ):
        assert row in report, row
    table = str(by_key["ui-truth-results"].data)
    ids = re.findall(r"\| \[(i\d)\]\(\S*/runs/task-run/([0-9a-f-]+)\)", table)
    assert [item for item, _ in ids] == ["i0", "i1", "i2", "i3", "i4"], "input order"
    assert all(str(task_runs[item].id) == run_id for item, run_id in ids), "links"
    assert "**failed** (permanent)" in table and "400 bad request" in table


def result(item_id: str, success: bool, output: str = "x" * 500) -> WorkItemResult[str, None]:
    if success:
        return WorkItemResult(item_id=item_id, success=True, output=output, attempts=1)
    return WorkItemResult(
        item_id=item_id, success=False, error="E: no", error_category="permanent", attempts=3
    )


@pytest.mark.parametrize(
    ("failed_first", "expected"),
    [(False, ["a", "b", "c", "d"]), (True, ["b", "d", "a", "c"])],
)
def test_results_rows_are_in_input_order_or_failures_first(failed_first, expected):
    report = BatchReport(artifacts=False, progress_bar=False, key=None, failed_first=failed_first)
    report._artifacts = True  # collect rows without a flow run
    arrivals = [(2, "c", True), (1, "b", False), (3, "d", False), (0, "a", True)]
    for index, item_id, ok in arrivals:
        report._keep_row(index, result(item_id, ok), None)
    assert [row.item_id for row in report._rows()] == expected


def test_the_table_keeps_every_failure_and_the_first_successes_within_its_bound(monkeypatch):
    monkeypatch.setattr("prefect_batch_llm._reporting.TABLE_ROWS", 4)
    report = BatchReport(artifacts=False, progress_bar=False, key=None)
    report._artifacts = True
    for index in reversed(range(10)):  # arrive in reverse order
        report._keep_row(index, result(f"i{index}", index not in (7, 9)), None)
    assert [row.item_id for row in report._rows()] == ["i0", "i1", "i7", "i9"]


def test_table_cells_are_cut_and_cannot_break_the_table():
    row = _row(0, result("a|b", True, "line one\nline | two " + "y" * 300), "tr-1")
    table = results_table([row], "all 1 items", "input order")
    line = table.splitlines()[-1]
    assert line.count(" | ") == 5 and "\\|" in line and "\n" not in line
    assert "…" in line and len(line) < 400


@pytest.fixture
def info_logs():
    """The suite logs at WARNING (conftest); this test needs Prefect's INFO lines."""
    task_runs = logging.getLogger("prefect.task_runs")
    level = task_runs.level
    task_runs.setLevel(logging.INFO)
    yield
    task_runs.setLevel(level)


@pytest.mark.parametrize("quiet", [False, True])
async def test_quiet_item_logs_keep_batch_lines_retries_and_failures_only(quiet, info_logs):
    strategy = ScriptedStrategy(
        {
            **script("p1", [TransientError("503 overloaded")]),
            **script("p2", [PermanentError("400 bad request")]),
        }
    )
    flow_run_id = await run_in_flow(strategy, 6, quiet_item_logs=quiet)
    await APILogHandler.aflush()
    async with get_client() as client:
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    item_lines = [log for log in logs if log.task_run_id is not None]
    completed = [log for log in item_lines if "Finished in state Completed" in log.message]
    assert len(completed) == (0 if quiet else 5)
    assert all(log.level >= 30 for log in item_lines) == quiet, "only warnings and errors"
    messages = " ".join(log.message for log in item_lines)
    assert "503 overloaded; retry: attempt 2/3" in messages, "retries stay"
    assert "Finished in state Failed" in messages and "400 bad request" in messages
