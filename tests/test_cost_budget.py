"""The budget cap (`ProcessorConfig.max_cost_usd`): no item starts once the projected spend
would exceed it; every item not started gets one `budget_exceeded` result.

The documented overshoot bound (docs/guides/cost.md): billed <= cap + in flight x the largest
item's cost, where in flight is at most max_workers (or the items of the chunks in flight).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from prefect_batch_llm import (
    LLMCallStrategy,
    LLMWorkItem,
    ModelPricing,
    ParallelBatchProcessor,
    PermanentError,
    ProcessorConfig,
    RetryConfig,
    RetryState,
    preview_cost,
)
from prefect_batch_llm._budget import budget_verdict
from prefect_batch_llm.flows import batch_llm
from prefect_batch_llm.gemini import GeminiCredentials, GeminiStrategy, gemini_pricing
from prefect_batch_llm.testing import GeminiEmulator

FLASH = gemini_pricing("gemini-2.5-flash")
#: $1 per million input tokens, $10 per million output tokens: 1,000 input tokens = $0.001.
PRICES = ModelPricing(input_per_million=1.0, output_per_million=10.0)


# -- the decision (pure) ----------------------------------------------------------------------

VERDICTS = [
    # cap, spent, in flight, projected per item -> verdict
    pytest.param(1.0, 0.0, 0, None, "start", id="nothing-known-nothing-in-flight: one item"),
    pytest.param(1.0, 0.0, 1, None, "wait", id="nothing-known: one at a time"),
    pytest.param(1.0, 1.0, 0, None, "stop", id="nothing-known-cap-spent"),
    pytest.param(1.0, 0.5, 0, 0.5, "start", id="exactly-fits"),
    pytest.param(1.0, 0.5, 1, 0.25, "start", id="in-flight-and-next-fit"),
    pytest.param(1.0, 0.5, 2, 0.25, "wait", id="in-flight-would-overrun: wait for one"),
    pytest.param(1.0, 0.6, 0, 0.5, "stop", id="next-would-overrun: stop"),
    pytest.param(1.0, 0.0, 3, 0.0, "start", id="free-items-never-stop"),
    pytest.param(1.0, 1.5, 0, 0.0, "stop", id="overspent-even-free-items-stop"),
    pytest.param(1.0, 1.5, 2, 0.0, "wait", id="overspent-with-items-in-flight-waits"),
]


@pytest.mark.parametrize(("cap", "spent", "in_flight", "per_item", "verdict"), VERDICTS)
def test_budget_verdict_table(cap, spent, in_flight, per_item, verdict):
    assert budget_verdict(cap=cap, spent=spent, in_flight=in_flight, per_item=per_item) == verdict


# -- the engine -------------------------------------------------------------------------------


class Metered(LLMCallStrategy[str]):
    """Bills a fixed 1,000 input tokens per call ($0.001 at PRICES); records concurrency."""

    def __init__(self, latency: float = 0.02, fail: bool = False) -> None:
        self.latency = latency
        self.fail = fail
        self.running = 0
        self.peak_before_first_finish = 0
        self.peak = 0
        self.finished = 0
        self.calls = 0

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ):
        self.calls += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        if not self.finished:
            self.peak_before_first_finish = max(self.peak_before_first_finish, self.running)
        try:
            await asyncio.sleep(self.latency)
        finally:
            self.running -= 1
            self.finished += 1
        if self.fail:
            raise PermanentError("refused", token_usage={"input_tokens": 1000})
        return f"answer to {prompt}", {"input_tokens": 1000, "output_tokens": 0}


async def run(strategy: LLMCallStrategy[Any], n: int, pricing: ModelPricing | None, **config):
    config.setdefault("retry", RetryConfig(max_attempts=1))
    config.setdefault("report_artifacts", False)
    async with ParallelBatchProcessor(
        config=ProcessorConfig(**config), pricing=pricing
    ) as processor:
        for i in range(n):
            await processor.add_work(LLMWorkItem(f"item-{i}", strategy, f"prompt {i}"))
        return await processor.process_all()


def check_one_result_per_item(batch, n: int) -> None:
    assert [r.item_id for r in batch.results] == [f"item-{i}" for i in range(n)]


def test_a_cap_without_pricing_is_refused_at_construction_with_the_fix():
    with pytest.raises(
        ValueError,
        match=r"max_cost_usd=0.5 needs prices .* pass "
        r"ParallelBatchProcessor\(pricing=ModelPricing",
    ):
        ParallelBatchProcessor(config=ProcessorConfig(max_cost_usd=0.5))


@pytest.mark.parametrize("items_per_task", [None, 4], ids=["per-item", "chunks"])
async def test_the_cap_stops_new_items_and_reports_the_rest_as_budget_exceeded(items_per_task):
    strategy = Metered()
    batch = await run(
        strategy, 40, PRICES, max_workers=4, max_cost_usd=0.0105, items_per_task=items_per_task
    )
    check_one_result_per_item(batch, 40)
    ran = [r for r in batch.results if r.attempts]
    stopped = [r for r in batch.results if r.error_category == "budget_exceeded"]
    # Each item costs $0.001: ten fit under $0.0105, the eleventh would not.
    assert len(ran) == 10 == strategy.calls and all(r.success for r in ran)
    assert len(stopped) == 30 and len(ran) + len(stopped) == 40
    assert batch.estimated_cost(PRICES) == pytest.approx(0.010)
    for result in stopped:
        assert result.attempts == 0 and not result.token_usage and not result.success
        assert "max_cost_usd is $0.0105" in (result.error or "")
        assert "$0.0100 was spent" in (result.error or "")
        assert "Raise ProcessorConfig.max_cost_usd" in (result.error or "")
    assert batch.errors_by_category() == {"budget_exceeded": 30}


async def test_without_an_estimate_items_start_one_at_a_time_until_the_first_finishes():
    strategy = Metered(latency=0.05)
    batch = await run(strategy, 12, PRICES, max_workers=4, max_cost_usd=1.0)
    assert batch.succeeded == 12
    assert strategy.peak_before_first_finish == 1
    assert strategy.peak == 4, "then the running mean lets every worker start"


async def test_with_the_preview_estimate_every_worker_starts_at_once():
    strategy = Metered(latency=0.05)
    batch = await run(
        strategy, 12, PRICES, max_workers=4, max_cost_usd=1.0, expected_cost_per_item_usd=0.001
    )
    assert batch.succeeded == 12 and strategy.peak_before_first_finish == 4


async def test_failed_attempts_count_towards_the_spend():
    strategy = Metered(fail=True)  # every attempt fails, billing 1,000 tokens
    batch = await run(strategy, 20, PRICES, max_workers=2, max_cost_usd=0.0055)
    check_one_result_per_item(batch, 20)
    assert strategy.calls == 5, "five failed items spend $0.005; a sixth would pass the cap"
    assert batch.errors_by_category() == {"permanent": 5, "budget_exceeded": 15}


# -- on the emulator, through the real client -------------------------------------------------


def billed_usd(emulator: GeminiEmulator) -> float:
    billed = emulator.stats()["billed"]
    return billed["input_usd"] + billed["cached_usd"] + billed["output_usd"]


async def test_a_capped_gemini_batch_bills_at_most_the_cap_plus_the_items_in_flight():
    n, workers = 60, 4
    with GeminiEmulator(latency=0.02) as emulator:
        strategy = GeminiStrategy(
            credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url)
        )
        prompts = [f"Question {i}: " + "tell me more " * (i % 7) for i in range(n)]
        preview = await preview_cost(prompts[:10], strategy, output_tokens_per_item=20)
        cap = 20 * preview.cost_per_item_usd  # room for about a third of the batch
        emulator.reset()
        async with ParallelBatchProcessor(
            config=ProcessorConfig(max_workers=workers, max_cost_usd=cap, report_artifacts=False),
            pricing=FLASH,
        ) as processor:
            for i, text in enumerate(prompts):
                await processor.add_work(LLMWorkItem(f"item-{i}", strategy, text))
            batch = await processor.process_all()
        billed = billed_usd(emulator)
        generate_calls = emulator.stats()["generate_calls"]
    check_one_result_per_item(batch, n)
    ran = [r for r in batch.results if r.attempts]
    stopped = [r for r in batch.results if r.error_category == "budget_exceeded"]
    assert len(ran) + len(stopped) == n and len(ran) == generate_calls
    largest = max(
        FLASH.cost(r.token_usage["input_tokens"], r.token_usage["output_tokens"]) for r in ran
    )
    assert batch.estimated_cost(FLASH) == pytest.approx(billed)
    assert billed <= cap + workers * largest, "the documented overshoot bound"
    assert billed > cap - 2 * largest, "the budget is used, not abandoned early"
    print(
        f"cap ${cap:.6f}, billed ${billed:.6f} ({len(ran)} items run, {len(stopped)} "
        f"budget_exceeded), largest item ${largest:.6f}"
    )
    assert all(r.attempts == 0 and "max_cost_usd" in (r.error or "") for r in stopped)


# -- the deployable flow, and resuming --------------------------------------------------------


def write_items(path: Path, n: int) -> Path:
    path.write_text(
        "\n".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) for i in range(n)) + "\n"
    )
    return path


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == len(records), "exactly one result line per item"
    return by_id


async def test_the_flow_fails_on_a_budget_stop_and_the_next_run_resumes_the_rest(tmp_path):
    n = 30
    source = write_items(tmp_path / "items.jsonl", n)
    with GeminiEmulator() as emulator:
        strategy = GeminiStrategy(
            credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url)
        )
        await strategy.save("budget-flow", overwrite=True)
        per_item = (
            await preview_cost(
                [f"Question {i}?" for i in range(n)], strategy, output_tokens_per_item=12
            )
        ).cost_per_item_usd
        emulator.reset()
        first = tmp_path / "first.jsonl"
        state = await batch_llm(
            input=str(source),
            strategy="gemini-strategy/budget-flow",
            output=str(first),
            config={"max_workers": 2, "max_cost_usd": 10 * per_item, "report_artifacts": False},
            return_state=True,
        )
        first_calls = emulator.stats()["generate_calls"]
        results = read_results(first)
        stopped = {k for k, r in results.items() if r["category"] == "budget_exceeded"}
        assert state.is_failed()
        assert f"{len(stopped)} budget_exceeded" in (state.message or "")
        assert len(results) == n and 15 < len(stopped) < n
        assert first_calls == n - len(stopped)
        assert all(results[k]["attempts"] == 0 for k in stopped)

        # The next run (no cap) resumes: completed items come from their stored results,
        # the budget_exceeded ones (failures are not stored) run now.
        emulator.reset()
        second = tmp_path / "second.jsonl"
        summary = await batch_llm(
            input=str(source),
            strategy="gemini-strategy/budget-flow",
            output=str(second),
            config={"max_workers": 2, "report_artifacts": False},
        )
        again = read_results(second)
        assert summary["succeeded"] == n
        assert emulator.stats()["generate_calls"] == len(stopped)
        assert {k for k, r in again.items() if r.get("cached")} == set(results) - stopped
