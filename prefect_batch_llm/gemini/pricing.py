"""Gemini list prices (US dollars per million tokens, text prompts up to 200k tokens)."""

from __future__ import annotations

from prefect_batch_llm.results import ModelPricing

#: model -> (input, output, cached input, cache storage per hour). Output includes thinking.
GEMINI_PRICES: dict[str, tuple[float, float, float, float]] = {
    "gemini-2.5-flash": (0.30, 2.50, 0.03, 1.00),
    "gemini-2.5-flash-lite": (0.10, 0.40, 0.01, 1.00),
    "gemini-2.5-pro": (1.25, 10.00, 0.125, 4.50),
    "gemini-2.0-flash": (0.10, 0.40, 0.025, 1.00),
}
_DEFAULT = "gemini-2.5-flash"


def gemini_prices(model: str) -> tuple[float, float, float, float]:
    """(input, output, cached, storage/hour) for `model`; unknown models priced as Flash."""
    return GEMINI_PRICES.get(model.removeprefix("models/"), GEMINI_PRICES[_DEFAULT])


def gemini_pricing(model: str) -> ModelPricing:
    """A `ModelPricing` for `BatchResult.estimated_cost()`."""
    price_in, price_out, price_cached, _ = gemini_prices(model)
    return ModelPricing(
        input_per_million=price_in,
        output_per_million=price_out,
        cached_input_per_million=price_cached,
    )
