"""Gemini list prices, dated: US dollars per million tokens (text prompts up to 200k tokens).

Each model has one or more dated entries. An entry holds, for each price path (`standard`,
`flex` = the Flex service tier, `batch` = Batch Mode), the input, output and cached-input
prices, and the context cache storage price per million tokens per hour. The entry in
effect on a day is the last one whose `effective_from` is on or before that day; a day
before a model's first entry gets its first entry. A model not in the table is priced as
`gemini-2.5-flash`. Output prices include thinking tokens.

Sources (each read on 2026-11-22 from stored copies of the pages; the copy's own date is
given, not the day Google set the price):

- [P1] https://ai.google.dev/gemini-api/docs/pricing, page "Last updated 2025-10-31 UTC"
  (Standard and Batch tabs; the Flex tier did not exist yet).
- [P2] the same page as fetched 2026-08-04 (verbatim HTML of the Gemini 2.5 Pro and
  Gemini 2.5 Flash sections, Standard/Batch/Flex/Priority tabs), kept as a test fixture in
  a public repository.
- [P3] the same page as retrieved 2026-09-21 (page "Last updated 2026-09-16 UTC"), text
  excerpt of the Gemini 3 Flash Preview, 3.5 Flash, 3.7 Flash, 3.8 Flash and 3.1 Pro
  Preview sections, all tabs: github.com/saross/map-reader-llm,
  tests/fixtures/pricing-page-2026-09-21.txt.
- [B] https://ai.google.dev/gemini-api/docs/batch-mode ("If a request in your batch
  results in a cache hit, the cached tokens are priced the same as for non-batch API
  traffic") and https://ai.google.dev/gemini-api/docs/optimization (Flex and Batch: "50%
  discount").

What the sources say about cached input on the discounted paths: for the 2.x models and
Gemini 3 Flash Preview the Batch and Flex tabs list the Standard cached price ("Same as
Standard" in [P3]), matching [B]; for Gemini 3.5, 3.7 and 3.8 Flash they list half of it.
So "Batch/Flex = 50%" holds for input and output, not always for cached input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from types import MappingProxyType

from prefect_batch_llm.results import ModelPricing

__all__ = [
    "GEMINI_PRICES",
    "GEMINI_PRICE_TABLE",
    "GeminiPriceEntry",
    "PathPrices",
    "gemini_price_entry",
    "gemini_prices",
    "gemini_pricing",
]


@dataclass(frozen=True)
class PathPrices:
    """Prices of one price path, US dollars per million tokens."""

    input: float
    output: float
    cached_input: float


@dataclass(frozen=True)
class GeminiPriceEntry:
    """The prices of one model from `effective_from` on (until the model's next entry)."""

    effective_from: date
    standard: PathPrices
    flex: PathPrices
    batch: PathPrices
    #: Context cache storage, US dollars per million tokens per hour (the same on every path).
    storage_per_hour: float

    def path(self, path: str) -> PathPrices:
        """The prices of `path` (`standard`, `flex` or `batch`; anything else: standard)."""
        if path == "flex":
            return self.flex
        if path == "batch":
            return self.batch
        return self.standard

    def pricing(self) -> ModelPricing:
        """This entry as a `ModelPricing`: standard prices with `.flex` and `.batch` set."""

        def one(prices: PathPrices) -> ModelPricing:
            return ModelPricing(
                input_per_million=prices.input,
                output_per_million=prices.output,
                cached_input_per_million=prices.cached_input,
            )

        standard = one(self.standard)
        return ModelPricing(
            input_per_million=standard.input_per_million,
            output_per_million=standard.output_per_million,
            cached_input_per_million=standard.cached_input_per_million,
            flex=one(self.flex),
            batch=one(self.batch),
        )


def _entry(
    effective_from: date,
    standard: tuple[float, float, float],
    flex: tuple[float, float, float],
    batch: tuple[float, float, float],
    storage_per_hour: float,
) -> GeminiPriceEntry:
    return GeminiPriceEntry(
        effective_from=effective_from,
        standard=PathPrices(*standard),
        flex=PathPrices(*flex),
        batch=PathPrices(*batch),
        storage_per_hour=storage_per_hour,
    )


#: The day the Gemini 3.x Flash introductory prices end: from 2027-01-01 they double ([P3]:
#: "$0.75 through December 31, 2026. $1.50 starting January 1, 2027.").
_FLASH_3X_LIST_PRICE_FROM = date(2027, 1, 1)

# _entry(effective_from, standard, flex, batch, storage per hour); each path's tuple is
# (input, output, cached input), US dollars per million tokens.
_TABLE: dict[str, tuple[GeminiPriceEntry, ...]] = {
    # [P1] Standard and Batch (Batch cached = Standard cached); [P2] Flex = Batch, same
    # numbers on 2026-08-04. First attested 2025-10-31 ([P1]); earlier days get these too
    # (the cached price was higher before: not modelled).
    "gemini-2.5-flash": (
        _entry(
            date(2025, 10, 31), (0.30, 2.50, 0.03), (0.15, 1.25, 0.03), (0.15, 1.25, 0.03), 1.00
        ),
    ),
    # [P1] Standard and Batch (Batch cached = Standard cached). Flex: UNCONFIRMED, no
    # capture of its Flex tab was found; set to the Batch prices, as for 2.5 Flash and
    # 2.5 Pro in [P2] and the 50% of [B].
    "gemini-2.5-flash-lite": (
        _entry(
            date(2025, 10, 31), (0.10, 0.40, 0.01), (0.05, 0.20, 0.01), (0.05, 0.20, 0.01), 1.00
        ),
    ),
    # [P1] and [P2]: Standard, Batch and Flex (prompts <= 200k tokens; longer prompts cost
    # more and are not modelled).
    "gemini-2.5-pro": (
        _entry(
            date(2025, 10, 31),
            (1.25, 10.00, 0.125),
            (0.625, 5.00, 0.125),
            (0.625, 5.00, 0.125),
            4.50,
        ),
    ),
    # [P1] Standard and Batch (Batch cached = Standard cached). Flex: UNCONFIRMED, set to the
    # Batch prices; third-party pages (e.g. morphllm.com/gemini-api-pricing) say the model
    # was shut down on 2026-06-01.
    "gemini-2.0-flash": (
        _entry(
            date(2025, 10, 31), (0.10, 0.40, 0.025), (0.05, 0.20, 0.025), (0.05, 0.20, 0.025), 1.00
        ),
    ),
    # [P3]: Batch and Flex cached "Same as Standard". Released 2025-12-17 at these standard
    # prices (aifreeapi.com/en/posts/gemini-3-flash-api-price; models.dev).
    "gemini-3-flash-preview": (
        _entry(
            date(2025, 12, 17), (0.50, 3.00, 0.05), (0.25, 1.50, 0.05), (0.25, 1.50, 0.05), 1.00
        ),
    ),
    # [P3]. Flex cached is published as $0.08 (Batch: $0.075), kept as published. Released
    # 2026-05-19 at these standard prices (apidog.com/blog/gemini-3-5-flash-pricing).
    "gemini-3.5-flash": (
        _entry(
            date(2026, 5, 19), (1.50, 9.00, 0.15), (0.75, 4.50, 0.08), (0.75, 4.50, 0.075), 1.00
        ),
    ),
    # [P3]: introductory prices through 2026-12-31, list prices from 2027-01-01, on every
    # path (storage too: $0.50 then $1.00). First entry from the launch, reported on
    # 2026-08-14 (github.com/orgs/cometapi-dev/discussions/130).
    "gemini-3.7-flash": (
        _entry(
            date(2026, 8, 14),
            (0.75, 3.75, 0.075),
            (0.375, 1.875, 0.0375),
            (0.375, 1.875, 0.0375),
            0.50,
        ),
        _entry(
            _FLASH_3X_LIST_PRICE_FROM,
            (1.50, 7.50, 0.15),
            (0.75, 3.75, 0.075),
            (0.75, 3.75, 0.075),
            1.00,
        ),
    ),
    # [P3], as 3.7 Flash. First entry from the release, 2026-09-02
    # (docs.apiyi.com/ja/models/gemini-3-8-flash.md).
    "gemini-3.8-flash": (
        _entry(
            date(2026, 9, 2),
            (0.75, 3.75, 0.075),
            (0.375, 1.875, 0.0375),
            (0.375, 1.875, 0.0375),
            0.50,
        ),
        _entry(
            _FLASH_3X_LIST_PRICE_FROM,
            (1.50, 7.50, 0.15),
            (0.75, 3.75, 0.075),
            (0.75, 3.75, 0.075),
            1.00,
        ),
    ),
}

#: model -> its dated price entries, oldest first.
GEMINI_PRICE_TABLE: Mapping[str, tuple[GeminiPriceEntry, ...]] = MappingProxyType(
    {
        model: tuple(sorted(entries, key=lambda e: e.effective_from))
        for model, entries in _TABLE.items()
    }
)
_DEFAULT = "gemini-2.5-flash"


def _day(on: date | datetime | None) -> date:
    if on is None:
        return datetime.now(UTC).date()
    if isinstance(on, datetime):
        return (on.astimezone(UTC) if on.tzinfo else on).date()
    return on


def gemini_price_entry(model: str, on: date | datetime | None = None) -> GeminiPriceEntry:
    """The entry of `model` in effect on `on` (default: today, UTC).

    A day before the model's first entry gets the first entry; an unknown model is priced
    as `gemini-2.5-flash`. A `models/` prefix is ignored.
    """
    entries = GEMINI_PRICE_TABLE.get(model.removeprefix("models/")) or GEMINI_PRICE_TABLE[_DEFAULT]
    day = _day(on)
    chosen = entries[0]
    for entry in entries:
        if entry.effective_from <= day:
            chosen = entry
    return chosen


def gemini_prices(
    model: str, on: date | datetime | None = None, path: str = "standard"
) -> tuple[float, float, float, float]:
    """(input, output, cached input, cache storage per hour) of `model` on `path` and day `on`.

    Defaults: the standard path, today (UTC). Unknown models are priced as Gemini 2.5 Flash.
    """
    entry = gemini_price_entry(model, on)
    prices = entry.path(path)
    return (prices.input, prices.output, prices.cached_input, entry.storage_per_hour)


def gemini_pricing(model: str, *, on: date | datetime | None = None) -> ModelPricing:
    """A `ModelPricing` for `BatchResult.estimated_cost()`, with its Flex and Batch prices.

    The prices in effect on `on` (default: today, UTC); unknown models are priced as
    Gemini 2.5 Flash.
    """
    return gemini_price_entry(model, on).pricing()


#: model -> (input, output, cached input, cache storage per hour): the **standard** prices
#: in effect when this module was imported (UTC day). For another day or path use
#: `gemini_prices(model, on=..., path=...)`; the dated table is `GEMINI_PRICE_TABLE`.
GEMINI_PRICES: dict[str, tuple[float, float, float, float]] = {
    model: gemini_prices(model) for model in GEMINI_PRICE_TABLE
}
