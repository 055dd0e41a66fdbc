"""What Prefect settings cost per item: logging level x result persistence.

    python benchmarks/settings.py            # 4 runs, each in its own process and server

Each combination runs ParallelBatchProcessor (one task run per item) over the same 1,000
items (C=50, a 50 ms mock call) in a fresh process with a fresh ephemeral server, so no run
shares the CPU with another's server backlog. Prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ITEMS, CONCURRENCY, LATENCY = 1000, 50, 0.05


def one_run(persist: bool) -> dict[str, Any]:
    """Runs in the child process: the environment already holds the logging level."""
    from prefect import flow

    from prefect_batch_llm import (
        LLMCallStrategy,
        LLMWorkItem,
        ParallelBatchProcessor,
        ProcessorConfig,
    )

    class MockCall(LLMCallStrategy[str]):
        async def execute(self, prompt: Any, attempt: int, timeout: float, state: Any = None):
            await asyncio.sleep(LATENCY)
            return f"answer to {prompt}", {"input_tokens": 10, "output_tokens": 5}

    @flow(name="bench-settings")
    async def batch(n: int) -> int:
        config = ProcessorConfig(
            max_workers=CONCURRENCY,
            cache_results=persist,
            report_artifacts=False,
            keep_results=False,
        )
        async with ParallelBatchProcessor(config=config) as processor:
            result = await processor.process_stream(
                LLMWorkItem(item_id=f"i{i}", strategy=MockCall(), prompt=f"p{i}-{n}")
                for i in range(n)
            )
        return result.succeeded

    asyncio.run(batch(20))  # start the server, warm up
    cpu0, wall0 = time.process_time(), time.perf_counter()
    ok = asyncio.run(batch(ITEMS))
    return {
        "ok": ok,
        "wall_s": round(time.perf_counter() - wall0, 2),
        "cpu_ms_item": round(1000 * (time.process_time() - cpu0) / ITEMS, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["persist", "plain"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child == "persist")))
        return
    rows = []
    for level in ("INFO", "WARNING"):
        for persist in (False, True):
            with tempfile.TemporaryDirectory() as home:
                env = {
                    **os.environ,
                    "PREFECT_HOME": home,
                    "PREFECT_LOGGING_LEVEL": level,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
                    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(Path(home) / "results"),
                }
                out = subprocess.run(
                    [sys.executable, __file__, "--child", "persist" if persist else "plain"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"logging": level, "persist": persist, **row})
                print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["cpu_ms_item"]
    print(
        f"\n{ITEMS} items, C={CONCURRENCY}, {int(LATENCY * 1000)} ms mock call; "
        f"command: python benchmarks/settings.py"
    )
    print(
        f"{'logging':<9}{'persist':>8}{'wall s':>8}{'CPU ms/item':>13}{'vs INFO, no persist':>21}"
    )
    for r in rows:
        print(
            f"{r['logging']:<9}{r['persist']!s:>8}{r['wall_s']:>8}{r['cpu_ms_item']:>13}"
            f"{r['cpu_ms_item'] / base:>20.2f}x"
        )


if __name__ == "__main__":
    main()
