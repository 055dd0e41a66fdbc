"""Per-item overhead of ParallelBatchProcessor vs a bare Prefect task doing the same call.

    make benchmark                       # N=1000, C=50, 50 ms mock call
    .venv/bin/python benchmarks/overhead.py --items 1000 --concurrency 50 --latency 0.05

Every leg runs in this one process, against the same Prefect server, over the same items:
  asyncio   - asyncio.gather + Semaphore, no Prefect (the floor)
  bare-task - one plain @task per item inside a flow, same concurrency (the Prefect cost)
  processor - ParallelBatchProcessor, one task run per item (ours)
  persist   - the same with cache_results=True (each output persisted, for resuming)
Run it under PREFECT_LOGGING_LEVEL=INFO and =WARNING to see what logging costs.
Client CPU is this process's CPU time (the ephemeral server is a separate process).
Prints one table and writes benchmarks/overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from prefect import flow, get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from prefect_batch_llm import (
    LLMCallStrategy,
    LLMWorkItem,
    ParallelBatchProcessor,
    ProcessorConfig,
)


async def mock_call(prompt: str, latency: float) -> tuple[str, dict[str, int]]:
    await asyncio.sleep(latency)
    return f"answer to {prompt}", {"input_tokens": 10, "output_tokens": 5}


class MockCall(LLMCallStrategy[str]):
    def __init__(self, latency: float) -> None:
        self.latency = latency

    async def execute(self, prompt: Any, attempt: int, timeout: float, state: Any = None) -> Any:
        return await mock_call(prompt, self.latency)


async def leg_asyncio(n: int, c: int, latency: float) -> int:
    semaphore = asyncio.Semaphore(c)

    async def one(i: int) -> bool:
        async with semaphore:
            await mock_call(f"p{i}", latency)
            return True

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


@task(name="bare-item", cache_policy=NO_CACHE, persist_result=False)
async def bare_item(prompt: str, latency: float) -> str:
    output, _ = await mock_call(prompt, latency)
    return output


@flow(name="bench-bare-task")
async def leg_bare_task(n: int, c: int, latency: float) -> int:
    prompts = iter(range(n))
    done = 0

    async def worker() -> None:
        nonlocal done
        for i in prompts:
            await bare_item(f"p{i}", latency)
            done += 1

    await asyncio.gather(*(worker() for _ in range(c)))
    return done


@flow(name="bench-processor")
async def leg_processor(n: int, c: int, latency: float, persist: bool = False) -> int:
    strategy = MockCall(latency)
    config = ProcessorConfig(max_workers=c, cache_results=persist, report_artifacts=False)
    async with ParallelBatchProcessor(config=config) as processor:
        for i in range(n):
            await processor.add_work(
                LLMWorkItem(item_id=f"p{i}", strategy=strategy, prompt=f"p{i}")
            )
        result = await processor.process_all()
    return result.succeeded


async def count_task_runs(client: Any) -> int:
    response = await client.request("POST", "/task_runs/count", json={})
    return int(response.json())


async def settle(expected_task_runs: int, timeout: float = 300.0) -> float:
    """Wait until the server has recorded every task run so far (it ingests ~20-25/s).

    Without this, a leg competes for the 2 cores with the server digesting the previous leg.
    """
    started = time.perf_counter()
    async with get_client() as client:
        while time.perf_counter() - started < timeout:
            if await count_task_runs(client) >= expected_task_runs:
                break
            await asyncio.sleep(2)
    await asyncio.sleep(2)
    return time.perf_counter() - started


async def measure(
    name: str, leg: Callable[[int, int, float], Awaitable[int]], n: int, c: int, latency: float
) -> dict[str, Any]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    succeeded = await leg(n, c, latency)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "leg": name,
        "items": n,
        "succeeded": succeeded,
        "wall_s": round(wall, 2),
        "items_per_s": round(n / wall, 1),
        "of_ideal_pct": round(100 * (n * latency / c) / wall, 1),
        "cpu_ms_per_item": round(1000 * cpu / n, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    n, c, latency = args.items, args.concurrency, args.latency

    async with get_client() as client:
        recorded = await count_task_runs(client)
    await leg_bare_task(10, 5, 0.0)  # start the server and warm up imports before measuring
    await leg_processor(10, 5, 0.0)
    recorded += 20
    await settle(recorded)
    rows = [await measure("asyncio", leg_asyncio, n, c, latency)]
    # Two rounds in opposite orders, each leg after the server has settled.
    for order in (("bare-task", "processor"), ("processor", "bare-task")):
        for name in order:
            leg = leg_bare_task if name == "bare-task" else leg_processor
            rows.append(await measure(name, leg, n, c, latency))
            recorded += n
            await settle(recorded)

    async def leg_persist(n: int, c: int, latency: float) -> int:
        return await leg_processor(n, c, latency, persist=True)

    # A fresh result store: nothing cached from an earlier run, every output written.
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: Path(tempfile.mkdtemp())}):
        rows.append(await measure("persist", leg_persist, n, c, latency))

    def mean(name: str, key: str) -> float:
        values = [r[key] for r in rows if r["leg"] == name]
        return sum(values) / len(values)

    ratio = mean("processor", "cpu_ms_per_item") / mean("bare-task", "cpu_ms_per_item")
    wall_ratio = mean("processor", "wall_s") / mean("bare-task", "wall_s")
    header = (
        f"{'leg':<10} {'items':>6} {'ok':>6} {'wall s':>8} {'items/s':>8} {'% of C/L':>9} "
        f"{'CPU ms/item':>12} {'peak RSS MB':>12}"
    )
    print(f"\nN={n} C={c} L={latency}s  python {platform.python_version()}  cpus {os.cpu_count()}")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(header)
    for r in rows:
        print(
            f"{r['leg']:<10} {r['items']:>6} {r['succeeded']:>6} {r['wall_s']:>8} "
            f"{r['items_per_s']:>8} {r['of_ideal_pct']:>9} {r['cpu_ms_per_item']:>12} "
            f"{r['peak_rss_mb']:>12}"
        )
    print(
        f"processor / bare-task (mean of 2 rounds): CPU per item {ratio:.2f}x, "
        f"wall {wall_ratio:.2f}x"
    )
    args.out.write_text(
        json.dumps(
            {
                "args": vars(args) | {"out": str(args.out)},
                "rows": rows,
                "processor_vs_bare_cpu_ratio": round(ratio, 3),
                "processor_vs_bare_wall_ratio": round(wall_ratio, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
