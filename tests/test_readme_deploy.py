"""The README's deploy steps, run exactly as written there (taken from README.md itself).

A user pastes the deploy block into one shell from the repository root, then the stop block.
This test does the same, with its own PREFECT_HOME so it touches no one's server data, and
checks the run completed and wrote one result per question.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PORTS = (4200, 8765)  # the README's Prefect server and emulator ports


def readme_block(name: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(
        rf"<!-- {name}:start -->\s*```bash\n(.*?)```\s*<!-- {name}:end -->", text, re.S
    )
    assert found, f"README.md has no {name} block"
    return found.group(1)


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_readme_deploy_steps_work_as_written(tmp_path):
    if not (REPO / ".venv" / "bin" / "activate").exists():
        pytest.skip("the README's steps start from `make install` (.venv is missing)")
    busy = [port for port in PORTS if port_in_use(port)]
    if busy:
        pytest.skip(f"ports {busy} are in use here; the README's steps need them free")
    script = "set -euo pipefail\n" + readme_block("deploy") + readme_block("stop")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "VIRTUAL_ENV", "GEMINI_", "GOOGLE_API"))
    }
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "storage"),
    }
    before = set((REPO / "results").glob("questions-*.results.jsonl"))
    log = tmp_path / "readme.log"
    try:
        # Output to a file, not a pipe: the block's background jobs would hold a pipe open.
        with log.open("w") as sink:
            shell = subprocess.Popen(
                ["bash", "-c", script],
                cwd=REPO,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            returncode = shell.wait(timeout=600)
    finally:
        # Whatever happened, leave nothing behind (the stop block may not have run).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        subprocess.run(
            ["bash", "-c", ". .venv/bin/activate && prefect server stop"],
            cwd=REPO,
            env=env,
            capture_output=True,
            timeout=60,
        )
    output = log.read_text()
    assert returncode == 0, output[-4000:]
    assert "Flow run finished successfully in 'Completed'" in output
    written = set((REPO / "results").glob("questions-*.results.jsonl")) - before
    assert len(written) == 1, written
    (results,) = written
    try:
        lines = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
        assert len(lines) == 200 and all(line["success"] for line in lines)
    finally:
        results.unlink()
    assert not any(port_in_use(port) for port in PORTS), "the stop block stopped everything"
