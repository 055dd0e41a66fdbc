"""Throughput and scale, side by side, on the bundled Gemini emulator.

    pip install -e '.[bench]'            # async-batch-llm 0.28 and a fast HTTP stack
    python benchmarks/suite.py           # every scenario (about half an hour on 2 cores)
    python benchmarks/suite.py --scenarios 1,5 --scale 0.2   # a quicker look

Each scenario runs every leg in this one process, over the same items, against one emulator
process (started here with the scenario's latency and quota) and Prefect's ephemeral server:

  asyncio      asyncio.gather + Semaphore over the google-genai client (the practical limit);
               on a 429 it sleeps the Retry-After and tries again, nothing more
  bare-task    the same call as one plain Prefect @task per item, no framework
  abl          async-batch-llm 0.28 with an equivalent strategy and its Gemini classifier
  processor    ParallelBatchProcessor, one task run per item (GeminiStrategy)
  chunked      ParallelBatchProcessor(items_per_task=...), the large-batch mode

Figures per leg: wall time, items/s, % of the C/L ideal (or of the quota), client CPU per
item (this process), peak RSS during the leg, failed items, 429s the emulator answered,
generate calls it served (more than items + 429s = duplicates), emulator CPU. A leg that
creates task runs is followed by a wait until the Prefect server has recorded them all (it
ingests ~20-25 task runs/s here), so the next leg does not share the CPU with that backlog.
Prints one table per scenario and writes benchmarks/suite.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import httpx
import httpx2
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from prefect import flow, get_client, task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig, RetryConfig
from prefect_batch_llm.gemini import GeminiCredentials, GeminiStrategy

MODEL = "gemini-2.5-flash"
KEY = "bench-key"


@dataclass
class Scenario:
    number: int
    title: str
    items: int
    concurrency: int
    latency: float
    rpm: int | None = None
    legs: tuple[str, ...] = ("asyncio", "bare-task", "abl", "processor", "chunked")
    items_per_task: int = 200
    sample_rss: bool = False


SCENARIOS = [
    Scenario(1, "latency-bound: C=64, L=1 s", 2000, 64, 1.0),
    Scenario(2, "overhead-bound: C=50, L=50 ms", 5000, 50, 0.05),
    Scenario(3, "quota-bound: 600 RPM, C=32", 1000, 32, 0.1, rpm=600),
    Scenario(
        4,
        "scale: 20,000 items, C=64, L=0.2 s, RSS over time",
        20_000,
        64,
        0.2,
        legs=("asyncio", "abl", "chunked"),
        sample_rss=True,
    ),
    Scenario(
        5,
        "large-batch mode: C=256, L=0.5 s",
        10_000,
        256,
        0.5,
        legs=("asyncio", "abl", "chunked"),
        items_per_task=500,
    ),
]


# -- the emulator process --------------------------------------------------------------------


class EmulatorProcess:
    def __init__(self, latency: float, rpm: int | None) -> None:
        args = [
            sys.executable,
            "-m",
            "prefect_batch_llm.testing.emulator",
            "--port",
            "0",
            "--latency",
            str(latency),
            "--api-key",
            KEY,
        ]
        if rpm:
            args += ["--rpm", str(rpm)]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"(http://\S+)", line)
        if not match:
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.url = match.group(1)

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/_emulator/stats", timeout=30).json())

    def reset(self) -> None:
        httpx.post(f"{self.url}/_emulator/reset", timeout=30)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


# -- measuring -------------------------------------------------------------------------------


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class RssSampler:
    interval: float = 0.25
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> RssSampler:
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._started, rss_mb()))
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> float:
        return max((mb for _, mb in self.samples), default=rss_mb())


async def count_task_runs() -> int:
    async with get_client() as client:
        response = await client.request("POST", "/task_runs/count", json={})
        return int(response.json())


async def settle(expected: int, timeout: float = 900.0) -> float:
    """Wait until the Prefect server has recorded `expected` task runs in all."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout and await count_task_runs() < expected:
        await asyncio.sleep(2)
    return time.perf_counter() - started


# -- the legs --------------------------------------------------------------------------------


def new_client(url: str, concurrency: int) -> genai.Client:
    limits = httpx2.Limits(
        max_connections=concurrency + 16, max_keepalive_connections=concurrency + 16
    )
    return genai.Client(
        api_key=KEY,
        http_options=types.HttpOptions(
            base_url=url,
            api_version="v1beta",
            timeout=120_000,
            retry_options=types.HttpRetryOptions(attempts=1),
            async_client_args={"limits": limits},
        ),
    )


async def naive_call(client: genai.Client, prompt: str) -> bool:
    """One call, sleeping the Retry-After on 429 (what a hand-written loop would do)."""
    for _ in range(30):
        try:
            await client.aio.models.generate_content(model=MODEL, contents=prompt)
            return True
        except genai_errors.ClientError as exc:
            if exc.code != 429:
                return False
            await asyncio.sleep(float(exc.response.headers.get("retry-after", "1")))
        except Exception:
            return False
    return False


async def leg_asyncio(url: str, prompts: list[str], s: Scenario) -> int:
    client = new_client(url, s.concurrency)
    gate = asyncio.Semaphore(s.concurrency)

    async def one(prompt: str) -> bool:
        async with gate:
            return await naive_call(client, prompt)

    try:
        return sum(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        await client.aio.aclose()


_BARE_CLIENT: dict[str, genai.Client] = {}  # not a task parameter: Prefect would walk it


@task(name="bare-item", cache_policy=NO_CACHE, persist_result=False)
async def bare_item(prompt: str) -> bool:
    return await naive_call(_BARE_CLIENT["client"], prompt)


@flow(name="bench-bare-task")
async def _bare_task_flow(url: str, s: Scenario) -> int:
    _BARE_CLIENT["client"] = new_client(url, s.concurrency)
    queue = iter(_PROMPTS)
    ok = 0

    async def worker() -> None:
        nonlocal ok
        for prompt in queue:
            succeeded = await bare_item(prompt)  # not `ok += await ...`: that loses updates
            ok += succeeded

    await asyncio.gather(*(worker() for _ in range(s.concurrency)))
    await _BARE_CLIENT.pop("client").aio.aclose()
    return ok


async def leg_bare_task(url: str, prompts: list[str], s: Scenario) -> int:
    _PROMPTS[:] = prompts
    return await _bare_task_flow(url, s)


async def leg_abl(url: str, prompts: list[str], s: Scenario) -> int:
    import async_batch_llm as abl
    from async_batch_llm.classifiers.gemini import GeminiErrorClassifier as AblGemini

    client = new_client(url, s.concurrency)

    class AblStrategy(abl.LLMCallStrategy):  # type: ignore[misc]
        async def execute(self, prompt: str, attempt: int, timeout: float, state: Any = None):
            response = await client.aio.models.generate_content(model=MODEL, contents=prompt)
            usage = response.usage_metadata
            return response.text, {
                "input_tokens": usage.prompt_token_count or 0,
                "output_tokens": usage.candidates_token_count or 0,
            }

    strategy = AblStrategy()
    config = abl.ProcessorConfig(
        max_workers=s.concurrency,
        timeout_per_item=120,
        retry=abl.RetryConfig(max_attempts=3, initial_wait=0.5, max_wait=5),
    )
    async with abl.ParallelBatchProcessor(config=config, error_classifier=AblGemini()) as proc:
        for i, prompt in enumerate(prompts):
            await proc.add_work(abl.LLMWorkItem(item_id=f"i{i}", strategy=strategy, prompt=prompt))
        result = await proc.process_all()
    await client.aio.aclose()
    return int(result.succeeded)


async def _ours(url: str, prompts: list[str], s: Scenario, items_per_task: int | None) -> int:
    strategy = GeminiStrategy(
        credentials=GeminiCredentials(
            api_key=SecretStr(KEY), base_url=url, max_connections=s.concurrency + 16
        ),
        model=MODEL,
    )
    config = ProcessorConfig(
        max_workers=s.concurrency,
        timeout_per_item=120,
        retry=RetryConfig(max_attempts=3, initial_wait=0.5, max_wait=5),
        items_per_task=items_per_task,
        keep_results=False,
        report_artifacts=False,
    )
    async with ParallelBatchProcessor(config=config) as processor:
        result = await processor.process_stream(
            (
                LLMWorkItem(item_id=f"i{i}", strategy=strategy, prompt=p)
                for i, p in enumerate(prompts)
            ),
            total=len(prompts),
        )
    await strategy.credentials.aclose()
    return result.succeeded


# Flow legs read the prompts from here: 10,000 prompts exceed Prefect's 512 KB limit on the
# parameters of a flow run.
_PROMPTS: list[str] = []


@flow(name="bench-processor")
async def _processor_flow(url: str, s: Scenario) -> int:
    return await _ours(url, _PROMPTS, s, None)


@flow(name="bench-chunked")
async def _chunked_flow(url: str, s: Scenario) -> int:
    return await _ours(url, _PROMPTS, s, s.items_per_task)


async def leg_processor(url: str, prompts: list[str], s: Scenario) -> int:
    _PROMPTS[:] = prompts
    return await _processor_flow(url, s)


async def leg_chunked(url: str, prompts: list[str], s: Scenario) -> int:
    _PROMPTS[:] = prompts
    return await _chunked_flow(url, s)


LEGS: dict[str, Callable[[str, list[str], Scenario], Awaitable[int]]] = {
    "asyncio": leg_asyncio,
    "bare-task": leg_bare_task,
    "abl": leg_abl,
    "processor": leg_processor,
    "chunked": leg_chunked,
}
TASK_RUNS = {
    "bare-task": lambda s: s.items,
    "processor": lambda s: s.items,
    "chunked": lambda s: -(-s.items // s.items_per_task),
}


async def run_scenario(s: Scenario, scale: float) -> list[dict[str, Any]]:
    s.items = max(s.concurrency, int(s.items * scale))
    prompts = [f"Question {i}: summarize section {i % 97} of the handbook." for i in range(s.items)]
    emulator = EmulatorProcess(s.latency, s.rpm)
    ideal = s.rpm / 60 if s.rpm else s.concurrency / s.latency
    rows = []
    recorded = await count_task_runs()
    try:
        for name in s.legs:
            if name == "abl":
                try:
                    import async_batch_llm  # noqa: F401
                except ImportError:
                    print("  abl: skipped (pip install -e '.[bench]')")
                    continue
            emulator.reset()
            if s.rpm and rows:
                await asyncio.sleep(61)  # let the emulator's quota window empty between legs
            cpu0, emu0, wall0 = time.process_time(), emulator.cpu_seconds(), time.perf_counter()
            with RssSampler() as rss:
                ok = await LEGS[name](emulator.url, prompts, s)
            wall = time.perf_counter() - wall0
            cpu, emu_cpu = time.process_time() - cpu0, emulator.cpu_seconds() - emu0
            stats = emulator.stats()
            row = {
                "scenario": s.number,
                "leg": name,
                "items": s.items,
                "ok": ok,
                "failed": s.items - ok,
                "wall_s": round(wall, 1),
                "items_per_s": round(s.items / wall, 1),
                "pct_ideal": round(100 * s.items / wall / ideal, 1),
                "cpu_ms_item": round(1000 * cpu / s.items, 2),
                "peak_rss_mb": round(rss.peak),
                "429s": stats["calls_by_status"].get("429", 0),
                "calls": stats["generate_calls"],
                "emulator_cpu_s": round(emu_cpu, 1),
            }
            if s.sample_rss:
                series = rss.samples
                row["rss_mb_at_25_50_75_100pct"] = [
                    round(series[min(len(series) - 1, int(len(series) * f))][1])
                    for f in (0.25, 0.5, 0.75, 0.999)
                ]
            rows.append(row)
            print("  " + json.dumps(row), flush=True)
            if name in TASK_RUNS and name != s.legs[-1]:
                recorded += TASK_RUNS[name](s)
                waited = await settle(recorded)
                print(f"  (server recorded the task runs after {waited:.0f} s more)", flush=True)
    finally:
        emulator.stop()
    return rows


def table(s: Scenario, rows: list[dict[str, Any]]) -> str:
    basis = "of quota" if s.rpm else "of C/L"
    head = (
        f"{'leg':<10}{'items':>7}{'ok':>7}{'wall s':>8}{'items/s':>9}{'%' + basis:>10}"
        f"{'CPU ms/it':>10}{'RSS MB':>8}{'429s':>6}{'calls':>7}{'emu CPU s':>10}"
    )
    lines = [f"Scenario {s.number}: {s.title} ({s.items} items)", head]
    for r in rows:
        lines.append(
            f"{r['leg']:<10}{r['items']:>7}{r['ok']:>7}{r['wall_s']:>8}{r['items_per_s']:>9}"
            f"{r['pct_ideal']:>10}{r['cpu_ms_item']:>10}{r['peak_rss_mb']:>8}{r['429s']:>6}"
            f"{r['calls']:>7}{r['emulator_cpu_s']:>10}"
        )
        if "rss_mb_at_25_50_75_100pct" in r:
            lines.append(
                f"{'':<10}RSS MB at 25/50/75/100% of the leg: {r['rss_mb_at_25_50_75_100pct']}"
            )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="1,2,3,4,5")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every item count")
    parser.add_argument("--legs", help="only these legs, e.g. asyncio,processor")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("suite.json"))
    args = parser.parse_args()
    chosen = [s for s in SCENARIOS if str(s.number) in args.scenarios.split(",")]
    if args.legs:
        for s in chosen:
            s.legs = tuple(leg for leg in s.legs if leg in args.legs.split(","))
    await count_task_runs()  # start the ephemeral server before measuring
    results = {}
    for s in chosen:
        print(f"scenario {s.number}: {s.title}", flush=True)
        results[s.number] = (s, await run_scenario(s, args.scale))
    print(f"\npython benchmarks/suite.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{platform.python_version()} on {os.cpu_count()} cores; emulator in its own process")
    for s, rows in results.values():
        print("\n" + table(s, rows))
    args.out.write_text(json.dumps({str(k): v[1] for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
