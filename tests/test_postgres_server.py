"""The Postgres-backed Prefect server script, for real: start, run a batch, read Postgres, stop.

Runs `python -m prefect_batch_llm.testing.postgres_server` on free ports with a fresh data
directory, runs a ParallelBatchProcessor flow against it in another process, checks the task
runs are rows in Postgres, then stops it with the `stop` subcommand. Skips only when the
PostgreSQL server binaries are absent.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from prefect_batch_llm.testing.postgres_server import (
    INGEST_SETTINGS,
    MODULE,
    find_postgres_bin,
    free_port,
    read_state,
)

pytestmark = pytest.mark.skipif(
    find_postgres_bin() is None,
    reason="PostgreSQL server binaries absent (initdb, pg_ctl, postgres): "
    "apt-get install -y postgresql",
)

ITEMS = 20
FLOW = f"""
import asyncio
from prefect import flow
from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig
from prefect_batch_llm.testing import MockStrategy

@flow(name="pg-batch")
async def batch() -> int:
    config = ProcessorConfig(max_workers=5, report_artifacts=False)
    async with ParallelBatchProcessor(config=config) as processor:
        for i in range({ITEMS}):
            await processor.add_work(
                LLMWorkItem(item_id=f"pg-{{i}}", strategy=MockStrategy(), prompt=f"q{{i}}")
            )
        return (await processor.process_all()).succeeded

print("succeeded", asyncio.run(batch()))
"""


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    """Overrides the session's SQLite test server: this module starts its own server."""
    yield


def script(
    *args: str, env: dict[str, str], timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", MODULE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def task_runs_in_postgres(database_url: str) -> dict[str, str]:
    import asyncpg

    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        rows = await connection.fetch(
            "SELECT t.name, t.state_type FROM task_run t JOIN flow_run r ON t.flow_run_id = r.id"
            " JOIN flow f ON r.flow_id = f.id WHERE f.name = 'pg-batch'"
        )
    finally:
        await connection.close()
    return {row["name"]: str(row["state_type"]) for row in rows}


def test_start_run_a_batch_find_it_in_postgres_and_stop(tmp_path: Path) -> None:
    # Under /tmp and searchable: as root the cluster runs as the postgres user, which cannot
    # enter pytest's mode-700 tmp_path.
    base = Path(tempfile.mkdtemp(prefix="prefect-batch-llm-pg-"))
    base.chmod(0o755)
    data_dir = base / "pg"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }
    env.pop("PREFECT_API_URL", None)
    for key in INGEST_SETTINGS:  # the script's own values apply...
        env.pop(key, None)
    env["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL"] = "3"  # ...unless set here
    ports = ["--port", str(free_port()), "--api-port", str(free_port())]
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", MODULE, "start", "--data-dir", str(data_dir), *ports],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            state = read_state(data_dir)
            if state:
                try:
                    if httpx.get(f"{state['api_url']}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        assert "PREFECT_API_URL=" + state["api_url"] in (tmp_path / "server.log").read_text()
        # Sized for batch ingest unless the environment says otherwise.
        settings = httpx.get(f"{state['api_url']}/admin/settings", timeout=10).json()
        recorder = settings["server"]["services"]["task_run_recorder"]
        assert recorder["batch_size"] == 500 and recorder["flush_interval"] == 3

        status = script("status", "--data-dir", str(data_dir), env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "postgres: running" in status.stdout and "healthy" in status.stdout
        password = (data_dir / "password").read_text().strip()
        assert password not in status.stdout + (data_dir / "state.json").read_text()

        ran = subprocess.run(
            [sys.executable, "-c", FLOW],
            env={**env, "PREFECT_API_URL": state["api_url"], "PREFECT_LOGGING_LEVEL": "WARNING"},
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
        assert f"succeeded {ITEMS}" in ran.stdout

        # The server records task runs from the client's events: poll Postgres itself.
        wanted = {f"pg-{i}": "COMPLETED" for i in range(ITEMS)}
        waited = time.monotonic() + 30
        database_url = state["database_url"].replace("***", password)
        while (rows := asyncio.run(task_runs_in_postgres(database_url))) != wanted:
            assert time.monotonic() < waited, rows
            time.sleep(1)

        stopped = script("stop", "--data-dir", str(data_dir), env=env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert server.wait(timeout=30) == 0
        output = (tmp_path / "server.log").read_text()
        assert "stopping the Prefect server" in output and output.rstrip().endswith("stopped")
        assert not (data_dir / "pgdata" / "postmaster.pid").exists(), "postgres stopped"
        assert read_state(data_dir) is None
        status = script("status", "--data-dir", str(data_dir), env=env)
        assert status.returncode == 3 and "postgres: not running" in status.stdout
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        script("stop", "--data-dir", str(data_dir), env=env)
        log.close()
        shutil.rmtree(base, ignore_errors=True)
