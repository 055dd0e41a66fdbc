"""One quota across processes: Prefect global concurrency limits as a shared rate limit.

    .venv/bin/python benchmarks/global_limits.py                      # SQLite server
    .venv/bin/python benchmarks/global_limits.py --database-url postgresql+asyncpg://...
    .venv/bin/python benchmarks/global_limits.py --legs overhead,cooldown --seconds 20

Starts its own `prefect server start` (SQLite in a temporary PREFECT_HOME, or the database
given by --database-url) and measures, with `prefect_batch_llm._engine.global_limits`:

  overhead   one acquisition, uncontended: requests limit only, requests + tokens, and
             Prefect's own `rate_limit()` on the same limit (which also emits an event)
  slot-unit  one process taking a 10/s limit as fast as the server allows: achieved rate
             with 1 slot per request and with 100 (the server's decay is floored per update)
  processes  1, 2 and 4 processes, 8 concurrent calls each (200 ms each), one 600-RPM limit
             with 2 s of burst: calls per minute reached, the busiest 1 s and 10 s windows
             against the bucket's bound, refusals and acquisition latency
  cooldown   2 processes at 600 RPM; three times process 0 "gets a 429" and pauses everyone
             for 5 s, (a) through the limit's slots (PATCH active_slots, what the package
             does) or (b) through a Prefect Variable `<name>-cooldown-until` each process
             re-reads at most every second (before and after taking its slot): how long the
             other process keeps starting calls, and when calls resume
  batch      real batches: 1, 2 and 4 processes, each a ParallelBatchProcessor with a
             GeminiStrategy (16 workers, chunks of 50 items), against one Gemini emulator with
             a 600 RPM quota, for --batch-seconds: % of the quota reached, the busiest minute,
             429s, items lost or duplicated; and 2 processes limited in-process only
             (max_requests_per_minute=600 each), the situation before global limits

Prints one table per leg and writes benchmarks/global_limits.json. Ratios from one run on a
shared machine; not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

RPM = 600
BURST_SECONDS = 2.0
CALL_SECONDS = 0.2
CONCURRENCY = 8


# -- the server ---------------------------------------------------------------------------


def start_server(database_url: str | None) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": tempfile.mkdtemp(prefix="gcl-bench-")}
    env.pop("PREFECT_API_URL", None)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the Prefect server did not start within 120 s")


# -- helpers run in each process ----------------------------------------------------------


def limits_for(name: str, rpm: int, tpm: int | None = None) -> Any:
    from prefect_batch_llm import ProcessorConfig
    from prefect_batch_llm._engine.global_limits import GlobalLimits

    config = ProcessorConfig(
        global_limit_name=name,
        global_requests_per_minute=rpm,
        global_tokens_per_minute=tpm,
        global_burst_seconds=BURST_SECONDS,
    )
    limits = GlobalLimits.for_config(config)
    assert limits is not None
    return limits


async def reset_limit(name: str) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for suffix in ("-rpm", "-tpm"):
            with contextlib.suppress(Exception):
                await client.delete_global_concurrency_limit_by_name(name + suffix)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


# -- overhead -----------------------------------------------------------------------------


async def leg_overhead(n: int) -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.asyncio import rate_limit

    huge = 10**6  # never refuses: this leg measures the round trip only
    rows = []

    async def timed(label: str, call: Callable[[], Any]) -> None:
        await call()  # warm up (creates the limits)
        times = []
        for _ in range(n):
            started = time.perf_counter()
            await call()
            times.append(time.perf_counter() - started)
        rows.append(
            {
                "acquisition": label,
                "median_ms": round(statistics.median(times) * 1000, 1),
                "p95_ms": round(percentile(times, 0.95) * 1000, 1),
            }
        )

    await reset_limit("bench-oh")
    requests_only = limits_for("bench-oh", huge)
    await timed("requests limit (this package)", lambda: requests_only.acquire("x"))
    both = limits_for("bench-oh", huge, huge)
    await timed("requests + tokens (this package)", lambda: both.acquire("x" * 400))
    async with get_client() as client:
        with contextlib.suppress(Exception):
            await client.delete_global_concurrency_limit_by_name("bench-oh-prefect")
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(
                name="bench-oh-prefect", limit=huge, slot_decay_per_second=float(huge)
            )
        )
    await timed(
        "prefect rate_limit() (emits an event)",
        lambda: rate_limit("bench-oh-prefect", occupy=100, strict=True),
    )
    return rows


# -- slot unit ----------------------------------------------------------------------------


async def leg_slot_unit(seconds: float) -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client

    from prefect_batch_llm._engine.global_limits import Bucket, GlobalLimits

    rate = 10.0
    rows = []
    for scale in (1, 100):
        name = f"bench-unit-{scale}"
        await reset_limit(name)
        bucket = Bucket(name, 2 * scale, rate * scale, scale, int(rate * 60))
        limits = GlobalLimits(bucket, None)
        async with get_client() as client:
            await limits._ensure(client)
            started = time.monotonic()
            taken = 0
            while time.monotonic() - started < seconds:
                await limits._take(client, bucket, scale)
                taken += 1
        elapsed = time.monotonic() - started
        ideal = 2 + rate * elapsed
        rows.append(
            {
                "slots_per_request": scale,
                "taken": taken,
                "ideal": round(ideal),
                "pct_of_ideal": round(100 * taken / ideal, 1),
                "refusals": limits.refused,
            }
        )
    return rows


# -- processes ----------------------------------------------------------------------------


def cooldown_reader(name: str, ttl: float) -> Callable[[], Any]:
    """The Variable design: the cooldown's end (wall clock), re-read at most every `ttl` s."""
    from prefect.variables import Variable

    cache = {"until": 0.0, "read": -1e9}

    async def wait() -> None:
        now = time.monotonic()
        if now - cache["read"] >= ttl:
            cache["read"] = now
            value = await Variable.aget(f"{name}-cooldown-until", default=0.0)
            cache["until"] = float(value or 0.0)
        pause = cache["until"] - time.time()
        if pause > 0:
            await asyncio.sleep(pause)

    return wait


async def calls_in_process(
    name: str, seconds: float, start_at: float, cooldown: dict[str, Any] | None
) -> dict[str, Any]:
    """CONCURRENCY loops: acquire, then a CALL_SECONDS call; returns call-start wall times."""
    from prefect.variables import Variable

    limits = limits_for(name, RPM)
    variable_wait = (
        cooldown_reader(name, 1.0) if cooldown and cooldown["via"] == "variable" else None
    )
    await asyncio.sleep(max(0.0, start_at - time.time()))
    starts: list[float] = []
    latencies: list[float] = []
    end = time.time() + seconds
    paused_at: list[float] = []

    async def pause_everyone() -> None:
        assert cooldown is not None
        for at in cooldown["at"]:
            await asyncio.sleep(max(0.0, at - time.time()))
            paused_at.append(time.time())  # the moment a call of this process "got a 429"
            if cooldown["via"] == "slots":
                await limits.cooldown(cooldown["seconds"])
            else:
                until = time.time() + cooldown["seconds"]
                await Variable.aset(f"{name}-cooldown-until", until, overwrite=True)

    async def loop() -> None:
        while time.time() < end:
            if variable_wait is not None:
                await variable_wait()
            began = time.perf_counter()
            await limits.acquire("x")
            if variable_wait is not None:  # and again after the slot: the best it can do
                await variable_wait()
            latencies.append(time.perf_counter() - began)
            starts.append(time.time())
            await asyncio.sleep(CALL_SECONDS)

    tasks = [loop() for _ in range(CONCURRENCY)]
    if cooldown is not None and cooldown.get("trigger"):
        tasks.append(pause_everyone())
    await asyncio.gather(*tasks)
    return {
        "starts": starts,
        "latencies": latencies,
        "refused": limits.refused,
        "paused_at": paused_at,
    }


async def in_client_context(work: Any) -> Any:
    """Run `work` with one shared Prefect client, as inside a flow run (where the batch runs:
    `get_client()` then returns the run's client instead of opening a new one, ~50 ms)."""
    from prefect.context import AsyncClientContext

    async with AsyncClientContext():
        return await work


def process_main(args: dict[str, Any]) -> dict[str, Any]:
    os.environ["PREFECT_API_URL"] = args["api_url"]
    work = calls_in_process(args["name"], args["seconds"], args["start_at"], args.get("cooldown"))
    result: dict[str, Any] = asyncio.run(in_client_context(work))
    return result


def run_processes(
    api_url: str, name: str, count: int, seconds: float, cooldowns: list[Any] | None = None
) -> list[dict[str, Any]]:
    asyncio.run(reset_limit(name))
    start_at = time.time() + 8 + 2 * count  # every process imported and waiting
    jobs = [
        {
            "api_url": api_url,
            "name": name,
            "seconds": seconds,
            "start_at": start_at,
            "cooldown": cooldowns[i] if cooldowns else None,
        }
        for i in range(count)
    ]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(count, mp_context=context) as pool:
        return list(pool.map(process_main, jobs))


def busiest(starts: list[float], window: float) -> int:
    ordered, best, first = sorted(starts), 0, 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def leg_processes(api_url: str, seconds: float) -> list[dict[str, Any]]:
    from prefect_batch_llm._engine.global_limits import SLOTS_PER_REQUEST, Bucket

    bucket = Bucket.sized("x", RPM, BURST_SECONDS, SLOTS_PER_REQUEST)
    burst, rate = bucket.capacity / SLOTS_PER_REQUEST, bucket.decay / SLOTS_PER_REQUEST
    rows = []
    for count in (1, 2, 4):
        results = run_processes(api_url, f"bench-proc-{count}", count, seconds)
        starts = [t for r in results for t in r["starts"]]
        latencies = [t for r in results for t in r["latencies"]]
        span = max(starts) - min(starts)
        rows.append(
            {
                "processes": count,
                "calls": len(starts),
                "calls_per_min": round(60 * (len(starts) - burst) / span),
                "pct_of_quota": round(100 * 60 * (len(starts) - burst) / span / RPM, 1),
                "busiest_1s": busiest(starts, 1.0),
                "bound_1s": round(burst + rate * 1.0, 1),
                "busiest_10s": busiest(starts, 10.0),
                "bound_10s": round(burst + rate * 10.0, 1),
                "refusals_per_call": round(sum(r["refused"] for r in results) / len(starts), 2),
                "acquire_p50_ms": round(statistics.median(latencies) * 1000),
                "acquire_p95_ms": round(percentile(latencies, 0.95) * 1000),
            }
        )
    return rows


def leg_cooldown(api_url: str, seconds: float) -> list[dict[str, Any]]:
    """Pauses at 20 %, 45 % and 70 % of the run; per pause, what the other process did."""
    rows = []
    pause = 5.0
    for via in ("slots", "variable"):
        begin = time.time() + 12  # after run_processes' start_at for two processes
        ats = [begin + seconds * share for share in (0.2, 0.45, 0.7)]
        cooldowns = [
            {"via": via, "seconds": pause, "at": ats, "trigger": True},
            {"via": via, "seconds": pause, "at": ats},
        ]
        results = run_processes(api_url, f"bench-cool-{via}", 2, seconds, cooldowns)
        other, everyone = results[1]["starts"], results[0]["starts"] + results[1]["starts"]
        kept_going, resumed, in_pause = [], [], []
        for t0 in results[0]["paused_at"]:
            stopped = [t - t0 for t in other if t0 <= t < t0 + pause - 0.5]
            kept_going.append(max(stopped, default=0.0))
            in_pause.append(len(stopped))
            resumed.append(min((t - t0 for t in everyone if t >= t0 + pause - 0.5), default=0))
        rows.append(
            {
                "design": via,
                "pauses": len(kept_going),
                "other_kept_starting_s_median": round(statistics.median(kept_going), 2),
                "other_kept_starting_s_max": round(max(kept_going), 2),
                "other_starts_in_pause_max": max(in_pause),
                "resumed_after_s_median": round(statistics.median(resumed), 2),
                "pause_s": pause,
            }
        )
    return rows


# -- real batches against the emulator ----------------------------------------------------


async def batch_in_process(args: dict[str, Any]) -> dict[str, Any]:
    from pydantic import SecretStr

    from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig
    from prefect_batch_llm.gemini import GeminiCredentials, GeminiStrategy

    strategy = GeminiStrategy(
        credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=args["emulator_url"])
    )
    config = ProcessorConfig(
        max_workers=16,
        items_per_task=50,
        report_artifacts=False,
        progress_bar=False,
        **args["config"],
    )
    processor = ParallelBatchProcessor(config)
    for item_id, prompt in args["items"]:
        await processor.add_work(LLMWorkItem(item_id=item_id, strategy=strategy, prompt=prompt))
    await asyncio.sleep(max(0.0, args["start_at"] - time.time()))
    result = await processor.process_all()
    return {
        "ids": [r.item_id for r in result.results if r.success],
        "failed": sum(1 for r in result.results if not r.success),
        "tokens": sum(
            r.token_usage.get("input_tokens", 0) + r.token_usage.get("output_tokens", 0)
            for r in result.results
        ),
    }


def batch_process_main(args: dict[str, Any]) -> dict[str, Any]:
    os.environ["PREFECT_API_URL"] = args["api_url"]
    result: dict[str, Any] = asyncio.run(batch_in_process(args))
    return result


def leg_batch(api_url: str, seconds: float) -> list[dict[str, Any]]:
    from prefect_batch_llm.testing import GeminiEmulator

    rows = []
    runs: list[tuple[str, int, dict[str, Any]]] = [
        (f"global {RPM} RPM", count, {"global_requests_per_minute": RPM}) for count in (1, 2, 4)
    ]
    runs.append(("in-process only", 2, {"max_requests_per_minute": RPM}))
    total = int(RPM * seconds / 60)
    for label, count, limit in runs:
        name = f"bench-batch-{count}-{int(time.time())}"
        settings = dict(limit)
        if "global_requests_per_minute" in settings:
            settings |= {"global_limit_name": name, "global_burst_seconds": BURST_SECONDS}
        settings["retry"] = {"max_rate_limit_retries": 50}
        arrivals: list[float] = []
        with GeminiEmulator(latency=0.3, latency_jitter=0.2, rpm=RPM) as emulator:
            pick_fault = emulator.state.pick_fault

            def record(
                call: int | None,
                prompt: str,
                tier: str = "standard",
                seen: list[float] = arrivals,
                pick: Any = pick_fault,
            ) -> Any:
                seen.append(time.monotonic())
                return pick(call, prompt, tier)

            emulator.state.pick_fault = record  # type: ignore[method-assign]
            start_at = time.time() + 10 + 3 * count
            jobs = [
                {
                    "api_url": api_url,
                    "emulator_url": emulator.base_url,
                    "config": settings,
                    "start_at": start_at,
                    "items": [
                        (f"p{p}-{i}", f"Question {i} of process {p}: " + "lorem ipsum " * 30)
                        for i in range(p, total, count)
                    ],
                }
                for p in range(count)
            ]
            began = time.monotonic()
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(count, mp_context=context) as pool:
                results = list(pool.map(batch_process_main, jobs))
            statuses = emulator.stats()["calls_by_status"]
        ids = [item for r in results for item in r["ids"]]
        span = (max(arrivals) - min(arrivals)) if arrivals else 0.0
        answered = statuses.get("200", 0)
        rows.append(
            {
                "limit": label,
                "processes": count,
                "items": total,
                "succeeded": len(set(ids)),
                "duplicated": len(ids) - len(set(ids)),
                "lost": total - len(set(ids)) - sum(r["failed"] for r in results),
                "wall_s": round(time.monotonic() - began),
                "calls_per_min": round(60 * answered / span) if span else 0,
                "pct_of_quota": round(100 * answered / span * 60 / RPM, 1) if span else 0,
                "busiest_60s": busiest(arrivals, 60.0),
                "429s": statuses.get("429", 0),
                "429_pct_of_calls": round(100 * statuses.get("429", 0) / max(1, len(arrivals)), 1),
            }
        )
        asyncio.run(reset_limit(name))
    return rows


# -- main ---------------------------------------------------------------------------------


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    if not rows:
        return
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[k]).ljust(w) for k, w in zip(keys, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="the server's database (default: SQLite)")
    parser.add_argument("--api-url", help="use this running server instead of starting one")
    parser.add_argument("--legs", default="overhead,slot-unit,processes,cooldown,batch")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each run")
    parser.add_argument(
        "--batch-seconds", type=float, default=90.0, help="quota-minutes of work per batch run"
    )
    parser.add_argument("--output", default=str(Path(__file__).with_suffix(".json")))
    options = parser.parse_args()
    legs = options.legs.split(",")
    server = None
    if options.api_url:
        api_url = options.api_url
    else:
        server, api_url = start_server(options.database_url)
    os.environ["PREFECT_API_URL"] = api_url
    database = "postgresql" if options.database_url else "sqlite"
    report: dict[str, Any] = {"database": database, "cpus": os.cpu_count()}
    try:
        if "overhead" in legs:
            report["overhead"] = asyncio.run(in_client_context(leg_overhead(200)))
            print_table(f"overhead per acquisition ({database})", report["overhead"])
        if "slot-unit" in legs:
            work = leg_slot_unit(min(options.seconds, 15.0))
            report["slot_unit"] = asyncio.run(in_client_context(work))
            print_table(f"slot unit, one 10/s limit ({database})", report["slot_unit"])
        if "processes" in legs:
            report["processes"] = leg_processes(api_url, options.seconds)
            print_table(
                f"processes sharing {RPM} RPM, {BURST_SECONDS:g} s burst ({database})",
                report["processes"],
            )
        if "cooldown" in legs:
            report["cooldown"] = leg_cooldown(api_url, options.seconds)
            print_table(f"a 429 pauses the other process ({database})", report["cooldown"])
        if "batch" in legs:
            report["batch"] = leg_batch(api_url, options.batch_seconds)
            print_table(f"batches against a {RPM}-RPM emulator quota ({database})", report["batch"])
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    Path(options.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
