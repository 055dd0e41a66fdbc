"""End to end on a real Prefect server: register blocks, deploy from prefect.yaml, run, inspect.

Starts `prefect server start` on a free loopback port with its own PREFECT_HOME, the Gemini
emulator and a process worker; cleans up every process it started, also on failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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


def run(args: list[str], env: dict[str, str], timeout: float = 180) -> str:
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


async def test_deploy_from_prefect_yaml_and_run_with_parameters(tmp_path: Path, processes):
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
    server = processes.start(
        "server",
        [
            *PREFECT,
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--analytics-off",
        ],
        env,
    )
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
        started = run(
            [
                *PREFECT,
                "deployment",
                "run",
                "batch-llm/file-batch",
                "--param",
                f"input={source}",
                "--param",
                f"output={output}",
                "--watch",
            ],
            env,
            timeout=300,
        )
        assert "Completed" in started
        stats = emulator.stats()

    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(results) == 13
    assert sum(r["success"] for r in results) == 12
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

        [flow_run] = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["file-batch"]))
        )
        assert flow_run.state is not None and flow_run.state.is_completed()
        assert flow_run.parameters["input"] == str(source)
        task_runs = await client.read_task_runs()
        names = {t.name for t in task_runs if t.flow_run_id == flow_run.id}
        assert {"e0", "e11", "line-6"} <= names, "each item is a task run named by its id"

        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    kinds = {a.type: a for a in artifacts}
    assert set(kinds) == {"progress", "table", "markdown"}
    assert kinds["progress"].data == 100.0
    assert "| Items | 13 |" in str(kinds["markdown"].data)
    assert "| Cache hit rate |" in str(kinds["markdown"].data)
    table = kinds["table"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert rows[0]["id"] == "line-6", "failures first"
