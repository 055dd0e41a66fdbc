"""prefect-dask's DaskTaskRunner vs ParallelBatchProcessor, side by side on one batch.

Not part of the package or its tests: it needs `prefect-dask`, which the project does not
depend on. `make benchmark-dask` runs it from its own venv (.venv-dask):

    python3 -m venv .venv-dask
    .venv-dask/bin/pip install -e . prefect-dask==0.3.7
    .venv-dask/bin/python benchmarks/dask_runner.py --items 300

Every leg calls a local Gemini emulator (`python -m prefect_batch_llm.testing.emulator`,
50 ms per call, a subprocess) through the real google-genai client of a `GeminiStrategy`
whose `GeminiCredentials.api_key` is a random canary, 16 calls in flight:
  processor  - ParallelBatchProcessor in this process (how users run a batch)
  dask       - a flow on DaskTaskRunner (LocalCluster: 2 worker processes x 8 threads)
               that .submit()s one async @task per item (strategy.prepare/execute/cleanup)
  dask-sync  - the same with a sync @task on google-genai's sync client, one per process
  threads    - the async-task flow on Prefect's ThreadPoolTaskRunner (16 threads)
  dask-kill  - slow tasks on the Dask cluster; one worker process is SIGKILLed mid-task
  ephemeral  - a tiny Dask flow with no PREFECT_API_URL: where do the workers report?
The Dask legs share one LocalCluster (its start is measured once: a DaskTaskRunner with
cluster_kwargs pays it on every flow run). The measured legs share one Prefect server, the
ephemeral one started explicitly and given to the flows as PREFECT_API_URL (as a real server
would be). Each task leg first runs 16 warm-up tasks, then times the items. CPU is read from
/proc/<pid>/stat (utime+stime+cutime+cstime) for this process and all its descendants, by
role: main (this process: flow, Dask scheduler and client), workers (Dask worker
processes), server, emulator. Server CPU runs until the server has recorded the leg's task
runs. Prints a table and writes JSON (default benchmarks/dask_runner.json).
"""

from __future__ import annotations

import os
import tempfile

# Before Prefect is imported (its settings are read at import). Spawned Dask workers
# re-import this module as __mp_main__ and inherit the variables. Prefect's home is a new
# temporary directory of this run, removed at the end (the user's PREFECT_HOME is not used),
# and no run reaches the user's Prefect server or Cloud workspace.
if "_DASK_RUNNER_WORKDIR" not in os.environ:  # set once, by the main process
    os.environ["_DASK_RUNNER_WORKDIR"] = tempfile.mkdtemp(prefix="dask-runner-")
os.environ["PREFECT_HOME"] = os.path.join(os.environ["_DASK_RUNNER_WORKDIR"], "prefect-home")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_API_KEY", None)
os.environ.pop("PREFECT_PROFILE", None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import argparse
import asyncio
import contextlib
import faulthandler
import hashlib
import json
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle  # type: ignore[import-untyped]
from distributed import Client, LocalCluster
from prefect import flow, get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, serialize_context
from prefect.futures import PrefectFuture
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask.task_runners import DaskTaskRunner
from pydantic import SecretStr

from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig
from prefect_batch_llm.gemini import GeminiCredentials, GeminiStrategy
from prefect_batch_llm.strategy import unpack_execute_result

HOME = Path(os.environ["PREFECT_HOME"])
DASK_DIR = HOME.parent / "dask-space"
N_WORKERS, THREADS = 2, 8
CONCURRENCY = N_WORKERS * THREADS
CLUSTER: dict[str, Any] = {
    "n_workers": N_WORKERS,
    "threads_per_worker": THREADS,
    "local_directory": str(DASK_DIR),
    "dashboard_address": ":0",
}
CLK = os.sysconf("SC_CLK_TCK")
STUCK_AFTER_S = 60.0
# SIGUSR1 prints every thread's stack to stderr, here and in the Dask workers (which import
# this module as __mp_main__ and share this process's stderr).
faulthandler.register(signal.SIGUSR1, all_threads=True)


# --- CPU of the process tree -------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime+stime+cutime+cstime seconds) of every process."""
    table: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
        table[int(entry.name)] = (int(fields[1]), ticks / CLK)
    return table


def _role(pid: int) -> str:
    if pid == os.getpid():
        return "main"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return "workers"
    if b"prefect.server.api.server:create_app" in cmdline:
        return "server"
    if b"prefect_batch_llm.testing.emulator" in cmdline:
        return "emulator"
    return "workers"  # Dask worker processes (and multiprocessing's resource tracker)


def tree_cpu() -> dict[str, Any]:
    """CPU seconds so far of this process and its descendants, by role, and the pids."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    totals = {"main": 0.0, "workers": 0.0, "server": 0.0, "emulator": 0.0}
    pids: dict[str, list[int]] = {role: [] for role in totals}
    stack = [os.getpid()]
    while stack:
        pid = stack.pop()
        if pid in table:
            role = _role(pid)
            totals[role] += table[pid][1]
            pids[role].append(pid)
        stack.extend(children.get(pid, []))
    return {"cpu": totals, "pids": pids}


def dump_stacks() -> None:
    print("=== stuck: stacks of the flow process and the Dask workers", file=sys.stderr)
    faulthandler.dump_traceback(all_threads=True)
    for pid in tree_cpu()["pids"]["workers"]:
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGUSR1)
    time.sleep(2)


def cpu_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    delta = {role: after["cpu"][role] - before["cpu"][role] for role in before["cpu"]}
    delta["client"] = delta["main"] + delta["workers"]
    delta["total"] = delta["client"] + delta["server"] + delta["emulator"]
    return delta


# --- The server ---------------------------------------------------------------------------


def count_task_runs(flow_run_id: str, completed_only: bool = False) -> int:
    body: dict[str, Any] = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    if completed_only:
        body["task_runs"] = {"state": {"type": {"any_": ["COMPLETED"]}}}
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/task_runs/count", json=body)
    return int(response.json())


def settle(flow_run_id: str, expected: int, timeout: float) -> tuple[int, float]:
    """Wait until the server recorded `expected` task runs of the flow run (it ingests them
    from events, after the flow returns)."""
    started = time.monotonic()
    seen = count_task_runs(flow_run_id)
    while seen < expected and time.monotonic() - started < timeout:
        time.sleep(1.0)
        seen = count_task_runs(flow_run_id)
    return seen, time.monotonic() - started


def grep_files(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and needle in path.read_bytes():
                hits.append(str(path))
        except OSError:
            continue
    return hits


# --- The work -----------------------------------------------------------------------------


def prompts(n: int, tag: str) -> list[str]:
    return [f"{tag} question {i} about the handbook?" for i in range(n)]


def _key(strategy: GeminiStrategy) -> str:
    key = strategy.credentials.api_key
    return key.get_secret_value() if key is not None else ""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _answer(strategy: GeminiStrategy, digest: str, output: Any) -> dict[str, Any]:
    """The task's process, and whether the key it holds is the canary (compared by digest:
    the canary itself is never a parameter, so finding it anywhere means the key leaked)."""
    return {
        "pid": os.getpid(),
        "has_canary": _digest(_key(strategy)) == digest,
        "chars": len(str(output)),
    }


@task(name="gemini-item", cache_policy=NO_CACHE, persist_result=False)
async def gemini_item(strategy: GeminiStrategy, prompt: str, digest: str) -> dict[str, Any]:
    """One call through the strategy, as a bare async task. Both task runners run each async
    task on a new event loop (asyncio.run per task), and google-genai's async client is bound
    to its loop, so each task prepares its own copy: a new client (and connection) per item."""
    mine = strategy.model_copy()
    await mine.prepare()
    try:
        output, _, _ = unpack_execute_result(await mine.execute(prompt, 1, 30.0), source="bench")
    finally:
        await mine.cleanup()
    return _answer(strategy, digest, output)


@task(name="gemini-item-sync", cache_policy=NO_CACHE, persist_result=False)
def gemini_item_sync(strategy: GeminiStrategy, prompt: str, digest: str) -> dict[str, Any]:
    """The same call as a sync task, on google-genai's sync client: outside an event loop
    `GeminiCredentials.get_client()` returns one client per process, shared by its threads
    (the best a per-item task can do on Dask; the project's strategies are async-only)."""
    client = strategy.credentials.get_client()
    response = client.models.generate_content(
        model=strategy.model, contents=prompt, config=strategy.generation_config()
    )
    output, _, _ = unpack_execute_result(strategy.parse_response(response), source="bench")
    return _answer(strategy, digest, output)


def _wait_all(futures: list[PrefectFuture[Any]]) -> dict[str, Any]:
    ok, has_canary = 0, 0
    errors: dict[str, int] = {}
    pids: set[int] = set()
    first_error = ""
    # Stuck tasks were seen on Dask: after 60 s without a result, dump every thread's stack
    # (this process and the Dask workers), then give each remaining future 1 s.
    timeout = STUCK_AFTER_S
    for future in futures:
        try:
            out = future.result(timeout=timeout)
        except Exception as exc:
            name = type(exc).__name__
            if timeout == STUCK_AFTER_S and isinstance(exc, TimeoutError):
                timeout = 1.0
                dump_stacks()
            errors[name] = errors.get(name, 0) + 1
            first_error = first_error or f"{name}: {exc}"[:200]
            continue
        ok += 1
        if isinstance(out, dict):
            pids.add(out["pid"])
            has_canary += bool(out["has_canary"])
        else:
            pids.add(int(out))
    return {
        "succeeded": ok,
        "errors": errors,
        "first_error": first_error,
        "task_pids": len(pids),
        "has_canary": has_canary,
    }


def _submit_all(item: Any, strategy: GeminiStrategy, n: int, digest: str) -> dict[str, Any]:
    """Warm up (one task per thread: imports, first client), then time `n` tasks."""
    context = FlowRunContext.get()
    assert context is not None and context.flow_run is not None
    warm = [item.submit(strategy, p, digest) for p in prompts(CONCURRENCY, "warm")]
    _wait_all(warm)
    before = tree_cpu()
    began = time.monotonic()
    outcome = _wait_all([item.submit(strategy, p, digest) for p in prompts(n, "item")])
    outcome |= {
        "flow_run_id": str(context.flow_run.id),
        "task_runs_expected": n + CONCURRENCY,
        "inner_wall_s": time.monotonic() - began,
        "inner_cpu": cpu_delta(before, tree_cpu()),
        # What the task runner ships with every task: the flow's parameters and settings.
        "canary_in_task_context": _key(strategy).encode() in cloudpickle.dumps(serialize_context()),
    }
    return outcome


@flow(name="bench-dask")
def leg_dask(strategy: GeminiStrategy, n: int, digest: str, sync: bool) -> dict[str, Any]:
    outcome = _submit_all(gemini_item_sync if sync else gemini_item, strategy, n, digest)
    context = FlowRunContext.get()
    assert context is not None
    client = context.task_runner.client  # type: ignore[attr-defined]
    logs = json.dumps([client.get_scheduler_logs(), client.get_worker_logs()], default=str)
    outcome["canary_in_dask_logs"] = _key(strategy) in logs
    return outcome


THREADS_RUNNER: Any = ThreadPoolTaskRunner(max_workers=CONCURRENCY)


@flow(name="bench-threads", task_runner=THREADS_RUNNER)
def leg_threads(strategy: GeminiStrategy, n: int, digest: str, sync: bool) -> dict[str, Any]:
    return _submit_all(gemini_item_sync if sync else gemini_item, strategy, n, digest)


@flow(name="bench-processor")
async def leg_processor(strategy: GeminiStrategy, n: int, digest: str) -> dict[str, Any]:
    context = FlowRunContext.get()
    assert context is not None and context.flow_run is not None
    before = tree_cpu()
    began = time.monotonic()
    config = ProcessorConfig(max_workers=CONCURRENCY, report_artifacts=False, progress_bar=False)
    processor = ParallelBatchProcessor[str, Any, None](config=config)
    async with processor:
        for i, prompt in enumerate(prompts(n, "item")):
            await processor.add_work(LLMWorkItem(item_id=f"q{i}", strategy=strategy, prompt=prompt))
        result = await processor.process_all()
    return {
        "succeeded": result.succeeded,
        "errors": {"failed items": result.failed} if result.failed else {},
        "task_pids": 1,
        "flow_run_id": str(context.flow_run.id),
        "task_runs_expected": n,
        "inner_wall_s": time.monotonic() - began,
        "inner_cpu": cpu_delta(before, tree_cpu()),
    }


@task(name="slow-item", cache_policy=NO_CACHE, persist_result=False)
async def slow_item(i: int, seconds: float) -> int:
    await asyncio.sleep(seconds)
    return os.getpid()


@flow(name="bench-dask-kill")
def leg_dask_kill(n: int, seconds: float) -> dict[str, Any]:
    context = FlowRunContext.get()
    assert context is not None and context.flow_run is not None
    client = context.task_runner.client  # type: ignore[attr-defined]
    pids = client.run(os.getpid)
    futures = [slow_item.submit(i, seconds) for i in range(n)]
    time.sleep(seconds / 2)
    victim = min(pids.values())
    os.kill(victim, signal.SIGKILL)
    began = time.monotonic()
    outcome = _wait_all(futures)
    return {
        "flow_run_id": str(context.flow_run.id),
        "task_run_ids": [str(f.task_run_id) for f in futures],
        "tasks": n,
        "task_seconds": seconds,
        "victim_pid": victim,
        "worker_pids_before": sorted(pids.values()),
        "worker_pids_after": sorted(client.run(os.getpid).values()),
        "outcome": outcome,
        "wait_after_kill_s": round(time.monotonic() - began, 2),
    }


def kill_report(out: dict[str, Any]) -> dict[str, Any]:
    """What the server holds for the killed leg's task runs: final states, Running counts."""
    settle(out["flow_run_id"], len(out["task_run_ids"]), 30)
    finals: dict[str, int] = {}
    running_twice = 0
    with get_client(sync_client=True) as client:
        for run_id in out["task_run_ids"]:
            states = client.read_task_run_states(uuid.UUID(run_id))
            final = str(states[-1].name) if states else "none"
            finals[final] = finals.get(final, 0) + 1
            running_twice += sum(s.name == "Running" for s in states) > 1
    return {"server_final_states": finals, "task_runs_with_2_running_states": running_twice}


@flow(name="bench-dask-ephemeral")
def leg_ephemeral(n: int) -> dict[str, Any]:
    context = FlowRunContext.get()
    assert context is not None and context.flow_run is not None
    futures = [slow_item.submit(i, 0.1) for i in range(n)]
    outcome = _wait_all(futures)
    servers = tree_cpu()["pids"]["server"]
    ports = set()
    for pid in servers:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--port" in args:
            ports.add(args[args.index(b"--port") + 1].decode())
    return {
        "flow_run_id": str(context.flow_run.id),
        "outcome": outcome,
        "prefect_server_processes_in_tree": len(servers),
        "server_ports": sorted(ports),
    }


# --- Driver -------------------------------------------------------------------------------


def start_emulator(latency: float, api_key: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "prefect_batch_llm.testing.emulator"),
            *("--port", "0", "--latency", str(latency), "--api-key", api_key),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"emulator did not start: {line!r}")
    return process, line.rsplit(" ", 1)[-1].strip()


def precheck(strategy: GeminiStrategy, canary: str) -> dict[str, Any]:
    """Can the strategy be shipped, before and after prepare()? Is the key in the pickle?"""
    facts: dict[str, Any] = {}
    blob = cloudpickle.dumps(strategy)
    facts["unprepared_pickles"] = True
    facts["canary_in_pickle"] = canary.encode() in blob

    async def prepared() -> str:
        copy = strategy.model_copy()
        await copy.prepare()
        try:
            cloudpickle.dumps(copy)
            return "pickles"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:160]
        finally:
            await copy.cleanup()

    facts["prepared_pickle"] = asyncio.run(prepared())
    return facts


def run_leg(name: str, fn: Callable[[], dict[str, Any]], settle_timeout: float) -> dict[str, Any]:
    before = tree_cpu()
    began = time.monotonic()
    out = fn()
    wall = time.monotonic() - began
    after_leg = tree_cpu()
    expected = out["task_runs_expected"]
    recorded, settle_s = settle(out["flow_run_id"], expected, settle_timeout)
    after_settle = tree_cpu()
    leg = cpu_delta(before, after_leg)
    server = cpu_delta(before, after_settle)["server"]
    inner = out["inner_cpu"]
    n = out["succeeded"] or 1
    row = {
        "leg": name,
        "succeeded": out["succeeded"],
        "errors": out["errors"],
        "first_error": out.get("first_error", ""),
        "flow_wall_s": round(wall, 2),
        "wall_s": round(out["inner_wall_s"], 2),
        "items_per_s": round(n / out["inner_wall_s"], 1),
        "client_cpu_ms": round(1000 * inner["client"] / n, 1),
        "main_cpu_ms": round(1000 * inner["main"] / n, 1),
        "workers_cpu_ms": round(1000 * inner["workers"] / n, 1),
        "emulator_cpu_ms": round(1000 * inner["emulator"] / n, 1),
        "server_cpu_ms": round(1000 * server / expected, 1),
        "flow_client_cpu_s": round(leg["client"], 1),
        "task_runs_expected": expected,
        "task_runs_recorded": recorded,
        "completed_task_runs": count_task_runs(out["flow_run_id"], completed_only=True),
        "settle_s": round(settle_s, 1),
        "processes_running_tasks": out["task_pids"],
    }
    row |= {k: v for k, v in out.items() if k.startswith("canary") or k == "has_canary"}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument(
        "--legs",
        default="processor,dask,dask-sync,threads,dask-kill,ephemeral",
        help="comma-separated; also threads-sync",
    )
    parser.add_argument("--settle-timeout", type=float, default=90.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    n, legs = args.items, args.legs.split(",")
    HOME.mkdir(parents=True, exist_ok=True)

    canary = f"CANARY-{uuid.uuid4().hex}"
    emulator, base_url = start_emulator(args.latency, canary)
    server = SubprocessASGIServer()
    server.start()
    digest = _digest(canary)
    strategy = GeminiStrategy(
        credentials=GeminiCredentials(api_key=SecretStr(canary), base_url=base_url)
    )
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    cluster: LocalCluster | None = None
    try:
        report["precheck"] = precheck(strategy, canary)
        print(json.dumps(report["precheck"]), flush=True)
        if any(leg.startswith("dask") or leg == "ephemeral" for leg in legs):
            # One cluster for every Dask leg; a DaskTaskRunner(cluster_kwargs=...) flow
            # pays this start (and the workers' first imports) on each of its runs.
            before, began = tree_cpu(), time.monotonic()
            cluster = LocalCluster(**CLUSTER)  # type: ignore[no-untyped-call]
            with Client(cluster) as probe:  # type: ignore[no-untyped-call]
                probe.run(lambda: __import__("prefect_batch_llm.gemini"))
            report["cluster_start"] = {
                "wall_s": round(time.monotonic() - began, 1),
                "cpu_s": round(cpu_delta(before, tree_cpu())["total"], 1),
            }
            print(json.dumps(report["cluster_start"]), flush=True)
        dask: Any = DaskTaskRunner(address=cluster.scheduler_address) if cluster else None
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            # Warm up: imports, the server's first writes, the emulator's first connection.
            asyncio.run(leg_processor(strategy, 20, digest))
            runs: dict[str, Callable[[], dict[str, Any]]] = {
                "processor": lambda: asyncio.run(leg_processor(strategy, n, digest)),
                "dask": lambda: leg_dask.with_options(task_runner=dask)(
                    strategy, n, digest, sync=False
                ),
                "dask-sync": lambda: leg_dask.with_options(task_runner=dask)(
                    strategy, n, digest, sync=True
                ),
                "threads": lambda: leg_threads(strategy, n, digest, sync=False),
                "threads-sync": lambda: leg_threads(strategy, n, digest, sync=True),
            }
            for name in legs:
                if name in runs:
                    report["rows"].append(run_leg(name, runs[name], args.settle_timeout))
            if "dask-kill" in legs:
                kill = leg_dask_kill.with_options(task_runner=dask)(16, 4.0)
                kill |= kill_report(kill)
                kill.pop("task_run_ids")
                report["dask_kill"] = kill
                print(json.dumps(kill), flush=True)
        if "ephemeral" in legs:
            # No PREFECT_API_URL: this process uses the ephemeral server it started; the
            # Dask workers get only the serialized settings, which have no URL either.
            state = leg_ephemeral.with_options(task_runner=dask)(8, return_state=True)
            probe_out: dict[str, Any] = (
                state.result() if state.is_completed() else {"flow_state": str(state)[:300]}
            )
            report["ephemeral"] = probe_out
            print(json.dumps(probe_out), flush=True)
        needle = canary.encode()
        report["canary_found_in"] = {
            "prefect_home (database, results)": grep_files(HOME, needle),
            "dask local_directory": grep_files(DASK_DIR, needle),
        }
    finally:
        if cluster is not None:
            cluster.close()
        server.stop()
        emulator.terminate()
        emulator.wait(10)
        shutil.rmtree(HOME.parent, ignore_errors=True)  # this run's temporary directory

    print(f"\nN={n} concurrency={CONCURRENCY} latency={args.latency}s ", end="")
    print(f"python {platform.python_version()} cpus {os.cpu_count()}")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    cols = [
        ("leg", "leg", 12),
        ("ok", "succeeded", 5),
        ("wall s", "wall_s", 7),
        ("items/s", "items_per_s", 8),
        ("client ms", "client_cpu_ms", 10),
        ("(main", "main_cpu_ms", 7),
        ("+workers)", "workers_cpu_ms", 10),
        ("server ms", "server_cpu_ms", 10),
        ("emu ms", "emulator_cpu_ms", 7),
        ("runs", "task_runs_recorded", 5),
        ("of", "task_runs_expected", 5),
        ("settle s", "settle_s", 9),
        ("procs", "processes_running_tasks", 6),
    ]
    print(" ".join(f"{title:>{width}}" for title, _, width in cols))
    for row in report["rows"]:
        print(" ".join(f"{row[key]!s:>{width}}" for _, key, width in cols))
    for key in ("cluster_start", "precheck", "dask_kill", "ephemeral", "canary_found_in"):
        if key in report:
            print(f"{key}: {json.dumps(report[key])}")
    args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
