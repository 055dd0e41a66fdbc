"""Cooldown and batch events, read back from the session's Prefect server."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.events.actions import DoNothing, SendNotification
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.automations import EventTrigger

from prefect_batch_llm import (
    LLMCallStrategy,
    LLMWorkItem,
    ParallelBatchProcessor,
    ProcessorConfig,
    RateLimitError,
    RetryConfig,
    RetryState,
)
from prefect_batch_llm._events import cooldown_event_emitter
from prefect_batch_llm.testing import MockFailure, MockStrategy

COOLDOWN = "prefect-batch-llm.rate-limit.cooldown"
FAST = RetryConfig(initial_wait=0.01, max_wait=0.05)


class StormStrategy(LLMCallStrategy[str]):
    """The first `storm` calls wait until all of them are in flight, then each gets a 429
    with `Retry-After: retry_after`; every later call answers. One storm, by construction."""

    def __init__(self, storm: int, retry_after: float) -> None:
        self.storm = storm
        self.retry_after = retry_after
        self.calls = 0
        self.rate_limited = 0
        self._all_in: asyncio.Event | None = None

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ):
        self.calls += 1
        if self.calls <= self.storm:
            if self._all_in is None:
                self._all_in = asyncio.Event()
            if self.calls == self.storm:
                self._all_in.set()
            await self._all_in.wait()
            self.rate_limited += 1
            raise RateLimitError("429 RESOURCE_EXHAUSTED", retry_after=self.retry_after)
        return f"answer: {prompt}", {"input_tokens": 12, "output_tokens": 3}


async def run_in_flow(strategy: LLMCallStrategy[Any], items: int, **config: Any):
    """Run a batch inside a flow; return (flow run id, BatchResult)."""

    @flow(name="signals-events")
    async def batch():
        settings = {"report_artifacts": False, "retry": FAST, **config}
        processor = ParallelBatchProcessor(config=ProcessorConfig(**settings))
        async with processor:
            for i in range(items):
                await processor.add_work(
                    LLMWorkItem(item_id=f"q{i}", strategy=strategy, prompt=f"question {i}")
                )
            return await processor.process_all()

    state = await batch(return_state=True)
    return state.state_details.flow_run_id, await state.aresult()


async def read_events(flow_run_id: uuid.UUID, prefix: str, expected: int) -> list:
    """The events named `prefix...` about the flow run, oldest first, once `expected` arrived
    (they are emitted asynchronously)."""
    wanted = EventFilter(
        event=EventNameFilter(prefix=[prefix]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
    )
    deadline = time.monotonic() + 30
    async with get_client() as client:
        while True:
            page = await client.read_events(filter=wanted, limit=50)
            if len(page.events) >= expected or time.monotonic() > deadline:
                return sorted(page.events, key=lambda event: event.occurred)
            await asyncio.sleep(0.5)


async def test_a_storm_of_429s_is_one_started_and_one_ended_event_about_the_flow_run():
    strategy = StormStrategy(storm=4, retry_after=0.5)
    flow_run_id, batch = await run_in_flow(strategy, items=8, max_workers=4)
    assert batch.succeeded == 8 and strategy.rate_limited == 4

    started, ended = await read_events(flow_run_id, COOLDOWN, expected=2)
    assert started.event == f"{COOLDOWN}.started" and ended.event == f"{COOLDOWN}.ended"
    assert started.resource.id == f"prefect.flow-run.{flow_run_id}"
    assert started.payload == {
        "scope": "default",
        "wait_seconds": 0.5,  # the Retry-After (the backoff is shorter)
        "retry_after_seconds": 0.5,
        "cooldowns": 1,
    }
    assert ended.payload["scope"] == "default"
    assert ended.payload["rate_limited_calls"] == 4, "every 429 of the storm, one pair"
    assert ended.payload["resumed"] is True
    assert 0.5 <= ended.payload["paused_seconds"] < 2.0
    # ...and it is what the batch reports
    summary = batch.summary()
    assert summary["rate_limited_calls"] == 4 and summary["calls"] == strategy.calls == 12
    assert summary["cooldown_seconds"] == ended.payload["paused_seconds"]

    # The batch event carries the call summary too.
    (completed,) = await read_events(flow_run_id, "prefect-batch-llm.batch", expected=1)
    for key in (
        "latency_p50_seconds",
        "latency_p95_seconds",
        "latency_p99_seconds",
        "attempts_mean",
        "attempts_max",
        "calls",
        "rate_limited_calls",
        "cooldown_seconds",
    ):
        assert completed.payload[key] == summary[key], key
    assert completed.payload["attempts_max"] == 2 and completed.payload["attempts_mean"] == 1.5
    assert completed.payload["latency_p50_seconds"] is not None


async def test_a_storm_still_open_when_the_batch_ends_is_ended_at_the_end():
    # No rate-limit retry allowed: the item fails at its 429, the batch ends inside the pause.
    strategy = StormStrategy(storm=1, retry_after=30.0)
    retry = RetryConfig(initial_wait=0.01, max_rate_limit_retries=0)
    flow_run_id, batch = await run_in_flow(strategy, items=1, retry=retry)
    assert batch.failed == 1

    started, ended = await read_events(flow_run_id, COOLDOWN, expected=2)
    assert started.payload["wait_seconds"] == 30.0
    assert ended.payload["resumed"] is False and ended.payload["rate_limited_calls"] == 1
    assert ended.payload["paused_seconds"] < 30.0, "the pause so far, not the pause asked for"
    assert batch.summary()["cooldown_seconds"] == ended.payload["paused_seconds"]


async def test_a_batch_without_429s_emits_no_cooldown_event():
    strategy = StormStrategy(storm=0, retry_after=1.0)
    flow_run_id, batch = await run_in_flow(strategy, items=3)
    assert batch.succeeded == 3
    await read_events(flow_run_id, "prefect-batch-llm.batch", expected=1)
    assert await read_events(flow_run_id, COOLDOWN, expected=0) == []


def test_nothing_is_emitted_outside_a_flow_run():
    assert cooldown_event_emitter() is None


async def test_a_failure_to_emit_never_fails_the_batch(monkeypatch, caplog):
    def unavailable(**kwargs):
        raise ConnectionError("events API unreachable")

    monkeypatch.setattr("prefect_batch_llm._events.emit_event", unavailable)
    strategy = StormStrategy(storm=2, retry_after=0.2)
    with caplog.at_level(logging.WARNING, logger="prefect_batch_llm"):
        _, batch = await run_in_flow(strategy, items=2, max_workers=2)
    assert batch.succeeded == 2
    assert f"Could not emit the {COOLDOWN}.started event" in caplog.text
    assert f"Could not emit the {COOLDOWN}.ended event" in caplog.text
    assert "Could not emit the prefect-batch-llm.batch.completed event" in caplog.text


async def test_a_timed_out_call_counts_its_time_and_waits_do_not():
    # The first call hangs past the 0.4 s attempt timeout; the retry waits 1 s, then answers.
    strategy = MockStrategy(failures=[MockFailure(kind="timeout")])
    retry = RetryConfig(initial_wait=1.0, max_wait=1.0, jitter=False)
    seen_live: dict = {}

    @flow(name="signals-latency")
    async def timed():
        config = ProcessorConfig(report_artifacts=False, retry=retry, timeout_per_item=0.4)
        async with ParallelBatchProcessor(config=config) as processor:
            await processor.add_work(LLMWorkItem("slow", strategy, "question"))
            task = asyncio.create_task(processor.process_all())
            while not task.done():  # get_stats() while the batch runs
                seen_live.update(await processor.get_stats())
                await asyncio.sleep(0.05)
            return await task

    batch = await timed()
    summary = batch.summary()
    assert summary["calls"] == 2 and summary["attempts_max"] == 2
    assert 0.4 <= summary["latency_p99_seconds"] < 0.9, "the timeout's 0.4 s, not the 1 s wait"
    assert summary["latency_p50_seconds"] < 0.2, "nearest rank of 2 calls: the fast one"
    assert summary["rate_limited_calls"] == 0 and summary["cooldown_seconds"] == 0.0
    assert seen_live["latency_p99_seconds"] >= 0.4, "get_stats() reports it live"
    assert seen_live["cooldown_seconds"] == 0.0


def documented_trigger() -> dict:
    page = (Path(__file__).parent.parent / "docs" / "guides" / "signals.md").read_text()
    block = page.split("<!-- trigger:start -->", 1)[1].split("<!-- trigger:end -->", 1)[0]
    return json.loads(block.strip().removeprefix("```json").removesuffix("```"))


async def test_the_documented_trigger_matches_the_storm_event():
    from prefect.server.events.schemas.automations import EventTrigger as ServerTrigger
    from prefect.server.events.schemas.events import ReceivedEvent

    strategy = StormStrategy(storm=2, retry_after=0.2)
    flow_run_id, _ = await run_in_flow(strategy, items=2, max_workers=2)
    started, ended = await read_events(flow_run_id, COOLDOWN, expected=2)

    trigger = ServerTrigger.model_validate(documented_trigger())
    assert trigger.covers(ReceivedEvent.model_validate(started.model_dump()))
    assert not trigger.covers(ReceivedEvent.model_validate(ended.model_dump()))

    # The server accepts an automation with it; the documented action's fields exist.
    automation = await Automation(
        name=f"rate-limit storm {uuid.uuid4().hex[:6]}",
        trigger=EventTrigger.model_validate(documented_trigger()),
        actions=[DoNothing()],
    ).acreate()
    try:
        assert automation.id is not None
    finally:
        await automation.adelete()
    SendNotification(
        block_document_id=uuid.uuid4(),
        subject="Rate-limit storm",
        body="{{ event.payload.scope }} paused {{ event.payload.wait_seconds }} s",
    )
