"""The cost preview: counted prompt tokens priced with and without the cache, nothing billed.

Every figure is checked against the Gemini emulator through the real google-genai client:
its counters show what was called and billed, and a real run of the same batch gives the
actual cost the projection is compared with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from pydantic import SecretStr

from prefect_batch_llm import (
    LLMCallStrategy,
    LLMWorkItem,
    ModelPricing,
    ParallelBatchProcessor,
    ProcessorConfig,
    RetryConfig,
    RetryState,
    preview_cost,
    project_cost,
)
from prefect_batch_llm.files import InvalidInput, read_input
from prefect_batch_llm.flows import batch_llm
from prefect_batch_llm.gemini import (
    GeminiCachedStrategy,
    GeminiCredentials,
    GeminiStrategy,
    gemini_pricing,
)
from prefect_batch_llm.pydantic_ai import PydanticAIStrategy
from prefect_batch_llm.testing import GeminiEmulator, count_tokens

FLASH = gemini_pricing("gemini-2.5-flash")
CONTEXT = "The handbook. " * 400  # 1,400 tokens: above the 1,024-token cache minimum
SYSTEM = "You answer from the handbook."
#: The projection of an all-counted batch is exact for the input; the output size is an
#: assumption (the emulator's answers vary by a few tokens around it): within 5% of actual.
TOLERANCE = 0.05


def credentials(emulator: GeminiEmulator) -> GeminiCredentials:
    return GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url)


def cached(emulator: GeminiEmulator, **overrides: Any) -> GeminiCachedStrategy:
    settings: dict[str, Any] = {
        "credentials": credentials(emulator),
        "system_instruction": SYSTEM,
        "cached_documents": [CONTEXT],
    }
    return GeminiCachedStrategy(**(settings | overrides))


def prompt(i: int) -> str:
    return f"Question {i}: what does the handbook say about returns of item {i}?" + (
        " Please be precise." * (i % 5)
    )


def emulator_answer_tokens(text: str) -> int:
    """What the emulator answers (its documented default answer), in tokens: the output size
    a user would expect and pass, here known exactly for one prompt."""
    gist = " ".join(text.split()[:12])
    return count_tokens(f"[gemini-2.5-flash#01234567] Answer to: {gist}")


def billed_usd(emulator: GeminiEmulator) -> float:
    billed = emulator.stats()["billed"]
    return billed["input_usd"] + billed["cached_usd"] + billed["output_usd"]


def write_items(path: Path, n: int, bad_lines: int = 0) -> Path:
    lines = [json.dumps({"id": f"q{i}", "prompt": prompt(i)}) for i in range(n)]
    for j in range(bad_lines):
        lines.insert(1 + j * 3, '{"id": "broken", "prompt": ')
    path.write_text("\n".join(lines) + "\n")
    return path


async def run_batch(strategy: LLMCallStrategy[Any], n: int) -> Any:
    config = ProcessorConfig(
        max_workers=8,
        report_artifacts=False,
        retry=RetryConfig(max_attempts=2, initial_wait=0.01, max_wait=0.05),
    )
    async with ParallelBatchProcessor(config=config, pricing=FLASH) as processor:
        for i in range(n):
            await processor.add_work(LLMWorkItem(f"q{i}", strategy, prompt(i)))
        return await processor.process_all()


# -- the projection (pure) --------------------------------------------------------------------

PRICES = ModelPricing(input_per_million=1.0, output_per_million=10.0, cached_input_per_million=0.1)
DEFAULT_CACHED = ModelPricing(input_per_million=1.0, output_per_million=10.0)  # cached: 10%


def usage(input_tokens: int, cached_tokens: int = 0) -> dict[str, int]:
    return {"input_tokens": input_tokens, "cached_input_tokens": cached_tokens}


HALF = 1.96 * 4 * math.sqrt(2) * 100e-6 / math.sqrt(2) * math.sqrt(2 / 3)
WIDE = 1.96 * 100 * (10_000e-6 / math.sqrt(2)) / math.sqrt(2) * math.sqrt(98 / 99)

# (counts, items, output tokens per item, pricing,
#  cost with cache, its range, cost without cache, its range)
PROJECTIONS = [
    pytest.param(
        [usage(1000)], 1, 100, PRICES, 2e-3, (2e-3, 2e-3), 2e-3, (2e-3, 2e-3), id="one-item"
    ),
    pytest.param(
        [usage(1100, 1000)] * 2,
        2,
        0,
        PRICES,
        2 * (100 + 100) * 1e-6,
        (4e-4, 4e-4),
        2 * 1100e-6,
        (2.2e-3, 2.2e-3),
        id="all-counted-cache-at-cached-rate",
    ),
    pytest.param(
        [usage(1100, 1000)],
        1,
        0,
        DEFAULT_CACHED,
        200e-6,
        (200e-6, 200e-6),
        1100e-6,
        (1100e-6, 1100e-6),
        id="cached-rate-defaults-to-10%",
    ),
    pytest.param(
        # 2 of 4 counted: mean 200e-6, stdev 141.42e-6; half width of the 95% range of the
        # total: 1.96 * 4 * stdev / sqrt(2) * sqrt((4 - 2) / (4 - 1)) = 640.13e-6.
        [usage(100), usage(300)],
        4,
        0,
        PRICES,
        800e-6,
        (800e-6 - HALF, 800e-6 + HALF),
        800e-6,
        (800e-6 - HALF, 800e-6 + HALF),
        id="sampled-range-finite-population",
    ),
    pytest.param([], 0, 500, PRICES, 0.0, (0.0, 0.0), 0.0, (0.0, 0.0), id="no-items"),
    pytest.param(
        # A wide spread: the range's low end is clipped at zero.
        [usage(0), usage(10_000)],
        100,
        0,
        PRICES,
        0.5,
        (0.0, 0.5 + WIDE),
        0.5,
        (0.0, 0.5 + WIDE),
        id="low-end-clipped-at-zero",
    ),
]


@pytest.mark.parametrize(
    ("counts", "items", "output", "pricing", "cost", "cost_range", "without", "without_range"),
    PROJECTIONS,
)
def test_projection_table(counts, items, output, pricing, cost, cost_range, without, without_range):
    preview = project_cost(counts, items=items, output_tokens_per_item=output, pricing=pricing)
    assert preview.cost_usd == pytest.approx(cost)
    assert preview.cost_range_usd == pytest.approx(cost_range, rel=1e-4)
    assert preview.cost_without_cache_usd == pytest.approx(without)
    assert preview.cost_without_cache_range_usd == pytest.approx(without_range, rel=1e-4)
    assert preview.cost_per_item_usd == pytest.approx(cost / items if items else 0.0)
    assert preview.output_tokens == items * output
    assert preview.sampled == (len(counts) < items)


def test_projection_refuses_more_counts_than_items_or_none_for_some():
    with pytest.raises(ValueError, match="2 counted prompts for 1 items"):
        project_cost([usage(1)] * 2, items=1, output_tokens_per_item=1, pricing=PRICES)
    with pytest.raises(ValueError, match="0 counted prompts for 3 items"):
        project_cost([], items=3, output_tokens_per_item=1, pricing=PRICES)


# -- against the emulator ---------------------------------------------------------------------


async def test_cached_preview_bills_nothing_creates_no_cache_and_projects_the_actual_cost(
    tmp_path,
):
    n = 40
    source = write_items(tmp_path / "items.jsonl", n)
    expected_output = emulator_answer_tokens(prompt(0))
    with GeminiEmulator() as emulator:
        preview = await preview_cost(
            str(source), cached(emulator), output_tokens_per_item=expected_output
        )
        stats = emulator.stats()
        assert stats["generate_calls"] == 0 and stats["billed"]["total_usd"] == 0
        assert stats["caches"]["created"] == 0, "a preview must not create a context cache"
        # Every prompt counted, plus the cached content once; no other endpoint called.
        assert stats["calls_by_endpoint"] == {"countTokens": n + 1}
        assert preview.items == n and preview.counted == n and not preview.sampled
        cache_tokens = count_tokens(CONTEXT) + count_tokens(SYSTEM)
        assert preview.cached_tokens_per_item == cache_tokens
        assert preview.input_tokens == sum(count_tokens(prompt(i)) for i in range(n)) + (
            n * cache_tokens
        )

        emulator.reset()
        result = await run_batch(cached(emulator), n)
        assert result.succeeded == n
        actual = billed_usd(emulator)
    assert result.total_input_tokens == preview.input_tokens, "input counted exactly"
    assert result.total_cached_tokens == preview.cached_input_tokens
    assert preview.cost_usd == pytest.approx(actual, rel=TOLERANCE)
    print(f"cached: projected ${preview.cost_usd:.6f}, actual ${actual:.6f}")

    # Without the cache: the same strategy calling uncached (content below the cache minimum,
    # fallback_to_uncached=True) sends the documents and instruction with every prompt.
    with GeminiEmulator(min_cache_tokens=10**9) as uncached_emulator:
        result = await run_batch(cached(uncached_emulator, fallback_to_uncached=True), n)
        assert result.succeeded == n and result.total_cached_tokens == 0
        assert result.total_input_tokens == preview.input_tokens, "the same input, uncached"
        actual_uncached = billed_usd(uncached_emulator)
    assert preview.cost_without_cache_usd == pytest.approx(actual_uncached, rel=TOLERANCE)
    print(
        f"uncached: projected ${preview.cost_without_cache_usd:.6f}, actual ${actual_uncached:.6f}"
    )
    assert preview.cost_without_cache_usd > 3 * preview.cost_usd


async def test_above_the_sample_size_a_seeded_sample_is_counted_and_its_range_holds_the_truth(
    tmp_path,
):
    n = 500
    source = write_items(tmp_path / "items.jsonl", n)
    with GeminiEmulator() as emulator:
        strategy = GeminiStrategy(credentials=credentials(emulator))  # no fixed part to count
        preview = await preview_cost(str(source), strategy, output_tokens_per_item=20, seed=7)
        assert emulator.stats()["calls_by_endpoint"] == {"countTokens": 200}
        assert emulator.stats()["generate_calls"] == 0
        again = await preview_cost(str(source), strategy, output_tokens_per_item=20, seed=7)
    assert preview.counted == 200 and preview.sampled and preview.items == n
    assert again == preview, "the same seed and input give the same sample"
    true_input = sum(count_tokens(prompt(i)) for i in range(n))
    true_cost = FLASH.cost(true_input, 20 * n)
    low, high = preview.cost_range_usd
    assert low <= true_cost <= high
    assert preview.input_tokens == pytest.approx(true_input, rel=0.05)
    assert high - low > 0 and preview.input_tokens_stdev > 0


async def test_bad_input_lines_keep_their_per_line_errors_and_are_not_counted(tmp_path):
    source = write_items(tmp_path / "items.jsonl", 10, bad_lines=2)
    with GeminiEmulator() as emulator:
        preview = await preview_cost(str(source), GeminiStrategy(credentials=credentials(emulator)))
        assert emulator.stats()["calls_by_endpoint"] == {"countTokens": 10}
    assert preview.items == 10 and preview.invalid_items == 2
    # The same per-line errors as the run's results would carry (the flow's reader).
    assert preview.invalid_errors == tuple(
        f"{record.item_id}: {record.error}"
        for record in read_input(str(source))
        if isinstance(record, InvalidInput)
    )
    assert preview.invalid_errors[0].startswith("line-2: line 2: not valid JSON")
    assert preview.invalid_errors[1].startswith("line-5: line 5: not valid JSON")
    assert "2 invalid line(s) fail without a call" in preview.message()
    assert "line-5: line 5: not valid JSON" in preview.markdown()


async def test_the_output_assumption_is_stated_and_defaults_to_max_output_tokens(tmp_path):
    source = write_items(tmp_path / "items.jsonl", 3)
    with GeminiEmulator() as emulator:
        bounded = GeminiStrategy(credentials=credentials(emulator), max_output_tokens=64)
        preview = await preview_cost(str(source), bounded)
        unbounded = await preview_cost(
            str(source), GeminiStrategy(credentials=credentials(emulator))
        )
    assert preview.output_tokens_per_item == 64
    assert "max_output_tokens: an upper bound" in preview.output_assumption
    assert unbounded.output_tokens_per_item == 500
    assert "a default of 500" in unbounded.output_assumption
    assert "assumed 500 output tokens per item (a default of 500" in unbounded.message()


class CannotCount(LLMCallStrategy[str]):
    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ):
        raise AssertionError("a preview never executes")


async def test_a_strategy_that_cannot_count_is_refused_with_the_fix():
    with pytest.raises(
        ValueError, match=r"CannotCount cannot count tokens .* implement count_tokens"
    ):
        await preview_cost(["a", "b"], CannotCount(), pricing=PRICES)
    with pytest.raises(ValueError, match=r"No prices for CannotCount: pass preview_cost\(pricing="):
        await preview_cost(["a"], CannotCount())


async def test_pydantic_ai_on_gemini_delegates_counting_and_tool_output_cannot_count():
    with GeminiEmulator() as emulator:
        creds = credentials(emulator)
        agent = PydanticAIStrategy(
            model="google:gemini-2.5-flash", credentials=creds, instructions=SYSTEM
        )
        plain = GeminiStrategy(credentials=creds, system_instruction=SYSTEM)
        with_cache = PydanticAIStrategy(
            model="google:gemini-2.5-flash",
            credentials=creds,
            output_mode="native",
            context_cache=cached(emulator),
        )
        tool_output = PydanticAIStrategy(
            model="google:gemini-2.5-flash", credentials=creds, output_type="builtins:dict"
        )
        prompts = [prompt(i) for i in range(5)]
        via_agent = await preview_cost(prompts, agent, output_tokens_per_item=10)
        via_gemini = await preview_cost(prompts, plain, output_tokens_per_item=10)
        via_cache = await preview_cost(prompts, with_cache, output_tokens_per_item=10)
        with pytest.raises(ValueError, match="PydanticAIStrategy cannot count tokens"):
            await preview_cost(prompts, tool_output)
        assert emulator.stats()["caches"]["created"] == 0
        assert emulator.stats()["generate_calls"] == 0
    assert via_agent.input_tokens == via_gemini.input_tokens
    assert via_agent.cost_usd == pytest.approx(via_gemini.cost_usd)
    assert via_cache.cached_tokens_per_item == count_tokens(CONTEXT) + count_tokens(SYSTEM)


# -- the deployable flow ----------------------------------------------------------------------


async def test_the_deployable_flow_with_preview_returns_the_projection_and_calls_nothing(tmp_path):
    source = write_items(tmp_path / "items.jsonl", 12, bad_lines=1)
    output = tmp_path / "results.jsonl"
    with GeminiEmulator() as emulator:
        await cached(emulator).save("cost-preview-flow", overwrite=True)
        state = await batch_llm(
            input=str(source),
            strategy="gemini-cached-strategy/cost-preview-flow",
            output=str(output),
            config={"artifact_key": "cost-test"},
            preview=True,
            return_state=True,
        )
        stats = emulator.stats()
    assert state.is_completed(), state.message
    summary = await state.aresult()
    assert summary["preview"] is True and summary["items"] == 12
    assert summary["invalid_items"] == 1 and "not valid JSON" in summary["invalid_errors"][0]
    assert summary["counted"] == 12 and summary["cost_without_cache_usd"] > summary["cost_usd"] > 0
    assert stats["generate_calls"] == 0 and stats["caches"]["created"] == 0
    assert stats["calls_by_endpoint"] == {"countTokens": 13}
    assert not output.exists(), "a preview writes no results"
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    [artifact] = [a for a in artifacts if a.key == "cost-test-cost-preview"]
    assert artifact.type == "markdown"
    assert "## Cost preview" in str(artifact.data) and "Nothing was billed" in str(artifact.data)
