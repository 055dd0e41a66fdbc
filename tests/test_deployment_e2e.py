"""End to end on a real Prefect server: register blocks, deploy from prefect.yaml, run, inspect.

Starts `prefect server start` on a free loopback port with its own PREFECT_HOME, the Gemini
emulator and a process worker; cleans up every process it started, also on failure.
With BATCH_LLM_E2E_DATABASE=postgres (`make e2e-postgres`) the server is the repo's
Postgres-backed one (python -m prefect_batch_llm.testing.postgres_server).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterName,
)
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

from prefect_batch_llm.testing import GeminiEmulator

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Processes started by the test, each in its own session, all killed at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
def server_command() -> Iterator[Callable[[int], list[str]]]:
    """The server to start on a port: SQLite by default, Postgres if the environment says so.

    Requested before `processes`, so it is torn down after the server has been stopped.
    """
    postgres = os.environ.get("BATCH_LLM_E2E_DATABASE") == "postgres"
    # Under /tmp and searchable: as root, Postgres runs as the postgres user.
    data_dir = Path(tempfile.mkdtemp(prefix="e2e-postgres-")) / "pg" if postgres else None
    script = [sys.executable, "-m", "prefect_batch_llm.testing.postgres_server"]

    def command(port: int) -> list[str]:
        if data_dir is None:
            return [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port),
                    "--analytics-off"]  # fmt: skip
        data_dir.parent.chmod(0o755)
        return [*script, "start", "--data-dir", str(data_dir), "--port", str(free_port()),
                "--api-port", str(port)]  # fmt: skip

    yield command
    if data_dir is not None:
        subprocess.run([*script, "stop", "--data-dir", str(data_dir)], timeout=120)
        shutil.rmtree(data_dir.parent, ignore_errors=True)


def run(args: list[str], env: dict[str, str], timeout: float = 180) -> str:
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


async def test_deploy_from_prefect_yaml_and_run_with_parameters(
    tmp_path: Path, server_command, processes
):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "storage"),
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    server = processes.start("server", server_command(port), env)
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "prefect server did not become healthy"
        time.sleep(0.5)

    source = tmp_path / "questions.jsonl"
    lines = [
        json.dumps({"id": f"e{i}", "prompt": f"How long may I return item {i}?"}) for i in range(12)
    ]
    source.write_text("\n".join([*lines[:5], "{not json", *lines[5:]]) + "\n")
    output = tmp_path / "results.jsonl"

    with GeminiEmulator(latency=0.02) as emulator:
        registered = run([*PREFECT, "block", "register", "-m", "prefect_batch_llm"], env)
        assert "Gemini Cached Strategy" in registered and "Pydantic AI Strategy" in registered
        run([sys.executable, "blocks/create_blocks.py", "--emulator-url", emulator.base_url], env)
        run([*PREFECT, "work-pool", "create", "local", "--type", "process"], env)
        run([*PREFECT, "--no-prompt", "deploy", "--all"], env)
        processes.start("worker", [*PREFECT, "worker", "start", "--pool", "local"], env)

        def deployment_run(*params: str) -> subprocess.CompletedProcess[str]:
            args = [*PREFECT, "deployment", "run", "batch-llm/file-batch", "--watch"]
            for param in params:
                args += ["--param", param]
            return subprocess.run(
                args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300
            )

        # 1 bad line of 13 is 7.7%: more than the flow's default 5%, so the run ends Failed
        # (after writing every result) and --watch exits 1.
        first = deployment_run(f"input={source}", f"output={output}")
        assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
        assert "prefect-batch-llm.batch.failed" in first.stdout
        assert "Flow run finished in state 'Failed'" in first.stdout + first.stderr
        stats = emulator.stats()

        # A partial config keeps the deployment's other defaults: resume stays on, so the
        # 12 items the first run completed are not billed again.
        again = deployment_run(
            f"input={source}",
            f"output={tmp_path / 'again.jsonl'}",
            'config={"max_workers": 2, "max_failed_fraction": 0.1}',
        )
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "prefect-batch-llm.batch.completed" in again.stdout
        assert emulator.stats()["generate_calls"] == 12, "resume stayed on"

        # Batch Mode for this run only (the saved block stays online): one Gemini job with
        # the shared cache, every item answered, and the block unchanged for the next run.
        batch_output = tmp_path / "batch.jsonl"
        batched = deployment_run(
            f"input={source}",
            f"output={batch_output}",
            "execution=batch",
            "fresh=true",
            'config={"batch_poll_interval_seconds": 1, "max_failed_fraction": 0.1}',
        )
        assert batched.returncode == 0, batched.stdout[-3000:] + batched.stderr[-3000:]
        assert emulator.stats()["batches"]["created"] == 1
        assert emulator.stats()["generate_calls"] == 12, "no online call in Batch Mode"

        # One batch as two shard runs of file-batch on the worker, one results file.
        sharded_output = tmp_path / "sharded.jsonl"
        sharded = subprocess.run(
            [
                *PREFECT,
                "deployment",
                "run",
                "batch-llm-sharded/sharded",
                "--watch",
                "--param",
                f"input={source}",
                "--param",
                f"output={sharded_output}",
                "--param",
                'config={"max_failed_fraction": 0.1, "global_limit_name": "e2e-quota", '
                '"global_requests_per_minute": 600}',
                "--param",
                "fresh=true",  # calls the model again (through the global limit)
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert sharded.returncode == 0, sharded.stdout[-3000:] + sharded.stderr[-3000:]
        inspect = [*PREFECT, "gcl", "inspect", "e2e-quota-rpm", "--output", "json"]
        limit = subprocess.run(inspect, env=env, capture_output=True, text=True)
        assert limit.returncode == 0, limit.stdout + limit.stderr
        assert json.loads(limit.stdout)["slot_decay_per_second"] > 0, "a rate, shared by shards"

        # A CSV without a prompt column: every item fails, the run ends Failed.
        no_prompt = tmp_path / "no_prompt.csv"
        no_prompt.write_text("id,question\na,why?\nb,how?\n")
        failed = deployment_run(f"input={no_prompt}", f"output={tmp_path / 'failed.jsonl'}")
        assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]

    batch_results = [json.loads(line) for line in batch_output.read_text().splitlines()]
    assert sum(r["success"] for r in batch_results) == 12 and len(batch_results) == 13
    sharded_results = [json.loads(line) for line in sharded_output.read_text().splitlines()]
    assert sorted(r["id"] for r in sharded_results) == sorted(
        [f"e{i}" for i in range(12)] + ["line-6"]
    )
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(results) == 13
    assert sum(r["success"] for r in results) == 12
    again_results = [
        json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()
    ]
    assert sum(bool(r.get("cached")) for r in again_results) == 12
    assert len((tmp_path / "failed.jsonl").read_text().splitlines()) == 2, "results written first"
    [bad] = [r for r in results if not r["success"]]
    assert bad["category"] == "invalid_input" and "line 6: not valid JSON" in bad["error"]
    assert stats["caches"]["created"] == 1, "one shared context cache for the whole batch"
    assert stats["generate_calls"] == 12

    async with PrefectClient(api=api) as client:
        deployments = await client.read_deployments(
            deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["file-batch", "nightly", "summarize-documents"])
            )
        )
        assert {d.name for d in deployments} == {"file-batch", "nightly", "summarize-documents"}
        nightly = next(d for d in deployments if d.name == "nightly")
        assert nightly.schedules and not nightly.schedules[0].active, "shipped paused"

        flow_runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["file-batch"]))
        )
        by_input = {Path(r.parameters["input"]).name: r for r in flow_runs}
        flow_run = next(r for r in flow_runs if r.parameters.get("output") == str(output))
        failed_run = by_input["no_prompt.csv"]
        assert failed_run.state is not None and failed_run.state.is_failed()
        assert "2 of 2 items failed (every item failed): 2 invalid_input" in (
            failed_run.state.message or ""
        )
        wanted = EventFilter(
            event=EventNameFilter(prefix=["prefect-batch-llm.batch"]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{failed_run.id}"]),
        )
        waited = time.monotonic() + 30  # the server persists events in batches
        while not (events := await client.read_events(filter=wanted, limit=50)).events:
            assert time.monotonic() < waited, "the batch event never reached the server"
            await asyncio.sleep(1)
        assert [e.event for e in events.events] == ["prefect-batch-llm.batch.failed"]
        assert events.events[0].payload["errors_by_category"] == {"invalid_input": 2}
        assert flow_run.state is not None and flow_run.state.is_failed()
        assert "1 of 13 items failed (7.7% > 5% allowed): 1 invalid_input" in (
            flow_run.state.message or ""
        )
        assert flow_run.parameters["input"] == str(source)
        task_runs = await client.read_task_runs()
        names = {t.name for t in task_runs if t.flow_run_id == flow_run.id}
        assert {"e0", "e11", "line-6"} <= names, "each item is a task run named by its id"

        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    by_key = {a.key: a for a in artifacts if a.key}
    # Keyed per deployment: file-batch, nightly and the pipeline each have their own timeline.
    assert set(by_key) == {
        "batch-llm-file-batch-progress",
        "batch-llm-file-batch-results",
        "batch-llm-file-batch-report",
    }
    assert by_key["batch-llm-file-batch-progress"].data == 100.0
    report = str(by_key["batch-llm-file-batch-report"].data)
    assert "| Items | 13 |" in report and "| Cache hit rate |" in report
    assert "| Outcome | failed: 1 of 13 items failed (7.7% > 5% allowed)" in report
    assert f"| Input | {source} |" in report
    assert "| Strategy | gemini-cached-strategy/handbook-qa |" in report
    table = str(by_key["batch-llm-file-batch-results"].data)
    assert re.search(r"\| 6 \| \[line-6\]\(\S+/runs/task-run/[0-9a-f-]+\) \| \*\*failed\*\*", table)
    # The failed item's own artifact, on its task run.
    failed_item = next(t for t in task_runs if t.name == "line-6" and t.flow_run_id == flow_run.id)
    assert any(a.task_run_id == failed_item.id for a in artifacts)
