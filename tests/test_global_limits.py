"""One quota across processes: Prefect global concurrency limits (GCLs) as a shared RPM/TPM
limit, and a 429 in one process pausing every other one (`_engine/global_limits.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateName,
)
from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr, ValidationError

from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig, RetryConfig
from prefect_batch_llm._engine.global_limits import (
    SLOTS_PER_REQUEST,
    Bucket,
    GlobalLimits,
    buckets_for,
)
from prefect_batch_llm.errors import PermanentError
from prefect_batch_llm.gemini import GeminiCredentials, GeminiStrategy
from prefect_batch_llm.testing import GeminiEmulator, MockFailure, MockStrategy
from prefect_batch_llm.testing.emulator import Fault

SCRIPT = Path(__file__).parent / "scripts" / "run_batch_flow.py"


def unique_name() -> str:
    return f"test-gl-{uuid.uuid4().hex[:10]}"


async def delete_limits(name: str) -> None:
    async with get_client() as client:
        for suffix in ("-rpm", "-tpm"):
            with contextlib.suppress(Exception):
                await client.delete_global_concurrency_limit_by_name(name + suffix)


# -- configuration ------------------------------------------------------------------------


def test_config_needs_a_name_and_a_rate():
    with pytest.raises(ValidationError, match="need global_limit_name"):
        ProcessorConfig(global_requests_per_minute=60)
    with pytest.raises(ValidationError, match="needs global_requests_per_minute"):
        ProcessorConfig(global_limit_name="gemini-prod")
    with pytest.raises(ValidationError, match="global_tokens_per_call needs"):
        ProcessorConfig(
            global_limit_name="g", global_requests_per_minute=60, global_tokens_per_call=100
        )
    with pytest.raises(ValidationError, match="global_limit_name"):
        ProcessorConfig(global_limit_name="bad/name", global_requests_per_minute=60)
    assert GlobalLimits.for_config(ProcessorConfig()) is None


def test_buckets_never_let_a_minute_exceed_the_quota():
    config = ProcessorConfig(
        global_limit_name="gemini-prod",
        global_requests_per_minute=600,
        global_tokens_per_minute=1_000_000,
        global_burst_seconds=2,
    )
    requests, tokens = buckets_for(config)
    assert requests is not None and tokens is not None
    assert (requests.name, tokens.name) == ("gemini-prod-rpm", "gemini-prod-tpm")
    # 2 s of a 600 RPM quota: 20 requests of burst, then 580 a minute.
    assert requests.capacity == 20 * SLOTS_PER_REQUEST
    assert requests.decay == pytest.approx(580 * SLOTS_PER_REQUEST / 60)
    for bucket, quota in ((requests, 600 * SLOTS_PER_REQUEST), (tokens, 1_000_000)):
        assert bucket.capacity + 60 * bucket.decay == pytest.approx(quota)
    # A tiny quota keeps a burst of one request and at least half its rate.
    tiny = Bucket.sized("t", 1, 2.0, SLOTS_PER_REQUEST)
    assert tiny.capacity == SLOTS_PER_REQUEST and tiny.decay > 0


def test_tokens_are_estimated_then_owed():
    limits = GlobalLimits(None, Bucket.sized("t", 60_000, 2.0))  # 2,000 tokens of burst
    assert limits.estimate("x" * 400) == 100  # a quarter of the prompt until a call ends
    limits.settle(100, {"input_tokens": 300, "output_tokens": 100})
    assert limits.estimate("anything") == 400  # then the mean of finished calls
    assert limits._debt == 300  # charged 100, used 400: owed with the next charge
    limits.settle(400, {"input_tokens": 100})  # an over-estimate is not given back
    assert limits._debt == 300
    assert GlobalLimits(None, Bucket.sized("t", 600, 2.0), tokens_per_call=50).estimate("x") == 50


# -- against the test session's Prefect server ---------------------------------------------


async def test_limits_are_created_sized_and_checked():
    name = unique_name()
    config = ProcessorConfig(
        global_limit_name=name, global_requests_per_minute=120, global_tokens_per_minute=60_000
    )
    limits = GlobalLimits.for_config(config)
    assert limits is not None
    try:
        before = time.monotonic()
        assert await limits.acquire("x" * 40) == 10
        async with get_client() as client:
            rpm = await client.read_global_concurrency_limit_by_name(f"{name}-rpm")
            tpm = await client.read_global_concurrency_limit_by_name(f"{name}-tpm")
        read_within = time.monotonic() - before
        assert rpm.limit == 4 * SLOTS_PER_REQUEST
        assert rpm.slot_decay_per_second == pytest.approx(116 * SLOTS_PER_REQUEST / 60)
        assert (tpm.limit, tpm.slot_decay_per_second) == (2_000, pytest.approx(58_000 / 60))
        # One request, decaying since: its 100 slots are gone after 100 / 193.3 = 0.52 s, so
        # the lower bound is checked only when the read came sooner (a loaded CI machine
        # once took longer and read 0).
        assert rpm.active_slots <= SLOTS_PER_REQUEST
        if read_within < 0.4:
            assert rpm.active_slots > 0
    finally:
        await delete_limits(name)

    # Without create, a missing limit fails the call with a clear, permanent error...
    missing = GlobalLimits.for_config(
        config.model_copy(update={"global_limit_name": unique_name(), "global_limit_create": False})
    )
    assert missing is not None
    with pytest.raises(PermanentError, match="does not exist"):
        await missing.acquire("x")
    # ...and so does a limit without slot decay (not usable as a rate limit).
    name = unique_name()
    async with get_client() as client:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=f"{name}-rpm", limit=10)
        )
    try:
        flat = GlobalLimits.for_config(
            ProcessorConfig(
                global_limit_name=name, global_requests_per_minute=60, global_limit_create=False
            )
        )
        assert flat is not None
        with pytest.raises(PermanentError, match="no slot decay"):
            await flat.acquire("x")
    finally:
        await delete_limits(name)


async def test_a_cooldown_in_one_process_holds_the_next_acquisition_of_another():
    name = unique_name()
    config = ProcessorConfig(global_limit_name=name, global_requests_per_minute=6000)
    here, there = GlobalLimits.for_config(config), GlobalLimits.for_config(config)
    assert here is not None and there is not None
    try:
        await here.acquire("x")
        await there.acquire("x")
        await here.cooldown(2.0)
        started = time.monotonic()
        await there.acquire("x")
        waited = time.monotonic() - started
        assert 1.8 <= waited < 3.5
        assert there.refused >= 1 and here.cooldowns == 1
        # A shorter pause never shortens a longer one, set here or by another process.
        await here.cooldown(10.0)
        await here.cooldown(1.0)
        await there.cooldown(1.0)
        assert (here.cooldowns, there.cooldowns) == (2, 0)
        async with get_client() as client:
            rpm = await client.read_global_concurrency_limit_by_name(f"{name}-rpm")
        assert rpm.active_slots > rpm.limit + 9 * rpm.slot_decay_per_second
    finally:
        await delete_limits(name)


async def test_the_processor_acquires_before_each_call_and_a_429_pauses_the_limit():
    name = unique_name()
    strategy = MockStrategy(
        latency=0.01,
        failures=[MockFailure(kind="rate_limit", prompt_contains="p4", retry_after=30)],
    )
    config = ProcessorConfig(
        max_workers=1,
        global_limit_name=name,
        global_requests_per_minute=6000,
        global_tokens_per_minute=600_000,
        report_artifacts=False,
        retry=RetryConfig(max_rate_limit_retries=0),
    )
    processor = ParallelBatchProcessor(config)
    for i in range(5):  # the last item's 429 ends the batch; its pause outlives it
        await processor.add_work(LLMWorkItem(item_id=f"i{i}", strategy=strategy, prompt=f"p{i}"))
    try:
        started = time.monotonic()
        result = await processor.process_all()
        assert time.monotonic() - started < 20
        assert [r.success for r in result.results] == [True] * 4 + [False]
        async with get_client() as client:
            rpm = await client.read_global_concurrency_limit_by_name(f"{name}-rpm")
        # The 429's 30 s pause is held in the shared limit's slots, beyond its capacity.
        assert rpm.active_slots > rpm.limit + 20 * rpm.slot_decay_per_second
    finally:
        await delete_limits(name)


# -- two worker processes, one emulator, one quota ----------------------------------------

RPM = 120  # the emulator's quota and the global limit: 2 s of burst = 4 calls, 1.93/s after
ITEMS = 24  # per process
PAUSE = 6.0  # the Retry-After of the one 429


def busiest(times: list[float], window: float) -> int:
    ordered, best, first = sorted(times), 0, 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


async def hold_until_both_run(name: str, config: ProcessorConfig, since: datetime) -> None:
    """Hold the shared limit closed until both worker processes' flow runs are running (one
    may start 15 s after the other on a loaded machine), then open it: both start together."""
    requests, _ = buckets_for(config)
    assert requests is not None
    async with get_client() as client:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(
                name=requests.name,
                limit=requests.capacity,
                slot_decay_per_second=requests.decay,
                active_slots=requests.capacity + int(requests.decay * 300),
            )
        )
        running = FlowRunFilter(
            start_time=FlowRunFilterStartTime(after_=since),
            state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Running"])),
        )
        deadline = time.monotonic() + 90
        while len(await client.read_flow_runs(flow_run_filter=running)) < 2:
            assert time.monotonic() < deadline, "the two worker processes never both ran"
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.0)  # each reaches its first acquisition
        await client.update_global_concurrency_limit(
            requests.name, GlobalConcurrencyLimitUpdate(active_slots=0)
        )


async def test_two_processes_share_one_quota_and_a_429_pauses_both(tmp_path):
    name = unique_name()
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "storage"),
    }
    settings = {
        "global_limit_name": name,
        "global_requests_per_minute": RPM,
        "global_burst_seconds": 2.0,
    }
    # Every admitted call: (time, prompt, answered 429). Once both processes have made four
    # calls (and have eight left), the next call gets a 429 with a Retry-After of PAUSE s.
    arrivals: list[tuple[float, str, bool]] = []
    rate_limit = Fault(kind="429", retry_after=PAUSE)
    with GeminiEmulator(latency=0.1, rpm=RPM) as emulator:
        pick_fault = emulator.state.pick_fault

        def record(call_number: int | None, prompt: str, tier: str = "standard") -> Any:
            seen = [p.split()[0] for _, p, _ in arrivals]
            fire = not any(hit for _, _, hit in arrivals) and all(
                4 <= seen.count(label) <= ITEMS - 8 for label in ("alpha", "beta")
            )
            arrivals.append((time.monotonic(), prompt, fire))
            return rate_limit if fire else pick_fault(call_number, prompt, tier)

        emulator.state.pick_fault = record  # type: ignore[method-assign]
        await GeminiStrategy(
            credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url)
        ).save("global-limits-test", overwrite=True)
        since = datetime.now(UTC)
        workers = []
        for label in ("alpha", "beta"):
            source = tmp_path / f"{label}.jsonl"
            source.write_text(
                "".join(
                    json.dumps({"id": f"{label}-{i}", "prompt": f"{label} question {i}"}) + "\n"
                    for i in range(ITEMS)
                )
            )
            command = [
                sys.executable,
                str(SCRIPT),
                str(source),
                "gemini-strategy/global-limits-test",
                str(tmp_path / f"{label}-results.jsonl"),
                json.dumps({"config": settings}),
            ]
            workers.append(
                subprocess.Popen(
                    command,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        try:
            await hold_until_both_run(name, ProcessorConfig(**settings), since)
            for worker in workers:
                output, _ = await asyncio.to_thread(worker.communicate, timeout=150)
                assert worker.returncode == 0, output[-3000:]
        finally:
            for worker in workers:
                worker.kill()
            await delete_limits(name)
        statuses = emulator.stats()["calls_by_status"]

    # Every item has exactly one result, and it succeeded.
    for label in ("alpha", "beta"):
        results = [
            json.loads(line)
            for line in (tmp_path / f"{label}-results.jsonl").read_text().splitlines()
        ]
        assert sorted(r["id"] for r in results) == sorted(f"{label}-{i}" for i in range(ITEMS))
        assert all(r["success"] for r in results)

    # The emulator's quota never refused a call: the one 429 is the scripted one.
    assert statuses.get("429") == 1 and statuses.get("200") == 2 * ITEMS

    # Both processes together stayed within the shared bucket: 4 calls of burst, then
    # (120 - 4) a minute (+1 for the time between passing the gate and reaching the emulator).
    times = [at for at, _, _ in arrivals]
    burst, rate = 4, (RPM - 4) / 60
    for window in (2.0, 5.0, 10.0):
        assert busiest(times, window) <= burst + rate * window + 1, window

    # The 429 paused both processes: no call from either from 3 s after it until its
    # Retry-After passed. (Pausing the shared limit takes ~20 ms, or ~2 s more when its write
    # collides with another on the session's SQLite server; calls past the gate still land.)
    rate_limited = [entry for entry in arrivals if entry[2]]
    assert rate_limited, "the two processes never ran at the same time: " + str(
        [(round(at - arrivals[0][0], 1), prompt) for at, prompt, _ in arrivals]
    )
    ((rate_limited_at, prompt_429, _),) = rate_limited
    during = [
        (round(at - rate_limited_at, 2), prompt)
        for at, prompt, _ in arrivals
        if rate_limited_at + 3.0 <= at < rate_limited_at + PAUSE - 0.3
    ]
    assert during == []
    # ...and the process that did not get it was mid-run: it called before and after.
    other = "beta" if prompt_429.startswith("alpha") else "alpha"
    calls = [at for at, prompt, _ in arrivals if prompt.startswith(other)]
    assert min(calls) < rate_limited_at < rate_limited_at + PAUSE - 0.3 < max(calls)
