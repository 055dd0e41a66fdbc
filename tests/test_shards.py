"""One batch as several shard runs on a work pool's workers: one results file, one outcome."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import flow, tags
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.flows import Flow
from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr

from prefect_batch_llm import flows
from prefect_batch_llm.files.shards import split_input
from prefect_batch_llm.flows import SHARD_TAG, _for_this_run, batch_llm_sharded
from prefect_batch_llm.gemini import GeminiCachedStrategy, GeminiCredentials, GeminiStrategy
from prefect_batch_llm.pydantic_ai import PydanticAIStrategy
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


def flow_run_processes(flow_run_id: str) -> list[int]:
    """Pids of the processes a worker started for one flow run (by its PREFECT__FLOW_RUN_ID)."""
    wanted = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
    return pids


async def kill_shard_when_it_has_results(shard_input: Path, partial: Path, at_least: int) -> str:
    """SIGKILL the flow run process of the shard reading `shard_input`, once its results
    file has `at_least` lines; returns the flow run's id."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = partial.read_text().count("\n") if partial.exists() else 0
        if lines >= at_least:
            async with get_client() as client:
                runs = await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(state={"type": {"any_": ["RUNNING"]}})
                )
            for run in runs:
                if run.parameters.get("input") == str(shard_input):
                    pids = flow_run_processes(str(run.id))
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)
                    if pids:
                        return str(run.id)
        await asyncio.sleep(0.1)
    raise AssertionError(f"shard {shard_input} never had {at_least} results")


async def test_four_shards_share_one_cache_and_a_shard_killed_mid_run_resumes_its_unfinished_items(
    shard_worker, tmp_path
):
    source = tmp_path / "items.jsonl"
    write_items(source, 40, topic="Killed shard question")
    output = tmp_path / "all.results.jsonl"
    shard_input = Path(f"{output}.shards") / "shard-000.jsonl"
    partial = Path(f"{output}.shards") / "shard-000.results.jsonl.partial"
    # Shard 0's fifth item answers late (once), so the kill lands mid-run on a loaded machine.
    late = Fault(kind="slow", prompt_contains="Killed shard question 16?", delay=20.0, times=1)
    with GeminiEmulator(latency=0.25, faults=[late]) as emulator:
        await GeminiCachedStrategy(
            credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url),
            system_instruction="You answer from the handbook.",
            cached_documents=["The handbook. " * 400],
        ).save("shard-cached", overwrite=True)
        arguments = {
            "input": str(source),
            "strategy": "gemini-cached-strategy/shard-cached",
            "output": str(output),
            "shards": 4,
            "shard_deployment": "batch-llm/shard-test",
            "config": {"max_workers": 1},
        }
        run = asyncio.create_task(batch_llm_sharded(**arguments, return_state=True))
        killed = await kill_shard_when_it_has_results(shard_input, partial, at_least=3)
        state = await run
        first = emulator.stats()
        with emulator.state.lock:
            cache_created_at = [c.create_time for c in emulator.state.caches.values()]
        results = [json.loads(line) for line in output.read_text().splitlines()]

        again = await batch_llm_sharded(**arguments)
        second = emulator.stats()

    # The killed shard's run crashed; the parent still wrote one result per item and failed,
    # naming the shard run and what to do.
    assert state.is_failed()
    assert "Crashed" in str(state.message) and "Run this flow again" in str(state.message)
    async with get_client() as client:
        assert (await client.read_flow_run(killed)).state.is_crashed()  # type: ignore[union-attr]
    assert sorted(r["id"] for r in results) == sorted(f"s{i}" for i in range(40))
    unfinished = [r["id"] for r in results if not r["success"]]
    finished = [r["id"] for r in results if r["success"]]
    assert 0 < len(unfinished) < 10 and all(int(i[1:]) % 4 == 0 for i in unfinished), (
        "only shard 0's items (s0, s4, ...) lack a result, and it had finished some"
    )
    assert len(finished) >= 30 + 3
    # The re-run calls the model for the killed shard's unfinished items only.
    assert second["generate_calls"] - first["generate_calls"] == len(unfinished)
    assert again["succeeded"] == 40
    # One context cache for the four shards of both runs: made by the parent before any shard
    # started (so shards on many machines never race to create it), adopted by every shard.
    assert second["caches"]["created"] == 1
    async with get_client() as client:
        shard_runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(
                    any_=[state.state_details.flow_run_id]
                )
            )
        )
    assert len(shard_runs) == 4
    assert cache_created_at[0] < min(r.start_time for r in shard_runs if r.start_time)


async def test_with_delete_cache_on_cleanup_only_the_parent_deletes_the_cache_after_every_shard(
    shard_worker, tmp_path
):
    source = tmp_path / "items.jsonl"
    write_items(source, 12, topic="One-off job question")
    output = tmp_path / "all.results.jsonl"
    # Shard 1's first item answers late: shards 0 and 2 end while shard 1 still uses the cache.
    slow = Fault(kind="slow", prompt_contains="One-off job question 1?", delay=4.0)
    with GeminiEmulator(latency=0.1, faults=[slow]) as emulator:
        await GeminiCachedStrategy(
            credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url),
            cached_documents=["The one-off handbook. " * 400],
            delete_cache_on_cleanup=True,
        ).save("shard-one-off", overwrite=True)
        summary = await batch_llm_sharded(
            input=str(source),
            strategy="gemini-cached-strategy/shard-one-off",
            output=str(output),
            shards=3,
            shard_deployment="batch-llm/shard-test",
            config={"max_workers": 1},
        )
        stats = emulator.stats()

    assert summary["succeeded"] == 12
    # The parent made the cache before the shards and deleted it once after the last one;
    # no shard deleted it from under another (which would have made a second, billed cache).
    assert stats["caches"]["created"] == 1
    assert stats["calls_by_endpoint"].get("cachedContents.delete") == 1
    assert stats["caches"]["live"] == 0, "deleted at the end: nothing left to bill"


def one_off_cache() -> GeminiCachedStrategy:
    return GeminiCachedStrategy(cached_documents=["The handbook."], delete_cache_on_cleanup=True)


@flow
def strategy_in_this_run(strategy: object) -> object:
    return _for_this_run(strategy)  # type: ignore[arg-type]


def deletes_its_cache(strategy: object) -> bool:
    if isinstance(strategy, PydanticAIStrategy):
        strategy = strategy.context_cache
    return isinstance(strategy, GeminiCachedStrategy) and strategy.delete_cache_on_cleanup


@pytest.mark.parametrize(
    ("strategy", "tagged", "deletes"),
    [
        (one_off_cache(), False, True),
        (one_off_cache(), True, False),
        (PydanticAIStrategy(context_cache=one_off_cache(), output_mode="native"), False, True),
        (PydanticAIStrategy(context_cache=one_off_cache(), output_mode="native"), True, False),
        (GeminiStrategy(), True, False),
    ],
    ids=["cached", "cached-shard", "agent-cache", "agent-cache-shard", "uncached-shard"],
)
def test_a_shard_run_leaves_the_parents_cache_even_inside_an_agent(strategy, tagged, deletes):
    before = deletes_its_cache(strategy)
    with tags(*([SHARD_TAG] if tagged else [])):
        used = strategy_in_this_run(strategy)
    assert deletes_its_cache(used) is deletes
    assert deletes_its_cache(strategy) is before, "the block itself is not changed"


async def test_an_unknown_shard_deployment_is_named_before_a_cache_is_made(tmp_path):
    source = tmp_path / "items.jsonl"
    write_items(source, 4)
    with GeminiEmulator() as emulator:
        await GeminiCachedStrategy(
            credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url),
            cached_documents=["The handbook. " * 400],
        ).save("shard-typo", overwrite=True)
        with pytest.raises(ValueError, match=r"shard_deployment='batch-llm/fil-batch': no such"):
            await batch_llm_sharded(
                input=str(source),
                strategy="gemini-cached-strategy/shard-typo",
                output=str(tmp_path / "out.jsonl"),
                shard_deployment="batch-llm/fil-batch",
            )
        assert emulator.stats()["caches"]["created"] == 0, "nothing billed"


async def test_a_shard_run_lost_from_sight_gets_resume_results_and_keeps_the_cache(
    shard_worker, tmp_path, monkeypatch
):
    """The Prefect server stops answering the parent about one shard (faked: the one part
    that cannot be made real here); the other shard completes."""
    real_run_deployment = flows.run_deployment

    async def run_deployment(name, parameters, **kwargs):  # type: ignore[no-untyped-def]
        if parameters["input"].endswith("shard-001.jsonl"):
            raise ConnectionError("the Prefect server did not answer")
        return await real_run_deployment(name, parameters=parameters, **kwargs)

    monkeypatch.setattr(flows, "run_deployment", run_deployment)
    source = tmp_path / "items.jsonl"
    write_items(source, 6, topic="Lost shard question")
    output = tmp_path / "all.results.jsonl"
    with GeminiEmulator() as emulator:
        await GeminiCachedStrategy(
            credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url),
            cached_documents=["The lost handbook. " * 400],
            delete_cache_on_cleanup=True,
        ).save("shard-lost", overwrite=True)
        with pytest.raises(BatchFailedError):
            await batch_llm_sharded(
                input=str(source),
                strategy="gemini-cached-strategy/shard-lost",
                output=str(output),
                shards=2,
                shard_deployment="batch-llm/shard-test",
                config={"max_workers": 2, "max_failed_fraction": 0.1},
            )
        stats = emulator.stats()

    results = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert sorted(results) == sorted(f"s{i}" for i in range(6)), "every item has one result"
    assert all(results[f"s{i}"]["success"] for i in (0, 2, 4))
    for i in (1, 3, 5):
        assert "not followed to its end" in results[f"s{i}"]["error"]
        assert "run the sharded flow again" in results[f"s{i}"]["error"]
    # The lost shard's run may still be using the cache: the parent leaves it.
    assert stats["caches"]["created"] == 1 and stats["caches"]["live"] == 1
