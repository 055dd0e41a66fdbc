"""The README's main command: the batch flow on the shipped sample, end to end.

    make demo          (or: .venv/bin/python flows/demo.py)

Without GEMINI_API_KEY it starts the bundled Gemini emulator on 127.0.0.1 (50 ms latency,
one scripted 429 with RetryInfo 1 s and one 503); with GEMINI_API_KEY set it calls the real
Gemini API. Either way it runs on Prefect's ephemeral server (unless PREFECT_API_URL points
at a server): it saves the block documents (`blocks/create_blocks.py`), then runs the
`batch-llm` flow over `flows/data/questions.jsonl` (200 questions) with the cached-handbook
strategy, and prints the summary, where the results went, and where the artifacts are.

The run's logs stay at batch level (`quiet_item_logs`, the flow's default): the retries of the
scripted 429 and 503 and the summary line, not one "Finished in state Completed()" per item.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "blocks"))

from create_blocks import create_blocks  # noqa: E402
from prefect.settings import PREFECT_API_URL, PREFECT_HOME  # noqa: E402

from prefect_batch_llm.flows import BatchFlowConfig, batch_llm  # noqa: E402
from prefect_batch_llm.testing import Fault, GeminiEmulator  # noqa: E402

QUESTIONS = ROOT / "flows" / "data" / "questions.jsonl"


def main() -> None:
    real = bool(os.environ.get("GEMINI_API_KEY"))
    faults = [
        Fault(kind="429", prompt_contains="bicycles", times=1, retry_after=1.0),
        Fault(kind="503", prompt_contains="exchange", times=1),
    ]
    emulator = contextlib.nullcontext() if real else GeminiEmulator(latency=0.05, faults=faults)
    with emulator as running:
        url = None if running is None else running.base_url
        print("LLM:", "the Gemini API (GEMINI_API_KEY)" if real else f"Gemini emulator at {url}")
        for name in create_blocks(url):
            print("saved block", name)
        output = ROOT / "results" / "questions.results.jsonl"
        summary = asyncio.run(
            batch_llm(
                input=str(QUESTIONS),
                strategy="gemini-cached-strategy/handbook-qa",
                output=str(output),
                config=BatchFlowConfig(quiet_item_logs=True),
                fresh=True,
            )
        )
        billed = running.stats()["billed"] if running is not None else None
    print("\nBatch summary:", json.dumps(summary, indent=2))
    if billed is not None:
        print("Emulator billed:", json.dumps(billed, indent=2))
    print(f"\nResults (one JSON line per item): {output}")
    server = PREFECT_API_URL.value() or f"the ephemeral server's database in {PREFECT_HOME.value()}"
    print(f"Flow run, task runs and artifacts (progress, results table, report): {server}")
    print("Browse them with `prefect server start` and open http://127.0.0.1:4200")


if __name__ == "__main__":
    main()
