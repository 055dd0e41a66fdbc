"""Flex and Batch Mode: the same items, results and accounting at half price.

Every test drives the real google-genai client against the Gemini emulator, whose billing
counters are the truth the batch's accounting must equal.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig, RetryConfig
from prefect_batch_llm.gemini import GeminiCachedStrategy, GeminiCredentials, GeminiStrategy
from prefect_batch_llm.gemini.pricing import gemini_pricing
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


def billed(emulator: GeminiEmulator, path: str) -> dict[str, Any]:
    return dict(emulator.stats()["billed_by_path"][path])


async def test_500_items_in_one_batch_job_with_the_shared_cache_at_the_batch_rate():
    with GeminiEmulator(batch_pending_seconds=0.1, batch_running_seconds=0.2) as emulator:
        result = await run(cached(emulator, execution="batch"), 500)
        stats = emulator.stats()
        batch = billed(emulator, "batch")
    assert result.total_items == 500 and result.succeeded == 500
    assert stats["batches"]["created"] == 1 and stats["batches"]["requests"] == 500
    assert stats["calls_by_endpoint"].get("generateContent", 0) == 0
    assert stats["caches"]["created"] == 1
    assert result.total_cached_tokens == batch["cached_tokens"] > 0
    assert result.total_input_tokens == batch["input_tokens"] + batch["cached_tokens"]
    assert result.total_output_tokens == batch["output_tokens"]
    pricing = gemini_pricing(MODEL)
    assert result.usage_by_path().keys() == {"batch"}
    assert result.estimated_cost(pricing) == pytest.approx(batch["total_usd"], rel=1e-9)
    assert all(r.metadata.get("price_path") == "batch" for r in result.results)
    standard_cost = pricing.cost(
        result.total_input_tokens, result.total_output_tokens, result.total_cached_tokens
    )
    assert result.estimated_cost(pricing) < 0.6 * standard_cost


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
