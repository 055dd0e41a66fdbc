"""The dated Gemini price table: prices per model, day and path, and what is derived from it."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from prefect_batch_llm.gemini import GEMINI_PRICES
from prefect_batch_llm.gemini.pricing import (
    GEMINI_PRICE_TABLE,
    gemini_price_entry,
    gemini_prices,
    gemini_pricing,
)
from prefect_batch_llm.results import BatchResult, ModelPricing, TokenUsage, WorkItemResult

D2026 = date(2026, 11, 22)
LAST_INTRO_DAY = date(2026, 12, 31)
LIST_PRICE_DAY = date(2027, 1, 1)


# (model, day, path) -> (input, output, cached input, storage per hour), as published.
@pytest.mark.parametrize(
    ("model", "day", "path", "expected"),
    [
        ("gemini-2.5-flash", D2026, "standard", (0.30, 2.50, 0.03, 1.00)),
        ("gemini-2.5-flash", D2026, "batch", (0.15, 1.25, 0.03, 1.00)),
        ("gemini-2.5-flash", D2026, "flex", (0.15, 1.25, 0.03, 1.00)),
        ("gemini-2.5-flash", LIST_PRICE_DAY, "standard", (0.30, 2.50, 0.03, 1.00)),
        ("gemini-2.5-flash-lite", D2026, "standard", (0.10, 0.40, 0.01, 1.00)),
        ("gemini-2.5-flash-lite", D2026, "batch", (0.05, 0.20, 0.01, 1.00)),
        ("gemini-2.5-flash-lite", D2026, "flex", (0.05, 0.20, 0.01, 1.00)),
        ("gemini-2.5-pro", D2026, "standard", (1.25, 10.00, 0.125, 4.50)),
        ("gemini-2.5-pro", D2026, "batch", (0.625, 5.00, 0.125, 4.50)),
        ("gemini-2.5-pro", D2026, "flex", (0.625, 5.00, 0.125, 4.50)),
        ("gemini-2.0-flash", D2026, "standard", (0.10, 0.40, 0.025, 1.00)),
        ("gemini-2.0-flash", D2026, "batch", (0.05, 0.20, 0.025, 1.00)),
        ("gemini-3-flash-preview", D2026, "standard", (0.50, 3.00, 0.05, 1.00)),
        ("gemini-3-flash-preview", D2026, "batch", (0.25, 1.50, 0.05, 1.00)),
        ("gemini-3.5-flash", D2026, "standard", (1.50, 9.00, 0.15, 1.00)),
        ("gemini-3.5-flash", D2026, "batch", (0.75, 4.50, 0.075, 1.00)),
        ("gemini-3.5-flash", D2026, "flex", (0.75, 4.50, 0.08, 1.00)),
        ("gemini-3.7-flash", D2026, "standard", (0.75, 3.75, 0.075, 0.50)),
        ("gemini-3.7-flash", LIST_PRICE_DAY, "batch", (0.75, 3.75, 0.075, 1.00)),
        ("gemini-3.8-flash", D2026, "standard", (0.75, 3.75, 0.075, 0.50)),
        ("gemini-3.8-flash", D2026, "batch", (0.375, 1.875, 0.0375, 0.50)),
        ("gemini-3.8-flash", D2026, "flex", (0.375, 1.875, 0.0375, 0.50)),
        ("gemini-3.8-flash", LIST_PRICE_DAY, "standard", (1.50, 7.50, 0.15, 1.00)),
        ("gemini-3.8-flash", LIST_PRICE_DAY, "batch", (0.75, 3.75, 0.075, 1.00)),
        ("gemini-3.8-flash", LIST_PRICE_DAY, "flex", (0.75, 3.75, 0.075, 1.00)),
        ("models/gemini-3.8-flash", D2026, "standard", (0.75, 3.75, 0.075, 0.50)),
    ],
)
def test_prices_per_model_day_and_path(model, day, path, expected):
    assert gemini_prices(model, on=day, path=path) == pytest.approx(expected)
    pricing = gemini_pricing(model, on=day).for_path(path)
    assert (
        pricing.input_per_million,
        pricing.output_per_million,
        pricing.cached_input_per_million,
    ) == pytest.approx(expected[:3])


@pytest.mark.parametrize("model", ["gemini-3.7-flash", "gemini-3.8-flash"])
@pytest.mark.parametrize(
    ("path", "intro", "list_price"),
    [
        ("standard", (0.75, 3.75, 0.075, 0.50), (1.50, 7.50, 0.15, 1.00)),
        ("batch", (0.375, 1.875, 0.0375, 0.50), (0.75, 3.75, 0.075, 1.00)),
        ("flex", (0.375, 1.875, 0.0375, 0.50), (0.75, 3.75, 0.075, 1.00)),
    ],
)
def test_flash_3x_prices_double_on_2027_01_01(model, path, intro, list_price):
    assert gemini_prices(model, on=LAST_INTRO_DAY, path=path) == pytest.approx(intro)
    assert gemini_prices(model, on=LIST_PRICE_DAY, path=path) == pytest.approx(list_price)
    assert gemini_prices(model, on=date(2030, 6, 1), path=path) == pytest.approx(list_price)
    # A datetime counts by its UTC day: 20:00 on 2026-12-31 at UTC-5 is 2027-01-01 in UTC,
    # 00:30 on 2027-01-01 at UTC+2 is still 2026-12-31.
    utc_minus_5 = datetime(2026, 12, 31, 20, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert gemini_prices(model, on=utc_minus_5, path=path) == pytest.approx(list_price)
    utc_plus_2 = datetime(2027, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    assert gemini_prices(model, on=utc_plus_2, path=path) == pytest.approx(intro)


@pytest.mark.parametrize(
    ("model", "day"),
    [
        ("gemini-9-ultra", D2026),
        ("models/gemini-9-ultra", LIST_PRICE_DAY),
        ("", date(2000, 1, 1)),
    ],
)
def test_an_unknown_model_is_priced_as_gemini_2_5_flash(model, day):
    assert gemini_pricing(model, on=day) == gemini_pricing("gemini-2.5-flash", on=day)
    assert gemini_prices(model, on=day) == (0.30, 2.50, 0.03, 1.00)


@pytest.mark.parametrize(
    ("model", "day", "expected_from"),
    [
        ("gemini-3.8-flash", date(2020, 1, 1), date(2026, 9, 2)),  # before the first entry
        ("gemini-3.8-flash", date(2026, 9, 2), date(2026, 9, 2)),
        ("gemini-3.8-flash", LAST_INTRO_DAY, date(2026, 9, 2)),
        ("gemini-3.8-flash", LIST_PRICE_DAY, LIST_PRICE_DAY),
        ("gemini-2.5-flash", date(2024, 1, 1), date(2025, 10, 31)),
    ],
)
def test_the_entry_in_effect_is_the_last_one_started_or_else_the_first(model, day, expected_from):
    assert gemini_price_entry(model, day).effective_from == expected_from


def test_every_model_has_sorted_entries_and_batch_and_flex_at_half_price():
    for model, entries in GEMINI_PRICE_TABLE.items():
        days = [e.effective_from for e in entries]
        assert days == sorted(days) and len(set(days)) == len(days), model
        for entry in entries:
            for path in (entry.batch, entry.flex):
                assert path.input == pytest.approx(entry.standard.input / 2), model
                assert path.output == pytest.approx(entry.standard.output / 2), model
                # Cached input: the standard price, or (3.5+ Flash) about half of it.
                assert entry.standard.cached_input / 2 - 0.01 < path.cached_input, model
                assert path.cached_input <= entry.standard.cached_input, model


def test_default_day_is_today_in_utc_and_gemini_prices_view_is_todays_standard():
    today = datetime.now(UTC).date()
    for model in GEMINI_PRICE_TABLE:
        assert gemini_pricing(model) == gemini_pricing(model, on=today)
        assert GEMINI_PRICES[model] == gemini_prices(model, on=today)
    assert GEMINI_PRICES["gemini-2.5-flash"] == (0.30, 2.50, 0.03, 1.00)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("standard", (0.75, 3.75, 0.075)),
        ("flex", (0.375, 1.875, 0.0375)),
        ("batch", (0.375, 1.875, 0.0375)),
        ("priority", (0.75, 3.75, 0.075)),
    ],
)
def test_for_path_picks_the_path_prices_and_unknown_paths_are_standard(path, expected):
    pricing = gemini_pricing("gemini-3.8-flash", on=D2026)
    chosen = pricing.for_path(path)
    assert (
        chosen.input_per_million,
        chosen.output_per_million,
        chosen.cached_input_per_million,
    ) == expected
    if path in ("flex", "batch"):
        assert chosen.flex is None and chosen.batch is None
    else:
        assert chosen is pricing


USAGE = TokenUsage(input_tokens=1_000_000, output_tokens=200_000, cached_input_tokens=400_000)


@pytest.mark.parametrize(
    ("model", "day", "standard_usd", "batch_usd"),
    [
        # 600k uncached in, 400k cached, 200k out.
        ("gemini-3.8-flash", D2026, 0.45 + 0.03 + 0.75, 0.225 + 0.015 + 0.375),
        ("gemini-3.8-flash", LIST_PRICE_DAY, 0.90 + 0.06 + 1.50, 0.45 + 0.03 + 0.75),
        # 2.5 Flash: Batch halves input and output, cached input stays at $0.03.
        ("gemini-2.5-flash", D2026, 0.18 + 0.012 + 0.50, 0.09 + 0.012 + 0.25),
    ],
)
def test_batch_cost_of_a_usage(model, day, standard_usd, batch_usd):
    pricing = gemini_pricing(model, on=day)
    assert pricing.cost_of(USAGE) == pytest.approx(standard_usd)
    assert pricing.for_path("batch").cost_of(USAGE) == pytest.approx(batch_usd)
    result = BatchResult(
        results=[
            WorkItemResult(
                item_id="a", success=True, token_usage=USAGE, usage_by_path={"batch": USAGE}
            )
        ]
    )
    assert result.estimated_cost(pricing) == pytest.approx(batch_usd)


@pytest.mark.parametrize("day", [D2026, LIST_PRICE_DAY])
def test_where_the_table_says_half_the_batch_cost_is_half_the_standard_cost(day):
    pricing = gemini_pricing("gemini-3.8-flash", on=day)
    assert pricing.for_path("batch").cost_of(USAGE) == pytest.approx(pricing.cost_of(USAGE) / 2)
    assert pricing.for_path("flex").cost_of(USAGE) == pytest.approx(pricing.cost_of(USAGE) / 2)


def test_your_own_pricing_overrides_the_table():
    mine = ModelPricing(
        input_per_million=1.0,
        output_per_million=4.0,
        cached_input_per_million=0.25,
        flex=ModelPricing(input_per_million=0.6, output_per_million=2.0),
        batch=ModelPricing(
            input_per_million=0.5, output_per_million=2.0, cached_input_per_million=0.25
        ),
    )
    assert mine.for_path("batch").cost_of(USAGE) == pytest.approx(0.3 + 0.1 + 0.4)
    # Without a cached price, a path prices cached tokens at 10% of its input price.
    assert mine.for_path("flex").cost_of(USAGE) == pytest.approx(0.36 + 0.024 + 0.4)
