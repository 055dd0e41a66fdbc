"""A batch killed with SIGKILL mid-run resumes: completed items are not billed again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr

from prefect_batch_llm.gemini import GeminiCredentials, GeminiStrategy
from prefect_batch_llm.testing import GeminiEmulator

SCRIPT = Path(__file__).parent / "scripts" / "run_batch_flow.py"
ITEMS = 60
WORKERS = 4


async def test_rerun_after_sigkill_bills_only_the_items_not_completed(tmp_path):
    source = tmp_path / "items.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": f"question {i}"}) + "\n" for i in range(ITEMS))
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "storage"),
    }
    command = [sys.executable, str(SCRIPT), str(source), "gemini-strategy/resume-test"]
    with GeminiEmulator(latency=0.15) as emulator:
        await GeminiStrategy(
            credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url)
        ).save("resume-test", overwrite=True)

        output = tmp_path / "results.jsonl"
        output.write_text('{"id": "yesterday"}\n')  # the previous run's results
        first = subprocess.Popen(
            [*command, str(output)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while emulator.stats()["generate_calls"] < 24:
            assert first.poll() is None, first.stdout.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the first run never got going"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        billed_first = emulator.stats()["generate_calls"]
        # The killed run leaves the previous results untouched and its progress beside them.
        assert output.read_text() == '{"id": "yesterday"}\n'
        written_first = len((tmp_path / "results.jsonl.partial").read_text().splitlines())
        assert 20 <= written_first < ITEMS

        emulator.reset()
        second = subprocess.run(
            [*command, str(output)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        billed_second = emulator.stats()["generate_calls"]

    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert not (tmp_path / "results.jsonl.partial").exists()
    assert len(results) == ITEMS and all(r["success"] for r in results)
    resumed = [r for r in results if r.get("cached")]
    # Every item the first run finished (and wrote) is served from its stored result...
    assert len(resumed) >= written_first
    # ...so the second run bills only the rest: at most the items in flight at the kill are
    # billed twice.
    assert billed_second == ITEMS - len(resumed)
    assert billed_first + billed_second <= ITEMS + WORKERS
