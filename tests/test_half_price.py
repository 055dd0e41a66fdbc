"""Flex and Batch Mode: the same items, results and accounting at half price.

Every test drives the real google-genai client against the Gemini emulator, whose billing
counters are the truth the batch's accounting must equal.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig, RetryConfig
from prefect_batch_llm._reporting import markdown_report
from prefect_batch_llm.gemini import GeminiCachedStrategy, GeminiCredentials, GeminiStrategy
from prefect_batch_llm.gemini.pricing import gemini_pricing
from prefect_batch_llm.results import BatchResult, ModelPricing, TokenUsage, WorkItemResult
from prefect_batch_llm.testing import BatchFault, Fault, GeminiEmulator

CONTEXT = "The handbook. " * 400  # above the 1,024-token minimum cache size
MODEL = "gemini-2.5-flash"


def credentials(emulator: GeminiEmulator) -> GeminiCredentials:
    return GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url)


def cached(emulator: GeminiEmulator, **overrides: Any) -> GeminiCachedStrategy:
    settings: dict[str, Any] = {
        "credentials": credentials(emulator),
        "model": MODEL,
        "system_instruction": "You answer from the handbook.",
        "cached_documents": [CONTEXT],
    }
    return GeminiCachedStrategy(**(settings | overrides))


def plain(emulator: GeminiEmulator, **overrides: Any) -> GeminiStrategy:
    return GeminiStrategy(**({"credentials": credentials(emulator), "model": MODEL} | overrides))


def config(**overrides: Any) -> ProcessorConfig:
    settings: dict[str, Any] = {
        "max_workers": 16,
        "retry": RetryConfig(max_attempts=3, initial_wait=0.01, max_wait=0.05),
        "batch_poll_interval_seconds": 0.05,
        "batch_poll_max_interval_seconds": 0.2,
        "report_artifacts": False,
    }
    return ProcessorConfig(**(settings | overrides))


async def run(strategy: Any, n: int, settings: ProcessorConfig | None = None, prefix: str = "q"):
    async with ParallelBatchProcessor(config=settings or config()) as processor:
        for i in range(n):
            await processor.add_work(
                LLMWorkItem(item_id=f"{prefix}{i}", strategy=strategy, prompt=f"Question {i}?")
            )
        return await processor.process_all()


async def fast_forward(emulator: GeminiEmulator, seconds: float) -> None:
    """Once the first job exists, its emulated clock jumps (e.g. past the 48-hour expiry)."""
    while not emulator.stats()["batches"]["created"]:
        await asyncio.sleep(0.02)
    emulator.clock.advance(seconds)


def billed(emulator: GeminiEmulator, path: str) -> dict[str, Any]:
    return dict(emulator.stats()["billed_by_path"][path])


@pytest.mark.parametrize(
    ("model", "cached_discount"),
    [
        # 2.5 Flash: input and output at half price, cached input at the standard cached
        # price ("priced the same as for non-batch API traffic").
        ("gemini-2.5-flash", 1.0),
        # 3.8 Flash halves the cached price in Batch Mode too.
        ("gemini-3.8-flash", 0.5),
    ],
)
async def test_500_items_in_one_batch_job_with_the_shared_cache_at_the_batch_rate(
    model, cached_discount
):
    with GeminiEmulator(batch_pending_seconds=0.1, batch_running_seconds=0.2) as emulator:
        result = await run(cached(emulator, execution="batch", model=model), 500)
        stats = emulator.stats()
        batch = billed(emulator, "batch")
    assert result.total_items == 500 and result.succeeded == 500
    assert stats["batches"]["created"] == 1 and stats["batches"]["requests"] == 500
    assert stats["calls_by_endpoint"].get("generateContent", 0) == 0
    assert stats["caches"]["created"] == 1
    assert result.total_cached_tokens == batch["cached_tokens"] > 0
    assert result.total_input_tokens == batch["input_tokens"] + batch["cached_tokens"]
    assert result.total_output_tokens == batch["output_tokens"]
    pricing = gemini_pricing(model)
    assert result.usage_by_path().keys() == {"batch"}
    assert result.estimated_cost(pricing) == pytest.approx(batch["total_usd"], rel=1e-9)
    assert all(r.metadata.get("price_path") == "batch" for r in result.results)
    tokens = (result.total_input_tokens, result.total_output_tokens, result.total_cached_tokens)
    uncached_and_output = pricing.cost(tokens[0] - tokens[2], tokens[1])
    cached_cost = pricing.cost(tokens[2], 0, tokens[2])
    assert result.estimated_cost(pricing) == pytest.approx(
        uncached_and_output / 2 + cached_cost * cached_discount
    )


async def test_batch_outputs_equal_online_outputs():
    with GeminiEmulator(batch_pending_seconds=0.05, batch_running_seconds=0.05) as emulator:
        online = await run(cached(emulator), 20)
        batched = await run(cached(emulator, execution="batch"), 20)
    assert [r.output for r in batched.results] == [r.output for r in online.results]


async def test_failed_and_missing_requests_are_retried_online_each_item_one_result():
    faults = [
        Fault(kind="500", prompt_contains="Question 3?", tier="batch"),
        Fault(kind="safety", prompt_contains="Question 5?", tier="batch"),
    ]
    with GeminiEmulator(
        faults=faults,
        batch_faults=[BatchFault(kind="missing", keys=["q7"])],
        batch_running_seconds=0.1,
    ) as emulator:
        result = await run(plain(emulator, execution="batch"), 10)
        stats = emulator.stats()
    by_id = {r.item_id: r for r in result.results}
    assert len(result.results) == 10
    assert by_id["q3"].success and by_id["q3"].attempts == 2  # the 500: retried online
    assert by_id["q7"].success and by_id["q7"].attempts == 2  # missing: retried online
    assert not by_id["q5"].success and by_id["q5"].error_category == "content_filter"
    assert by_id["q5"].attempts == 1
    assert stats["calls_by_endpoint"]["generateContent"] == 2
    assert by_id["q3"].usage_per_path().keys() == {"standard"}
    assert by_id["q0"].usage_per_path().keys() == {"batch"}


# -- every job state ends with one result per item -----------------------------------------


@pytest.mark.parametrize(
    ("fault", "retry", "jobs", "paths"),
    [
        # Expired after 48 h without an answer: every item retried online.
        (BatchFault(kind="expire"), "online", 1, {"standard"}),
        # ... or in a second job (half price again), which succeeds.
        (BatchFault(kind="expire", on_jobs=[1]), "batch", 2, {"batch"}),
        (BatchFault(kind="fail", on_jobs=[1], message="boom"), "batch", 2, {"batch"}),
    ],
    ids=["expired-online", "expired-batch", "failed-batch"],
)
async def test_a_job_without_answers_retries_every_item_online_or_in_a_new_job(
    fault, retry, jobs, paths
):
    with GeminiEmulator(batch_faults=[fault], batch_running_seconds=0.1) as emulator:
        clock = asyncio.create_task(fast_forward(emulator, 49 * 3600))
        result = await run(plain(emulator, execution="batch"), 12, config(batch_retry=retry))
        await clock
        stats = emulator.stats()
    assert [r.item_id for r in result.results] == [f"q{i}" for i in range(12)]
    assert all(r.success and r.attempts == 2 for r in result.results)
    assert stats["batches"]["created"] == jobs
    assert set(result.usage_by_path()) == paths
    online = stats["calls_by_endpoint"].get("generateContent", 0)
    assert online == (12 if retry == "online" else 0)


async def test_a_partially_succeeded_job_retries_only_its_failed_requests():
    fault = BatchFault(kind="partially_succeeded", keys=["q1", "q4"])
    with GeminiEmulator(batch_faults=[fault], batch_running_seconds=0.1) as emulator:
        result = await run(plain(emulator, execution="batch"), 6)
        stats = emulator.stats()
    assert stats["batches"]["partially_succeeded"] == 1
    assert [r.attempts for r in result.results] == [1, 2, 1, 1, 2, 1]
    assert result.succeeded == 6 and stats["calls_by_endpoint"]["generateContent"] == 2


async def test_a_lost_create_answer_does_not_create_a_second_job():
    fault = BatchFault(kind="create_lost", display_name_contains="batch-llm-")
    with GeminiEmulator(batch_faults=[fault], batch_running_seconds=0.1) as emulator:
        result = await run(plain(emulator, execution="batch"), 5)
        stats = emulator.stats()
    assert result.succeeded == 5
    assert stats["batches"]["created"] == 1
    assert stats["calls_by_endpoint"].get("generateContent", 0) == 0


@pytest.mark.parametrize(("limit", "files"), [(19_000_000, 0), (2_000, 1)])
async def test_inline_or_file_by_the_requests_size(limit, files):
    with GeminiEmulator(batch_running_seconds=0.1) as emulator:
        strategy = cached(emulator, execution="batch", batch_inline_max_bytes=limit)
        result = await run(strategy, 30)
        stats = emulator.stats()
    assert result.succeeded == 30 and stats["batches"]["created"] == 1
    assert stats["files"]["uploaded"] == files
    assert result.total_cached_tokens == stats["billed_by_path"]["batch"]["cached_tokens"] > 0


async def test_cancelling_the_batch_cancels_the_provider_job():
    with GeminiEmulator(batch_pending_seconds=3600) as emulator:
        running = asyncio.create_task(run(plain(emulator, execution="batch"), 5))
        for _ in range(400):
            if emulator.stats()["batches"]["created"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert emulator.stats()["batches"]["cancelled"] == 1


# -- Flex ----------------------------------------------------------------------------------


async def test_flex_bills_half_and_a_shed_item_falls_back_to_standard():
    shed = Fault(kind="flex_shed", prompt_contains="Question 2?")
    with GeminiEmulator(faults=[shed]) as emulator:
        result = await run(plain(emulator, execution="flex", flex_fallback_after=2), 8)
        stats = emulator.stats()
    by_id = {r.item_id: r for r in result.results}
    assert result.succeeded == 8
    assert by_id["q2"].attempts == 3 and by_id["q2"].usage_per_path().keys() == {"standard"}
    assert by_id["q0"].attempts == 1 and by_id["q0"].metadata["price_path"] == "flex"
    assert stats["flex_shed"] == 2 and stats["flex_calls"] == 7 + 2
    flex, standard = billed(emulator, "flex"), billed(emulator, "standard")
    usage = result.usage_by_path()
    assert usage["flex"]["input_tokens"] == flex["input_tokens"]
    assert usage["standard"]["input_tokens"] == standard["input_tokens"]
    pricing = gemini_pricing(MODEL)
    assert result.estimated_cost(pricing) == pytest.approx(
        flex["total_usd"] + standard["total_usd"], rel=1e-9
    )


# -- a killed run resumes polling the same job ---------------------------------------------

SCRIPT = Path(__file__).parent / "scripts" / "run_batch_flow.py"


async def test_a_run_killed_while_polling_resumes_the_same_job_and_pays_once(tmp_path):
    from prefect.settings import PREFECT_API_URL

    items = 40
    source = tmp_path / "items.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": f"k{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(items)
        )
    )
    output = tmp_path / "results.jsonl"
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "storage"),
    }
    extra = {
        "execution": "batch",
        "config": {"batch_poll_interval_seconds": 0.2, "batch_poll_max_interval_seconds": 0.5},
    }
    command = [
        sys.executable,
        str(SCRIPT),
        str(source),
        "gemini-cached-strategy/batch-kill-test",
        str(output),
        json.dumps(extra),
    ]
    with GeminiEmulator(batch_pending_seconds=1800) as emulator:
        await cached(emulator).save("batch-kill-test", overwrite=True)
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        # Killed once it polls: the job exists and its record was written before the poll.
        while emulator.stats()["calls_by_endpoint"].get("batches.get", 0) < 2:
            assert first.poll() is None, first.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the first run never polled"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert emulator.stats()["batches"]["created"] == 1
        assert not output.exists()

        emulator.clock.advance(1900)  # the job's half hour passes; the cache (1 h) lives
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        stats = emulator.stats()
    assert stats["batches"]["created"] == 1, "the re-run submitted a second job"
    assert stats["caches"]["created"] == 1
    assert stats["calls_by_endpoint"].get("generateContent", 0) == 0
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["id"] for r in results) == sorted(f"k{i}" for i in range(items))
    assert all(r["success"] for r in results)
    batch = stats["billed_by_path"]["batch"]
    assert sum(r["tokens"]["output_tokens"] for r in results) == batch["output_tokens"]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["estimated_cost_usd"] == pytest.approx(batch["total_usd"], abs=1e-6)


# -- through the deployable flow -------------------------------------------------------------


async def test_the_flow_in_batch_mode_with_a_malformed_first_line(tmp_path):
    from prefect_batch_llm.flows import batch_llm

    source = tmp_path / "items.jsonl"
    lines = [
        "{not json",
        *(json.dumps({"id": f"f{i}", "prompt": f"Question {i}?"}) for i in range(6)),
    ]
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "results.jsonl"
    with GeminiEmulator(batch_running_seconds=0.1) as emulator:
        summary = await batch_llm(
            input=str(source),
            strategy=cached(emulator),
            output=str(output),
            config={"batch_poll_interval_seconds": 0.1, "max_failed_fraction": 0.5},
            execution="batch",
        )
        stats = emulator.stats()
    assert stats["batches"]["created"] == 1 and stats["batches"]["requests"] == 6
    assert stats["calls_by_endpoint"].get("generateContent", 0) == 0
    results = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert results["line-1"]["category"] == "invalid_input"
    assert all(results[f"f{i}"]["success"] for i in range(6))
    assert summary["price_paths"] == ["batch"] and summary["succeeded"] == 6


# -- accounting per price path ---------------------------------------------------------------

PRICES = ModelPricing(
    input_per_million=1.0,
    output_per_million=10.0,
    cached_input_per_million=0.1,
    flex=ModelPricing(input_per_million=0.5, output_per_million=5.0, cached_input_per_million=0.05),
    batch=ModelPricing(
        input_per_million=0.5, output_per_million=5.0, cached_input_per_million=0.05
    ),
)
MILLION = TokenUsage(input_tokens=1_000_000, output_tokens=1_000_000, cached_input_tokens=0)


@pytest.mark.parametrize(
    ("paths", "expected_usd", "row"),
    [
        ({}, 11.0, None),  # no split: every token standard
        ({"batch": MILLION}, 5.5, "batch $5.5000"),
        ({"flex": MILLION}, 5.5, "flex $5.5000"),
        (
            {
                "batch": TokenUsage(input_tokens=500_000, output_tokens=500_000),
                "standard": TokenUsage(input_tokens=500_000, output_tokens=500_000),
            },
            8.25,
            "batch $2.7500, standard $5.5000",
        ),
    ],
    ids=["standard", "batch", "flex", "batch+standard"],
)
def test_cost_prices_each_path_and_the_report_shows_the_split(paths, expected_usd, row):
    result = WorkItemResult(item_id="a", success=True, token_usage=MILLION, usage_by_path=paths)
    batch = BatchResult(results=[result])
    assert batch.estimated_cost(PRICES) == pytest.approx(expected_usd)
    report = markdown_report(batch, PRICES)
    if row is None:
        assert "Price paths | standard" in report and "at standard prices" not in report
    else:
        assert f"({row}; $11.0000 at standard prices)" in report
