"""Cleanup runs once when a flow process is terminated (SIGTERM) or interrupted (SIGINT)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

SCRIPT = Path(__file__).parent / "scripts" / "interrupted_flow.py"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cleanup_runs_once_when_the_flow_process_is_signalled(tmp_path, signum):
    marker = tmp_path / "calls.txt"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(marker)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text().count("execute") >= 4:
                break
            if process.poll() is not None:
                pytest.fail(f"flow exited early: {process.stdout.read().decode()[-2000:]}")
            time.sleep(0.1)
        else:
            pytest.fail("the batch never started its calls")
        process.send_signal(signum)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    calls = marker.read_text().split()
    assert calls.count("prepare") == 1
    assert calls.count("execute") == 4, "max_workers=4 bounds the calls in flight"
    assert calls.count("cleanup") == 1, f"expected one cleanup, got: {calls}"
    assert process.returncode != 0
