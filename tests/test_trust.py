"""The run's state tells the truth, and resume never serves a stale answer or stores a failure.

Each test runs the deployable `batch-llm` flow (as a deployment would) against the emulator,
on the session's Prefect test server.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest
from helpers import mounted_tmpfs
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.settings import PREFECT_HOME
from pydantic import SecretStr

from prefect_batch_llm.flows import batch_llm
from prefect_batch_llm.gemini import GeminiCachedStrategy, GeminiCredentials, GeminiStrategy
from prefect_batch_llm.testing import Fault, GeminiEmulator

FAST = {"max_workers": 4, "report_artifacts": False, "retry": {"initial_wait": 0.01}}


@pytest.fixture
def emulator():
    with GeminiEmulator() as running:
        yield running


def write_items(path: Path, prompts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def events_for(flow_run_id: uuid.UUID, prefix: str = "prefect-batch-llm.batch") -> list:
    """The batch events about a flow run, read back from the server (emitted asynchronously)."""
    wanted = EventFilter(
        event=EventNameFilter(prefix=[prefix]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
    )
    deadline = time.monotonic() + 20
    async with get_client() as client:
        while True:
            page = await client.read_events(filter=wanted, limit=50)
            if page.events or time.monotonic() > deadline:
                return list(page.events)
            await asyncio.sleep(0.5)


async def test_a_run_where_every_item_fails_ends_failed_after_writing_every_result(
    emulator, tmp_path, monkeypatch
):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    await GeminiStrategy(credentials=GeminiCredentials(base_url=emulator.base_url)).save(
        "no-key", overwrite=True
    )
    source = write_items(tmp_path / "items.jsonl", [f"question {i}" for i in range(20)])
    output = tmp_path / "results.jsonl"
    state = await batch_llm(
        input=str(source),
        strategy="gemini-strategy/no-key",
        output=str(output),
        config=FAST,
        return_state=True,
    )
    assert state.is_failed(), state
    assert "20 of 20 items failed (every item failed): 20 prepare_failed" in state.message
    assert str(output) in state.message
    results = lines(output)
    assert len(results) == 20 and all(r["category"] == "prepare_failed" for r in results)
    assert "No Gemini API key" in results[0]["error"]
    assert emulator.stats()["generate_calls"] == 0

    (event,) = await events_for(state.state_details.flow_run_id)
    assert event.event == "prefect-batch-llm.batch.failed"
    assert event.payload["failed"] == 20 and event.payload["succeeded"] == 0
    assert event.payload["errors_by_category"] == {"prepare_failed": 20}
    assert event.payload["output"] == str(output)


async def test_failures_above_the_allowed_fraction_fail_the_run_below_it_complete(
    emulator, tmp_path
):
    await GeminiStrategy(
        credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url)
    ).save("outcome", overwrite=True)
    emulator.add_fault(Fault(kind="400", prompt_contains="refuse"))
    tag = uuid.uuid4().hex[:8]  # fresh prompts: no stored result from another test
    prompts = [f"{tag} refuse {i}" if i < 2 else f"{tag} question {i}" for i in range(20)]
    source = write_items(tmp_path / "items.jsonl", prompts)

    # The flow's default allows 5%: 2 of 20 is 10%.
    state = await batch_llm(
        input=str(source),
        strategy="gemini-strategy/outcome",
        output=str(tmp_path / "strict.jsonl"),
        config=FAST,
        return_state=True,
    )
    assert state.is_failed()
    assert "2 of 20 items failed (10.0% > 5% allowed): 2 permanent" in state.message
    assert len(lines(tmp_path / "strict.jsonl")) == 20, "results are complete before failing"
    (event,) = await events_for(state.state_details.flow_run_id)
    assert event.event == "prefect-batch-llm.batch.failed"

    # A partial config keeps the flow's other defaults (resume on: nothing is called again).
    calls = emulator.stats()["generate_calls"]
    summary = await batch_llm(
        input=str(source),
        strategy="gemini-strategy/outcome",
        output=str(tmp_path / "lenient.jsonl"),
        config={**FAST, "max_failed_fraction": 0.1},
    )
    assert summary["outcome"] == "completed" and summary["failed"] == 2
    assert "2 of 20 items failed (10.0% <= 10% allowed)" in summary["outcome_message"]
    assert emulator.stats()["generate_calls"] == calls + 2, "only the failed items ran again"
    cached = [r for r in lines(tmp_path / "lenient.jsonl") if r.get("cached")]
    assert len(cached) == 18


async def test_inputs_with_nothing_valid_never_complete(emulator, tmp_path):
    await GeminiStrategy(
        credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url)
    ).save("nothing-valid", overwrite=True)
    no_prompt = tmp_path / "no_prompt.csv"
    no_prompt.write_text("id,question\na,what?\nb,why?\n")
    state = await batch_llm(
        input=str(no_prompt),
        strategy="gemini-strategy/nothing-valid",
        output=str(tmp_path / "a.jsonl"),
        return_state=True,
    )
    assert state.is_failed() and "2 of 2 items failed (every item failed)" in state.message

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    state = await batch_llm(
        input=str(empty),
        strategy="gemini-strategy/nothing-valid",
        output=str(tmp_path / "b.jsonl"),
        return_state=True,
    )
    assert state.is_failed() and "has no items" in state.message
    assert emulator.stats()["generate_calls"] == 0


HANDBOOK = "Returns are accepted within 30 days of delivery. " * 100  # > 1,024 tokens


async def test_resume_keys_on_cached_document_content_not_on_connection_settings(
    emulator, tmp_path
):
    document = tmp_path / "handbook.txt"
    document.write_text(HANDBOOK)
    tag = uuid.uuid4().hex[:8]
    source = write_items(
        tmp_path / "items.jsonl", [f"{tag} how long to return {i}?" for i in range(5)]
    )

    async def run(name: str, timeout_seconds: float = 120.0) -> list[dict]:
        await GeminiCachedStrategy(
            credentials=GeminiCredentials(
                api_key=SecretStr("k"), base_url=emulator.base_url, timeout_seconds=timeout_seconds
            ),
            cached_document_paths=[str(document)],
        ).save("resume-content", overwrite=True)
        output = tmp_path / f"{name}.jsonl"
        await batch_llm(
            input=str(source),
            strategy="gemini-cached-strategy/resume-content",
            output=str(output),
            config=FAST,
        )
        return lines(output)

    assert not any(r.get("cached") for r in await run("first"))
    calls = emulator.stats()["generate_calls"]
    again = await run("same-content-other-timeout", timeout_seconds=30.0)
    assert all(r.get("cached") for r in again), "connection settings do not change an answer"
    assert emulator.stats()["generate_calls"] == calls

    document.write_text(HANDBOOK.replace("30 days", "7 days"))
    changed = await run("changed-content")
    assert not any(r.get("cached") for r in changed), "a changed document is a new answer"
    assert emulator.stats()["generate_calls"] == calls + 5


async def test_stored_results_expire_after_the_configured_time(emulator, tmp_path):
    await GeminiStrategy(
        credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url)
    ).save("ttl", overwrite=True)
    tag = uuid.uuid4().hex[:8]
    source = write_items(tmp_path / "items.jsonl", [f"{tag} q{i}" for i in range(3)])
    # 8 s: the second run starts within it even on a loaded machine (2 s flaked in CI).
    config = {**FAST, "result_ttl_seconds": 8}
    kwargs = {"input": str(source), "strategy": "gemini-strategy/ttl", "config": config}
    await batch_llm(output=str(tmp_path / "1.jsonl"), **kwargs)
    stored = time.monotonic()
    await batch_llm(output=str(tmp_path / "2.jsonl"), **kwargs)
    assert all(r.get("cached") for r in lines(tmp_path / "2.jsonl"))
    await asyncio.sleep(max(0.0, stored + 8.5 - time.monotonic()))
    await batch_llm(output=str(tmp_path / "3.jsonl"), **kwargs)
    assert not any(r.get("cached") for r in lines(tmp_path / "3.jsonl")), "expired results rerun"
    assert emulator.stats()["generate_calls"] == 6


def stored_results() -> set[Path]:
    storage = Path(PREFECT_HOME.value()) / "storage"
    return {p for p in storage.rglob("*") if p.is_file()} if storage.exists() else set()


async def test_failed_items_write_nothing_to_result_storage(emulator, tmp_path):
    await GeminiStrategy(
        credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url)
    ).save("persist", overwrite=True)
    tag = uuid.uuid4().hex[:8]
    emulator.add_fault(Fault(kind="400", prompt_contains=f"{tag} bad"))
    emulator.add_fault(Fault(kind="503", prompt_contains=f"{tag} flaky"))
    prompts = [f"{tag} bad {i}" for i in range(4)] + [f"{tag} flaky {i}" for i in range(4)]
    prompts += [f"{tag} good {i}" for i in range(3)]
    before = stored_results()
    await batch_llm(
        input=str(write_items(tmp_path / "items.jsonl", prompts)),
        strategy="gemini-strategy/persist",
        output=str(tmp_path / "out.jsonl"),
        config={
            **FAST,
            "max_failed_fraction": 1.0,
            "retry": {"max_attempts": 2, "initial_wait": 0.01},
        },
    )
    by_category = [r["category"] for r in lines(tmp_path / "out.jsonl")]
    assert by_category.count("permanent") == 4 and by_category.count("transient") == 4
    new = stored_results() - before
    assert len(new) == 3, f"only the 3 successes are stored, found {len(new)}"


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 16 KiB tmpfs, so writes fail with a real ENOSPC (needs root and mount)."""
    yield from mounted_tmpfs(tmp_path / "tiny", "16k")


async def test_a_full_disk_ends_the_run_clearly_and_keeps_the_previous_results(
    emulator, tmp_path, tiny_disk
):
    await GeminiStrategy(
        credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url)
    ).save("full-disk", overwrite=True)
    tag = uuid.uuid4().hex[:8]
    source = write_items(tmp_path / "items.jsonl", [f"{tag} question {i}" for i in range(150)])
    output = tiny_disk / "results.jsonl"
    output.write_text('{"id": "last night"}\n')
    state = await batch_llm(
        input=str(source),
        strategy="gemini-strategy/full-disk",
        output=str(output),
        config=FAST,
        return_state=True,
    )
    assert state.is_failed()
    assert "No space left on device" in state.message and "items were accounted" in state.message
    assert output.read_text() == '{"id": "last night"}\n', "the previous results are untouched"
    partial = (tiny_disk / "results.jsonl.partial").read_text(encoding="utf-8")
    assert partial.endswith("\n") and all(json.loads(line) for line in partial.splitlines())
    billed = emulator.stats()["generate_calls"]
    assert billed < 150, "no new item started once the disk was full"
    (event,) = await events_for(state.state_details.flow_run_id)
    assert event.event == "prefect-batch-llm.batch.failed"
    assert event.payload["succeeded"] == billed, "every billed item is accounted"
