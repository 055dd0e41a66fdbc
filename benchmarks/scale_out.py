"""Scale-out: one batch as 1, 2 and 4 shards on a work pool's workers, one quota, one server.

    .venv/bin/python benchmarks/scale_out.py                    # quota and free legs, 1/2/4
    .venv/bin/python benchmarks/scale_out.py --workers 1,2 --legs quota --items 600

Starts PostgreSQL and `prefect server start` on it (prefect_batch_llm.testing.postgres_server,
with the ingest settings of docs/guides/scale-out.md), a Gemini emulator in this process, a
process work pool with the `batch-llm` flow of this checkout deployed on it, and for each
worker count N: N `prefect worker start --limit 1` processes (one flow run each, as N
machines would), then a client process runs the `batch-llm-sharded` flow with `shards=N`
over the items through a saved `GeminiCachedStrategy` (a ~1,350-token cached context).

  quota  the emulator enforces 600 requests and 900,000 tokens (prompt tokens, cached
         included) per sliding minute (429 beyond); every shard shares one global limit of
         600 RPM and 900,000 TPM. Reports % of each quota reached, the busiest minute,
         429s, items lost or duplicated, and caches created.
  free   no quota and no global limit, 64 calls in flight per shard: items/s and CPU seconds
         per item by process count (this machine has 2 cores, so more processes share the
         same CPU).

One results file per leg is checked line by line; calls are timed where the emulator admits
them. Prints one table and writes benchmarks/scale_out.json. Ratios from one run on a
shared machine; not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from server_ingest import TUNED, postmaster_pid, server, tree_cpu

REPO = Path(__file__).resolve().parents[1]
POOL = "scale-out"
WORKER = [sys.executable, "-m", "prefect", "worker", "start"]
RPM = 600
TPM = 900_000
CONTEXT = "The handbook, section {n}: requests are answered in order. " * 90


def client(job_path: Path) -> None:
    """The client process: deploy the flow, save the strategy, run the sharded batch."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.flows import Flow
    from pydantic import SecretStr

    from prefect_batch_llm.flows import batch_llm_sharded
    from prefect_batch_llm.gemini import GeminiCachedStrategy, GeminiCredentials

    job = json.loads(job_path.read_text())

    async def run() -> dict[str, Any]:
        async with get_client() as api:
            with contextlib.suppress(Exception):  # an earlier leg created it
                await api.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        source: Any = await Flow.afrom_source(str(REPO), "flows/batch.py:batch_llm")
        await source.adeploy(name=POOL, work_pool_name=POOL, print_next_steps=False)
        await GeminiCachedStrategy(
            credentials=GeminiCredentials(
                api_key=SecretStr("scale-out-key"), base_url=job["emulator_url"]
            ),
            system_instruction="You answer from the handbook.",
            cached_documents=[CONTEXT],
        ).save(POOL, overwrite=True)
        state = await batch_llm_sharded(
            input=job["input"],
            strategy=f"gemini-cached-strategy/{POOL}",
            output=job["output"],
            shards=job["shards"],
            shard_deployment=f"batch-llm/{POOL}",
            config=job["config"],
            return_state=True,
        )
        return {"state": state.name, "summary": await state.aresult(raise_on_failure=False)}

    cpu0 = time.process_time()
    result = asyncio.run(run())
    result["cpu_s"] = time.process_time() - cpu0
    job_path.with_suffix(".out.json").write_text(json.dumps(result, default=str))


def busiest(points: list[tuple[float, int]], window: float) -> int:
    """The largest sum of weights of points within any `window` seconds."""
    ordered, best, first, total = sorted(points), 0, 0, 0
    for at, weight in ordered:
        total += weight
        while at - ordered[first][0] >= window:
            total -= ordered[first][1]
            first += 1
        best = max(best, total)
    return best


def stop_workers(pool: list[subprocess.Popen[bytes]]) -> None:
    """Ctrl-C each worker; kill what is left of it after 20 s."""
    for w in pool:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(w.pid, signal.SIGINT)
    for w in pool:
        try:
            w.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(w.pid, signal.SIGKILL)
            w.wait()


def leg(api: str, workdir: Path, workers: int, quota: bool, items: int) -> dict[str, Any]:
    from prefect_batch_llm.testing import GeminiEmulator

    tag = f"{'quota' if quota else 'free'}-{workers}-{int(time.time())}"
    leg_dir = workdir / tag
    leg_dir.mkdir()
    source = leg_dir / "items.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "prompt": f"{tag}: question {i} about the handbook?"}) + "\n"
            for i in range(items)
        )
    )
    # 16 calls in flight per shard reach the quota; without one, 64 make the CPU the bound.
    concurrency = 16 if quota else 64
    config: dict[str, Any] = {"max_workers": concurrency, "retry": {"max_rate_limit_retries": 50}}
    if quota:
        config |= {
            "global_limit_name": tag,
            "global_requests_per_minute": RPM,
            "global_tokens_per_minute": TPM,
        }
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(workdir / "client-home"),  # one result storage for every shard
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    quota_args = {"rpm": RPM, "tpm": TPM} if quota else {}
    admitted: list[tuple[float, int]] = []
    refused: list[float] = []
    with GeminiEmulator(latency=0.3, latency_jitter=0.2, **quota_args) as emulator:  # type: ignore[arg-type]
        check = emulator.state.check_quota

        def record(tokens: int) -> float | None:
            wait = check(tokens)
            if wait is None:
                admitted.append((time.monotonic(), tokens))
            else:
                refused.append(time.monotonic())
            return wait

        emulator.state.check_quota = record  # type: ignore[method-assign]
        job = leg_dir / "job.json"
        output = leg_dir / "all.results.jsonl"
        job.write_text(
            json.dumps(
                {
                    "emulator_url": emulator.base_url,
                    "input": str(source),
                    "output": str(output),
                    "shards": workers,
                    "config": config,
                }
            )
        )
        pool = [
            subprocess.Popen(
                [*WORKER, "--pool", POOL, "--limit", "1", "--name", f"{tag}-w{k}"],
                cwd=REPO,
                env=env,
                stdout=(leg_dir / f"worker-{k}.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for k in range(workers)
        ]
        try:
            began = time.monotonic()
            subprocess.run(
                [sys.executable, __file__, "--client", str(job)],
                env=env,
                check=True,
                stdout=(leg_dir / "client.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            wall = time.monotonic() - began
            workers_cpu = sum(tree_cpu(w.pid) for w in pool)
        finally:
            stop_workers(pool)
        stats = emulator.stats()
    out = json.loads(job.with_suffix(".out.json").read_text())
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    ids = [line["id"] for line in lines]
    starts = [at for at, _ in admitted]
    span = max(starts) - min(starts) if len(starts) > 1 else 0.0
    tokens = sum(t for _, t in admitted)
    first_refusal = min(refused) if refused else None
    row: dict[str, Any] = {
        "leg": "quota" if quota else "free",
        "workers": workers,
        "items": items,
        "state": out["state"],
        "succeeded": sum(1 for line in lines if line["success"]),
        "lost": items - len(set(ids)),
        "duplicated": len(ids) - len(set(ids)),
        "wall_s": round(wall, 1),
        "calls": len(admitted),
        "calls_per_min": round(60 * len(admitted) / span) if span else 0,
        "pct_rpm": round(100 * 60 * len(admitted) / span / RPM, 1) if span else 0.0,
        "busiest_60s_calls": busiest([(at, 1) for at in starts], 60.0),
        "tokens_per_min": round(60 * tokens / span) if span else 0,
        "pct_tpm": round(100 * 60 * tokens / span / TPM, 1) if span else 0.0,
        "busiest_60s_tokens": busiest(admitted, 60.0),
        "429s": len(refused),
        "429_pct": round(100 * len(refused) / max(1, len(refused) + len(admitted)), 2),
        "429s_after_first_minute": sum(1 for at in refused if at - began > 60),
        "first_429_after_s": round(first_refusal - began, 1) if first_refusal else None,
        "caches_created": stats["caches"]["created"],
        "items_per_s": round(items / wall, 1),
        "workers_cpu_s": round(workers_cpu, 1),
        "client_cpu_s": round(out["cpu_s"], 1),
        "cpu_ms_per_item": round(1000 * (workers_cpu + out["cpu_s"]) / items, 1),
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--legs", default="quota,free")
    parser.add_argument("--items", type=int, default=1500, help="items per quota leg")
    parser.add_argument("--free-items", type=int, default=3000, help="items per free leg")
    parser.add_argument("--client", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    if args.client:
        client(args.client)
        return
    started = datetime.datetime.now().astimezone()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    workdir = Path(tempfile.mkdtemp(prefix="scale-out-"))
    rows = []
    try:
        with server("postgres", TUNED, workdir) as srv:
            pg = postmaster_pid(srv["data_dir"])
            for name in args.legs.split(","):
                for workers in (int(n) for n in args.workers.split(",")):
                    server_cpu0 = tree_cpu(srv["pid"]) + (tree_cpu(pg) if pg else 0.0)
                    quota = name == "quota"
                    items = args.items if quota else args.free_items
                    row = leg(srv["api"], workdir, workers, quota, items)
                    server_cpu = tree_cpu(srv["pid"]) + (tree_cpu(pg) if pg else 0.0)
                    row["server_cpu_ms_per_item"] = round(
                        1000 * (server_cpu - server_cpu0) / items, 1
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    command = " ".join(["python", "benchmarks/scale_out.py", *sys.argv[1:]])
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n{started:%Y-%m-%d %H:%M %Z}; python {platform.python_version()}, "
        f"{os.cpu_count()} cpus; load average before {load_before}, after {load_after}\n"
        f"command: {command}\nquota legs: emulator {RPM} RPM and {TPM:,} TPM, global limit "
        "the same, 16 calls in flight per shard; free legs: 64; calls take 0.3-0.5 s; one "
        "PostgreSQL-backed server"
    )
    print(
        f"{'leg':<6}{'workers':>8}{'items':>6}{'lost':>5}{'dup':>4}{'ok':>6}{'wall s':>7}"
        f"{'% RPM':>7}{'busiest 60s':>12}{'% TPM':>7}{'429s':>5}{'caches':>7}{'items/s':>8}"
        f"{'calls/s':>8}{'CPU ms/item':>12}{'server ms/item':>15}"
    )
    for r in rows:
        print(
            f"{r['leg']:<6}{r['workers']:>8}{r['items']:>6}{r['lost']:>5}{r['duplicated']:>4}"
            f"{r['succeeded']:>6}{r['wall_s']:>7}{r['pct_rpm']:>7}{r['busiest_60s_calls']:>12}"
            f"{r['pct_tpm']:>7}{r['429s']:>5}{r['caches_created']:>7}{r['items_per_s']:>8}"
            f"{round(r['calls_per_min'] / 60, 1):>8}{r['cpu_ms_per_item']:>12}"
            f"{r['server_cpu_ms_per_item']:>15}"
        )
    args.out.write_text(
        json.dumps(
            {
                "command": command,
                "date": started.isoformat(timespec="seconds"),
                "load_average_before": load_before,
                "load_average_after": load_after,
                "cpus": os.cpu_count(),
                "rpm": RPM,
                "tpm": TPM,
                "server_settings": TUNED,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
