"""Server ingest: how many per-item task runs per second a Prefect server records.

    python benchmarks/server_ingest.py                 # 5,000 items, 4 legs (~30+ min here)
    python benchmarks/server_ingest.py --items 500 --backends postgres --tunings tuned
    python benchmarks/server_ingest.py --backends sqlite --tunings tuned \
        --set PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED=false      # try another setting

Legs: SQLite (Prefect's default database) and Postgres (python -m
prefect_batch_llm.testing.postgres_server), each with Prefect 3.8.8's default server
settings and with the tuned ones below. Every leg starts a fresh server (empty database) in
its own process; a client process then runs one flow: ParallelBatchProcessor over N items
(one task run per item, MockStrategy with no latency, C=50, client logging at WARNING).
The client orchestrates task runs itself and reports them to the server as events; the
server's task run recorder turns those into rows. This process polls the server
(`POST /api/task_runs/count`, task runs of the flow in a final state) once a second until all
N are recorded: recorded/s = N / (all recorded - flow start). Prints one table, the settings
and the load average, and writes benchmarks/server_ingest.json.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from prefect_batch_llm.testing.postgres_server import INGEST_SETTINGS

FLOW_NAME = "server-ingest"
FINAL = ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Prefect 3.8.8 server settings that bear on task run ingest (all verified in
# prefect/settings/models/server/{services,database}.py), defaults in DEFAULTS.
TUNED = dict(INGEST_SETTINGS)
# Not tuned: the event persister's batch (PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE,
# 20, and _FLUSH_INTERVAL, 5 s): at 5,000 items with the recorder tuned, 500 and 1 s recorded
# 118/s against 137/s (noise) and the broker still dropped 3,721 events; with the triggers
# service off as well, 2,972. *_READ_BATCH_SIZE applies only to a Redis broker.
DEFAULTS = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "1",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "5",
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "5",
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "10",
}
# Anything a caller's environment sets for the server is removed so "default" is Prefect's.
SERVER_PREFIXES = ("PREFECT_SERVER_", "PREFECT_API_DATABASE_", "PREFECT_API_SERVICES_")


def client(items: int, concurrency: int, out: Path) -> None:
    """The client process: warm up, then one flow of `items` task runs; times to `out`."""
    from prefect import flow

    from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig
    from prefect_batch_llm.testing import MockStrategy

    async def run(n: int, tag: str) -> tuple[int, float, float]:
        start = time.time()
        config = ProcessorConfig(
            max_workers=concurrency, report_artifacts=False, keep_results=False
        )
        strategy = MockStrategy()
        async with ParallelBatchProcessor(config=config) as processor:
            result = await processor.process_stream(
                LLMWorkItem(item_id=f"{tag}-{i}", strategy=strategy, prompt=f"p{i}")
                for i in range(n)
            )
        return result.succeeded, start, time.time()

    warm_up = flow(name="server-ingest-warm-up")(run)
    measured = flow(name=FLOW_NAME)(run)
    asyncio.run(warm_up(20, "warm"))
    cpu0 = time.process_time()
    succeeded, start, end = asyncio.run(measured(items, "item"))
    out.write_text(
        json.dumps(
            {
                "succeeded": succeeded,
                "flow_start": start,
                "flow_end": end,
                "cpu_s": time.process_time() - cpu0,
            }
        )
    )


def tree_cpu(root: int) -> float:
    """CPU seconds of a process and its descendants (live ones, and reaped ones via cutime)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        stats[pid] = fields
        children.setdefault(int(fields[1]), []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        fields = stats.get(pid)
        if fields is None:
            continue
        total += sum(int(f) for f in fields[11:15]) / CLK_TCK  # utime stime cutime cstime
        todo += children.get(pid, [])
    return total


def postmaster_pid(data_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    return None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(backend: str, settings: dict[str, str], workdir: Path) -> Iterator[dict[str, Any]]:
    """A fresh Prefect server (and Postgres) with `settings`; yields its API URL and pids."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVER_PREFIXES)}
    env.pop("PREFECT_API_URL", None)
    env |= {
        "PREFECT_HOME": str(workdir / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **settings,
    }
    data_dir = workdir / "pg"
    if backend == "postgres":
        workdir.chmod(0o755)  # as root, Postgres runs as the postgres user
        module = "prefect_batch_llm.testing.postgres_server"
        command = [sys.executable, "-m", module, "start", "--data-dir", str(data_dir)]
        command += ["--port", "0", "--api-port", str(port)]
    else:
        command = [sys.executable, "-m", "prefect", "server", "start"]
        command += ["--host", "127.0.0.1", "--port", str(port)]
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(log_path.read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server not healthy in 180 s\n" + log_path.read_text()[-3000:])
            time.sleep(0.5)
        yield {"api": api, "pid": process.pid, "data_dir": data_dir, "log": log_path}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if backend == "postgres":  # a killed supervisor leaves Postgres running: stop it
            subprocess.run(
                [sys.executable, "-m", module, "stop", "--data-dir", str(data_dir)],
                capture_output=True,
                timeout=120,
            )


def count_task_runs(api: str, final_only: bool = True) -> int:
    body: dict[str, Any] = {"flows": {"name": {"any_": [FLOW_NAME]}}}
    if final_only:
        body["task_runs"] = {"state": {"type": {"any_": FINAL}}}
    return int(httpx.post(f"{api}/task_runs/count", json=body, timeout=30).json())


def leg(
    backend: str,
    settings: dict[str, str],
    tuning: str,
    items: int,
    concurrency: int,
    timeout: float,
    stall: float,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"server-ingest-{backend}-"))
    try:
        with server(backend, settings, workdir) as srv:
            out = workdir / "client.json"
            env = {
                **os.environ,
                "PREFECT_API_URL": srv["api"],
                "PREFECT_HOME": str(workdir / "client-home"),
                "PREFECT_LOGGING_LEVEL": "WARNING",
            }
            launched = time.time()
            cpu_server0 = tree_cpu(srv["pid"])
            pg = postmaster_pid(srv["data_dir"])
            cpu_postgres0 = tree_cpu(pg) if pg else 0.0
            command = [sys.executable, __file__, "--client", str(out), "--items", str(items)]
            client_process = subprocess.Popen(
                [*command, "--concurrency", str(concurrency)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=(workdir / "client.log").open("wb"),
            )
            # Until all are recorded, or the count has not moved for `stall` seconds after the
            # client finished (the server dropped events: those task runs never complete).
            count, last_change, stalled, client_ended = 0, time.time(), False, None
            while time.time() - launched < timeout:
                time.sleep(1)
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    now = count_task_runs(srv["api"])
                    if now != count:
                        count, last_change = now, time.time()
                if count >= items:
                    break
                if client_process.poll() not in (None, 0):
                    raise RuntimeError((workdir / "client.log").read_text()[-3000:])
                if client_process.poll() == 0:
                    client_ended = client_ended or time.time()
                    if time.time() - max(last_change, client_ended) > stall:
                        stalled = True
                        break
            client_process.wait(timeout=max(1.0, timeout - (time.time() - launched)))
            result = json.loads(out.read_text())
            server_cpu = tree_cpu(srv["pid"]) - cpu_server0
            postgres_cpu = tree_cpu(pg) - cpu_postgres0 if pg else None
            rows = count_task_runs(srv["api"], final_only=False)
            log = srv["log"].read_text(errors="replace")
        start, end = result["flow_start"], result["flow_end"]
        return {
            "backend": backend,
            "settings": tuning,
            "items": items,
            "succeeded": result["succeeded"],
            "client_s": round(end - start, 1),
            "client_per_s": round(items / (end - start), 1),
            "recorded": count,  # task runs of the flow in a final state
            "task_run_rows": rows,  # in any state (the rest stay Pending/Running)
            "recorded_in_s": round(last_change - start, 1),
            "recorded_per_s": round(count / (last_change - start), 1) if count else 0.0,
            "lag_after_client_s": round(last_change - end, 1),
            "client_cpu_s": round(result["cpu_s"], 1),
            "server_cpu_s": round(server_cpu, 1),
            "postgres_cpu_s": round(postgres_cpu, 1) if postgres_cpu is not None else None,
            "dropped_events": log.count("Subscription queue is full, dropping message"),
            "locked_errors": log.count("database is locked"),
            "complete": count >= items,
            "stalled": stalled,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--tunings", default="default,tuned")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per leg")
    parser.add_argument(
        "--stall",
        type=float,
        default=60,
        help="stop waiting when the count has not moved for this long after the client ended",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a server setting for the tuned legs, added to or replacing the tuned set",
    )
    parser.add_argument("--client", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    if args.client:
        client(args.items, args.concurrency, args.client)
        return
    tuned = TUNED | dict(item.split("=", 1) for item in args.set)
    started = datetime.datetime.now().astimezone()
    load_before = load_average()
    rows = []
    for backend in args.backends.split(","):
        for tuning in args.tunings.split(","):
            settings = tuned if tuning == "tuned" else DEFAULTS
            row = leg(
                backend, settings, tuning, args.items, args.concurrency, args.timeout, args.stall
            )
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    load_after = load_average()
    base = rows[0]["recorded_per_s"] or float("nan")
    command = " ".join(["python", "benchmarks/server_ingest.py", *sys.argv[1:]])
    print(
        f"\n{args.items} task runs (ParallelBatchProcessor, MockStrategy, C={args.concurrency}) "
        f"per leg, a fresh server each; {started:%Y-%m-%d %H:%M %Z}; python "
        f"{platform.python_version()}, {os.cpu_count()} cpus; load average before "
        f"{load_before}, after {load_after}\ncommand: {command}"
    )
    header = (
        f"{'database':<9}{'settings':<9}{'client s':>9}{'client/s':>9}{'recorded':>9}"
        f"{'in s':>7}{'recorded/s':>11}{'vs first':>9}{'lag s':>7}{'server CPU s':>13}"
        f"{'pg CPU s':>9}{'dropped':>8}{'locked':>7}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['backend']:<9}{r['settings']:<9}{r['client_s']:>9}{r['client_per_s']:>9}"
            f"{r['recorded']:>9}{r['recorded_in_s']:>7}{r['recorded_per_s']:>11}"
            f"{r['recorded_per_s'] / base:>8.2f}x{r['lag_after_client_s']:>7}"
            f"{r['server_cpu_s']:>13}{r['postgres_cpu_s'] or '-':>9}{r['dropped_events']:>8}"
            f"{r['locked_errors']:>7}"
        )
    print(
        "recorded: task runs in a final state; in s: from the flow's start to the last one "
        "recorded; lag: after the client finished; dropped: events the server's in-memory "
        "broker dropped (subscription queue full); locked: 'database is locked' in its log"
    )
    print("tuned settings (default in brackets):")
    for key, value in tuned.items():
        print(f"  {key}={value}  [{DEFAULTS.get(key, 'Prefect default')}]")
    args.out.write_text(
        json.dumps(
            {
                "command": command,
                "date": started.isoformat(timespec="seconds"),
                "load_average_before": load_before,
                "load_average_after": load_after,
                "cpus": os.cpu_count(),
                "tuned": tuned,
                "defaults": DEFAULTS,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
