"""`make demo`, the README's main command, as a new user runs it: `flows/demo.py` on a fresh
PREFECT_HOME (Prefect's ephemeral server) against the bundled emulator."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_demo_runs_200_items_with_batch_level_logs(tmp_path: Path) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "GEMINI_", "GOOGLE_"))
    }
    env.update(
        PREFECT_HOME=str(tmp_path / "home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    done = subprocess.run(
        [sys.executable, "flows/demo.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    summary = json.loads(re.search(r"Batch summary: (\{.*?\n\})", out, re.S).group(1))  # type: ignore[union-attr]
    assert summary["total_items"] == 200 and summary["succeeded"] == 200
    assert summary["outcome"] == "completed" and summary["cache_hit_rate"] > 90
    # The scripted 429 and 503 are explained in the logs; the items' completions are not.
    assert re.search(r"rate_limit: .*429.*; retry: rate limit 1/10, waiting", out)
    assert re.search(r"transient: .*503.*; retry: attempt 2/3, waiting", out)
    completions = [line for line in out.splitlines() if "Finished in state Completed" in line]
    assert len(completions) <= 1, completions[:3]  # only the flow run's own
