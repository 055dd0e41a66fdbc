"""One batch as several shard runs on a work pool's workers: one results file, one outcome."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.flows import Flow
from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr

from prefect_batch_llm.files.shards import split_input
from prefect_batch_llm.flows import batch_llm_sharded
from prefect_batch_llm.gemini import GeminiCredentials, GeminiStrategy
from prefect_batch_llm.results import BatchFailedError
from prefect_batch_llm.testing import Fault, GeminiEmulator

REPO = Path(__file__).resolve().parents[1]
POOL = "shards-test"


def write_items(path: Path, n: int, bad_lines: int = 0, topic: str = "Question") -> None:
    lines = [
        json.dumps({"id": f"s{i}", "prompt": f"{topic} {i}?", "team": "ops"}) for i in range(n)
    ]
    lines[1:1] = ["{broken"] * bad_lines
    path.write_text("\n".join(lines) + "\n")


def test_split_deals_items_round_robin_keeps_ids_and_context_and_returns_invalid_lines(tmp_path):
    source = tmp_path / "items.jsonl"
    write_items(source, 5, bad_lines=1)
    parts, invalid = split_input(str(source), str(tmp_path / "out.shards"), 2)
    assert [part.ids for part in parts] == [["s0", "s2", "s4"], ["s1", "s3"]]
    assert [r.item_id for r in invalid] == ["line-2"] and invalid[
        0
    ].error_category == "invalid_input"
    first = [json.loads(line) for line in Path(parts[0].input).read_text().splitlines()]
    assert first[0] == {"id": "s0", "prompt": "Question 0?", "team": "ops"}
    again, _ = split_input(str(source), str(tmp_path / "out.shards"), 2)
    assert Path(again[0].input).read_text() == Path(parts[0].input).read_text(), "deterministic"


@pytest.fixture
async def shard_worker(tmp_path):
    """A process work pool, the batch flow deployed on it, and one worker running 4 runs."""
    async with get_client() as client:
        with contextlib.suppress(Exception):  # created by an earlier test of this session
            await client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
    source: Flow = await Flow.afrom_source(str(REPO), "flows/batch.py:batch_llm")  # type: ignore[misc]
    await source.adeploy(name="shard-test", work_pool_name=POOL, print_next_steps=False)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--limit", "4"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield tmp_path / "worker.log"
    finally:
        worker.terminate()
        worker.wait(timeout=30)


async def test_two_shards_on_workers_make_one_results_file_and_a_rerun_resumes(
    shard_worker, tmp_path
):
    source = tmp_path / "items.jsonl"
    write_items(source, 30, bad_lines=1)
    output = tmp_path / "all.results.jsonl"
    fault = Fault(kind="400", prompt_contains="Question 7?")  # permanent: item s7 fails
    with GeminiEmulator(faults=[fault]) as emulator:
        await GeminiStrategy(
            credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url)
        ).save("shard-test", overwrite=True)
        arguments = {
            "input": str(source),
            "strategy": "gemini-strategy/shard-test",
            "output": str(output),
            "shards": 2,
            "shard_deployment": "batch-llm/shard-test",
            "config": {"max_workers": 4, "max_failed_fraction": 0.5},
        }
        state = await batch_llm_sharded(**arguments, return_state=True)
        summary = await state.aresult()
        first_calls = emulator.stats()["generate_calls"]

        with emulator.state.lock:
            emulator.state.faults.clear()
        again = await batch_llm_sharded(**arguments)
        second_calls = emulator.stats()["generate_calls"] - first_calls

    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["id"] for r in results) == sorted([*(f"s{i}" for i in range(30)), "line-2"])
    assert summary["total_items"] == 31 and summary["succeeded"] == 29
    assert [s.split(": ")[1] for s in summary["shards"]] == ["Completed", "Completed"]
    assert first_calls == 30
    # The re-run bills only the item that failed; the 29 others come from stored results.
    assert second_calls == 1 and again["succeeded"] == 30
    assert sum(1 for r in results if r.get("cached")) == 29
    async with get_client() as client:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(
                    any_=[state.state_details.flow_run_id]
                )
            )
        )
    assert len(children) == 2, "the shard runs are children of the sharded run"
    assert {child.deployment_id for child in children} != {None}


async def test_every_item_fails_so_the_sharded_run_fails_after_writing_every_result(
    shard_worker, tmp_path
):
    source = tmp_path / "items.jsonl"
    write_items(source, 6, topic="Unanswerable")  # not resumed from the other test
    output = tmp_path / "all.results.jsonl"
    with GeminiEmulator(faults=[Fault(kind="400")]) as emulator:
        await GeminiStrategy(
            credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url)
        ).save("shard-test", overwrite=True)
        with pytest.raises(BatchFailedError, match="every item failed"):
            await batch_llm_sharded(
                input=str(source),
                strategy="gemini-strategy/shard-test",
                output=str(output),
                shards=3,
                shard_deployment="batch-llm/shard-test",
                config={"max_workers": 2},
            )
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(results) == 6 and not any(r["success"] for r in results)
