"""Token accounting: sums over items and attempts, cache hit rate, effective tokens, cost."""

from __future__ import annotations

import pytest
from helpers import ScriptedStrategy

from prefect_batch_llm import (
    BatchResult,
    LLMCallStrategy,
    LLMWorkItem,
    ModelPricing,
    OutputValidationError,
    ParallelBatchProcessor,
    ProcessorConfig,
    RetryConfig,
    WorkItemResult,
)


async def run(strategy, n=1, **config):
    async with ParallelBatchProcessor(config=ProcessorConfig(**config)) as processor:
        for i in range(n):
            await processor.add_work(
                LLMWorkItem(item_id=f"item_{i}", strategy=strategy, prompt="Test")
            )
        return await processor.process_all()


async def test_cached_tokens_aggregate_into_hit_rate_and_effective_tokens():
    class Cached(LLMCallStrategy[str]):
        async def execute(self, prompt, attempt, timeout, state=None):
            usage = {
                "input_tokens": 500,
                "output_tokens": 100,
                "total_tokens": 600,
                "cached_input_tokens": 450,
            }
            return "Response", usage

    result = await run(Cached(), n=10, max_workers=2)
    assert result.total_input_tokens == 5000
    assert result.total_output_tokens == 1000
    assert result.total_cached_tokens == 4500
    assert result.cache_hit_rate() == 90.0
    assert result.effective_input_tokens() == 950  # 5000 - 4500 * 0.9
    assert result.effective_input_tokens(cached_token_rate=0.25) == 1625
    with pytest.raises(ValueError, match="cached_token_rate"):
        result.effective_input_tokens(cached_token_rate=2)


async def test_missing_cached_tokens_count_as_zero():
    class Plain(LLMCallStrategy[str]):
        async def execute(self, prompt, attempt, timeout, state=None):
            return "Response", {"input_tokens": 100, "output_tokens": 50}

    result = await run(Plain())
    assert result.total_cached_tokens == 0 and result.cache_hit_rate() == 0.0


async def test_tokens_of_failed_attempts_are_counted():
    billed = {"input_tokens": 100, "output_tokens": 20}
    strategy = ScriptedStrategy(
        {
            "Test": [
                OutputValidationError("bad", token_usage=billed),
                OutputValidationError("bad", token_usage=billed),
            ]
        }
    )
    result = await run(strategy, retry=RetryConfig(max_attempts=3))
    [item] = result.results
    assert item.success and item.attempts == 3
    assert item.token_usage == {"input_tokens": 300, "output_tokens": 60}
    assert result.total_input_tokens == 300

    exhausted = ScriptedStrategy({"Test": [OutputValidationError("bad", token_usage=billed)] * 3})
    result = await run(exhausted, retry=RetryConfig(max_attempts=3))
    assert not result.results[0].success
    assert result.total_input_tokens == 300, "a failed item reports all three attempts"


async def test_tokens_carried_by_a_wrapped_sdk_error_are_counted():
    class SDKError(Exception):
        pass

    class Wrapping(LLMCallStrategy[str]):
        async def execute(self, prompt, attempt, timeout, state=None):
            try:
                raise OutputValidationError("schema mismatch", token_usage={"input_tokens": 7})
            except OutputValidationError as inner:
                raise SDKError("wrapped") from inner

    result = await run(Wrapping(), retry=RetryConfig(max_attempts=1))
    assert result.total_input_tokens == 7


@pytest.mark.parametrize(
    "usage, message",
    [
        ({"input_tokens": -1}, "non-negative"),
        ({"prompt_tokens": 3}, "unknown token usage key"),
        ("lots", "return a dict"),
    ],
)
async def test_bad_usage_fails_the_item_with_a_clear_message(usage, message):
    class Bad(LLMCallStrategy[str]):
        calls = 0

        async def execute(self, prompt, attempt, timeout, state=None):
            Bad.calls += 1
            return "x", usage

    result = await run(Bad())
    [item] = result.results
    assert not item.success and item.error_category == "permanent"
    assert message in (item.error or "") and Bad.calls == 1


def test_estimated_cost_and_summary():
    results = [
        WorkItemResult(
            item_id="a",
            success=True,
            token_usage={
                "input_tokens": 1_000_000,
                "cached_input_tokens": 800_000,
                "output_tokens": 100_000,
            },
        ),
        WorkItemResult(
            item_id="b",
            success=False,
            error="x",
            error_category="permanent",
            token_usage={"input_tokens": 0},
        ),
    ]
    batch = BatchResult(results=results)
    flash = ModelPricing(input_per_million=0.30, output_per_million=2.50)
    # 200k uncached * 0.30 + 800k cached * 0.03 + 100k output * 2.50, per million
    assert batch.estimated_cost(flash) == pytest.approx(0.06 + 0.024 + 0.25)
    summary = batch.summary(pricing=flash)
    assert summary["succeeded"] == 1 and summary["failed"] == 1
    assert summary["cache_hit_rate"] == 80.0
    assert summary["errors_by_category"] == {"permanent": 1}
    assert summary["estimated_cost_usd"] == pytest.approx(0.334)
