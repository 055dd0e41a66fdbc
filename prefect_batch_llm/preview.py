"""The cost preview: what a batch would cost, before anything is billed.

`preview_cost()` reads the items (a JSONL/CSV file, with the deployable flow's reader, or
any iterable of prompts), counts the input tokens of every prompt, or of a seeded random
sample when there are more than `sample_size`, with the strategy's `count_tokens()` (Gemini's
free `countTokens` API; no generate call, no context cache created), assumes an output size,
and prices the batch with and without the context cache. `project_cost()` is the pure
arithmetic. See docs/guides/cost.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prefect.artifacts import acreate_markdown_artifact
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from prefect_batch_llm._budget import usd
from prefect_batch_llm._engine.decision import Used, decide
from prefect_batch_llm.config import RetryConfig
from prefect_batch_llm.errors import DefaultErrorClassifier, describe
from prefect_batch_llm.files import InputRecord, InvalidInput, read_input
from prefect_batch_llm.gemini.pricing import gemini_pricing
from prefect_batch_llm.items import LLMWorkItem
from prefect_batch_llm.results import ModelPricing, TokenUsage, validate_token_usage
from prefect_batch_llm.strategy import LLMCallStrategy

logger = logging.getLogger("prefect_batch_llm")

#: Above this many items, a seeded random sample of this many prompts is counted.
DEFAULT_SAMPLE_SIZE = 200
#: Output tokens per item assumed when neither the caller nor the strategy says.
DEFAULT_OUTPUT_TOKENS = 500
#: The normal quantile of the 95% range of a sampled estimate.
Z_95 = 1.96
#: Invalid lines whose errors a preview keeps (all are counted).
MAX_KEPT_ERRORS = 1000
_SHOWN_ERRORS = 20


@dataclass(frozen=True)
class CostPreview:
    """A batch's projected cost, from counted prompt tokens and an assumed output size.

    Costs are US dollars, `with the context cache` (cached tokens at the cached rate) and
    `without` it (every input token at the input rate). With a sample, totals are the sample
    mean times `items` and the ranges are 95% ranges of that estimate (normal approximation,
    finite-population corrected); when every prompt is counted they are exact for the input,
    and the ranges have no width. The output is an assumption, outside the ranges.

    Attributes:
        items: Items the batch would call (valid lines).
        counted: Prompts whose tokens were counted (`items`, or the sample size).
        seed: Seed of the sample.
        input_tokens_per_item: Mean input tokens of one call, cached ones included.
        input_tokens_stdev: Their standard deviation over the counted prompts.
        cached_tokens_per_item: Mean input tokens read from a context cache per call.
        output_tokens_per_item: The assumed output tokens per item.
        output_assumption: Where that number comes from.
        input_tokens: Projected input tokens of the batch (cached included).
        cached_input_tokens: Projected cached input tokens of the batch.
        output_tokens: Projected output tokens of the batch.
        cost_usd: Projected cost with the context cache.
        cost_range_usd: Its 95% range (low, high).
        cost_without_cache_usd: Projected cost without a context cache.
        cost_without_cache_range_usd: Its 95% range (low, high).
        cost_per_item_usd: Mean cost of one item with the cache: what
            `ProcessorConfig.expected_cost_per_item_usd` takes.
        cost_per_item_without_cache_usd: Mean cost of one item without it.
        pricing: The prices used.
        invalid_items: Lines that would fail without a call (never billed).
        invalid_errors: `id: error` of the first invalid lines.
    """

    items: int
    counted: int
    seed: int
    input_tokens_per_item: float
    input_tokens_stdev: float
    cached_tokens_per_item: float
    output_tokens_per_item: int
    output_assumption: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_usd: float
    cost_range_usd: tuple[float, float]
    cost_without_cache_usd: float
    cost_without_cache_range_usd: tuple[float, float]
    cost_per_item_usd: float
    cost_per_item_without_cache_usd: float
    pricing: ModelPricing
    invalid_items: int = 0
    invalid_errors: tuple[str, ...] = field(default=())
    #: The execution path priced (`standard`, `flex`, `batch`): its own prices are used.
    price_path: str = "standard"

    @property
    def sampled(self) -> bool:
        """Whether a sample was counted rather than every prompt."""
        return self.counted < self.items

    def counted_text(self) -> str:
        if self.sampled:
            return (
                f"{self.counted} of {self.items} prompts (seeded random sample, seed {self.seed})"
            )
        return f"all {self.items} prompts"

    def message(self) -> str:
        """One line for the log."""
        spread = ""
        if self.sampled:
            low, high = self.cost_range_usd
            spread = f" (95% range {usd(low)} to {usd(high)})"
        invalid = f"; {self.invalid_items} invalid line(s) fail without a call" * bool(
            self.invalid_items
        )
        return (
            f"Cost preview: {self.items} items, projected {usd(self.cost_usd)}{spread} with "
            f"the context cache, {usd(self.cost_without_cache_usd)} without it "
            f"({usd(self.cost_per_item_usd)} per item); counted {self.counted_text()}; "
            f"assumed {self.output_tokens_per_item} output tokens per item "
            f"({self.output_assumption}){invalid}. Nothing was billed."
        )

    def summary(self) -> dict[str, Any]:
        """A JSON-ready digest (what the deployable flow returns with `preview=True`)."""
        return {
            "preview": True,
            "price_path": self.price_path,
            "items": self.items,
            "invalid_items": self.invalid_items,
            "counted": self.counted,
            "sampled": self.sampled,
            "seed": self.seed,
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "output_tokens": self.output_tokens,
            "input_tokens_per_item": round(self.input_tokens_per_item, 1),
            "input_tokens_stdev": round(self.input_tokens_stdev, 1),
            "output_tokens_per_item": self.output_tokens_per_item,
            "output_assumption": self.output_assumption,
            "cost_usd": round(self.cost_usd, 6),
            "cost_range_usd": [round(x, 6) for x in self.cost_range_usd],
            "cost_without_cache_usd": round(self.cost_without_cache_usd, 6),
            "cost_without_cache_range_usd": [
                round(x, 6) for x in self.cost_without_cache_range_usd
            ],
            "cost_per_item_usd": round(self.cost_per_item_usd, 8),
            "cost_per_item_without_cache_usd": round(self.cost_per_item_without_cache_usd, 8),
            "invalid_errors": list(self.invalid_errors[:_SHOWN_ERRORS]),
        }

    def markdown(self) -> str:
        """The Prefect markdown artifact."""
        low, high = self.cost_range_usd
        low_u, high_u = self.cost_without_cache_range_usd
        pricing = self.pricing
        cached_price = (
            pricing.cached_input_per_million
            if pricing.cached_input_per_million is not None
            else pricing.input_per_million * 0.1
        )
        lines = [
            "## Cost preview",
            "",
            "Nothing was billed: the prompts were counted with the strategy's token counter "
            "(Gemini `countTokens`), without any generate call or context cache.",
            "",
            "| | with the context cache | without it |",
            "|---|---|---|",
            f"| projected cost | **{usd(self.cost_usd)}** | {usd(self.cost_without_cache_usd)} |",
            f"| 95% range | {usd(low)} to {usd(high)} | {usd(low_u)} to {usd(high_u)} |",
            f"| per item (mean) | {usd(self.cost_per_item_usd)} "
            f"| {usd(self.cost_per_item_without_cache_usd)} |",
            "",
            "| | |",
            "|---|---|",
            f"| items to call | {self.items} |",
            f"| invalid lines (fail without a call) | {self.invalid_items} |",
            f"| prompts counted | {self.counted_text()} |",
            f"| input tokens per item | {self.input_tokens_per_item:.1f} (stdev "
            f"{self.input_tokens_stdev:.1f}), of which {self.cached_tokens_per_item:.1f} cached |",
            f"| output tokens per item | {self.output_tokens_per_item}: {self.output_assumption} |",
            f"| projected tokens | {self.input_tokens} input ({self.cached_input_tokens} cached), "
            f"{self.output_tokens} output |",
            f"| prices per million tokens ({self.price_path}) | input "
            f"${pricing.input_per_million}, cached ${cached_price}, output "
            f"${pricing.output_per_million} |",
            "",
            "The range covers the sampling of prompts only: the output size is an assumption, "
            "retries are not projected, and context cache storage (billed per hour) is not "
            "included.",
        ]
        if self.invalid_errors:
            lines += ["", f"### Invalid lines (first {min(_SHOWN_ERRORS, self.invalid_items)})", ""]
            lines += [f"- {error}" for error in self.invalid_errors[:_SHOWN_ERRORS]]
        return "\n".join(lines)


def _mean_and_spread(values: Sequence[float], population: int) -> tuple[float, float, float]:
    """(mean, sample stdev, half width of the 95% range of population x mean)."""
    if not values:
        return 0.0, 0.0, 0.0
    mean = statistics.fmean(values)
    stdev = statistics.stdev(values) if len(values) > 1 else 0.0
    n = len(values)
    if n >= population or population <= 1:
        return mean, stdev, 0.0
    correction = math.sqrt((population - n) / (population - 1))
    return mean, stdev, Z_95 * population * stdev / math.sqrt(n) * correction


def project_cost(
    counts: Sequence[TokenUsage],
    *,
    items: int,
    output_tokens_per_item: int,
    pricing: ModelPricing,
    output_assumption: str = "given",
    seed: int = 0,
    invalid_items: int = 0,
    invalid_errors: Sequence[str] = (),
) -> CostPreview:
    """The projection from counted prompts (pure: no I/O).

    Args:
        counts: One `count_tokens()` answer per counted prompt (`input_tokens`, cached ones
            included, and `cached_input_tokens`): all the items' prompts, or a random sample.
        items: How many items the batch would call.
        output_tokens_per_item: The assumed output tokens of one item.
        pricing: The prices.
        output_assumption: Where the output size comes from (shown in the preview).
        seed: The sample's seed (shown).
        invalid_items: Lines that fail without a call.
        invalid_errors: Their errors.
    """
    if len(counts) > items or (items and not counts):
        raise ValueError(f"{len(counts)} counted prompts for {items} items: count 1 to {items}.")
    inputs = [c.get("input_tokens", 0) for c in counts]
    cached = [c.get("cached_input_tokens", 0) for c in counts]
    out = output_tokens_per_item
    with_cache = [pricing.cost(i, out, c) for i, c in zip(inputs, cached, strict=True)]
    without = [pricing.cost(i, out, 0) for i in inputs]
    mean_in, stdev_in, _ = _mean_and_spread([float(i) for i in inputs], items)
    mean_cached = statistics.fmean(cached) if cached else 0.0
    mean_cost, _, half = _mean_and_spread(with_cache, items)
    mean_without, _, half_without = _mean_and_spread(without, items)
    cost, cost_without = items * mean_cost, items * mean_without
    return CostPreview(
        items=items,
        counted=len(counts),
        seed=seed,
        input_tokens_per_item=mean_in,
        input_tokens_stdev=stdev_in,
        cached_tokens_per_item=mean_cached,
        output_tokens_per_item=out,
        output_assumption=output_assumption,
        input_tokens=round(items * mean_in),
        cached_input_tokens=round(items * mean_cached),
        output_tokens=items * out,
        cost_usd=cost,
        cost_range_usd=(max(0.0, cost - half), cost + half),
        cost_without_cache_usd=cost_without,
        cost_without_cache_range_usd=(
            max(0.0, cost_without - half_without),
            cost_without + half_without,
        ),
        cost_per_item_usd=mean_cost,
        cost_per_item_without_cache_usd=mean_without,
        pricing=pricing,
        invalid_items=invalid_items,
        invalid_errors=tuple(invalid_errors),
    )


# -- the machinery ---------------------------------------------------------------------------


@dataclass
class _Sample:
    prompts: list[Any] = field(default_factory=list)
    items: int = 0
    invalid_items: int = 0
    invalid_errors: list[str] = field(default_factory=list)


def _sample(input: str | Iterable[Any], size: int, seed: int) -> _Sample:
    """One streaming pass: every valid prompt is a candidate of a seeded reservoir sample of
    `size` (all of them when there are no more); invalid lines are counted with their error."""
    rng = random.Random(seed)
    sample = _Sample()
    records: Iterable[Any] = read_input(input) if isinstance(input, str) else input
    for record in records:
        if isinstance(record, InvalidInput):
            sample.invalid_items += 1
            if len(sample.invalid_errors) < MAX_KEPT_ERRORS:
                sample.invalid_errors.append(f"{record.item_id}: {record.error}")
            continue
        prompt = record.prompt if isinstance(record, InputRecord | LLMWorkItem) else record
        sample.items += 1
        if len(sample.prompts) < size:
            sample.prompts.append(prompt)
        else:
            slot = rng.randrange(sample.items)
            if slot < size:
                sample.prompts[slot] = prompt
    return sample


def _output_assumption(strategy: LLMCallStrategy[Any], given: int | None) -> tuple[int, str]:
    if given is not None:
        return given, "output_tokens_per_item, as given"
    limit = getattr(strategy, "max_output_tokens", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return limit, "the strategy's max_output_tokens: an upper bound"
    return DEFAULT_OUTPUT_TOKENS, (
        f"a default of {DEFAULT_OUTPUT_TOKENS} per answer (thinking included); pass "
        "output_tokens_per_item or set the strategy's max_output_tokens"
    )


def default_pricing(strategy: LLMCallStrategy[Any]) -> ModelPricing | None:
    """List prices of a strategy's Gemini model (`model` attribute naming gemini), else None."""
    model = getattr(strategy, "model", None)
    if isinstance(model, str) and "gemini" in model:
        return gemini_pricing(model.split(":", 1)[-1])
    return None


async def _count_one(strategy: LLMCallStrategy[Any], prompt: Any, retry: RetryConfig) -> TokenUsage:
    """One prompt's count; failures are retried under the batch's retry policy."""
    classifier = strategy.error_classifier or DefaultErrorClassifier()
    used = Used()
    name = type(strategy).__name__
    while True:
        try:
            counted = await strategy.count_tokens(prompt)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            decision = decide(
                classifier.classify(exc), used, retry, now=time.monotonic(), deadline=None
            )
            if not decision.retry:
                raise RuntimeError(
                    f"The cost preview could not count a prompt's tokens: {describe(exc)} "
                    f"({decision.reason}). Nothing was billed."
                ) from None
            used = decision.used_after(used)
            await asyncio.sleep(decision.wait)
            continue
        if counted is None:
            raise ValueError(
                f"{name} cannot count tokens (its count_tokens() returns None), so the cost "
                "preview cannot project this batch. Use a strategy that counts (GeminiStrategy, "
                "GeminiCachedStrategy, a PydanticAIStrategy on a google: model with "
                "credentials) or implement count_tokens() in yours."
            )
        return validate_token_usage(counted, source=f"{name}.count_tokens()")


async def _count(
    strategy: LLMCallStrategy[Any], prompts: list[Any], concurrency: int, retry: RetryConfig
) -> list[TokenUsage]:
    """Count every prompt between `prepare_counting()` and `cleanup()` (also on failure)."""
    slots = asyncio.Semaphore(concurrency)

    async def one(prompt: Any) -> TokenUsage:
        async with slots:
            return await _count_one(strategy, prompt, retry)

    try:
        await strategy.prepare_counting()  # inside: what it acquired before failing is released
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(prompt)) for prompt in prompts]
    except* (ValueError, RuntimeError) as failures:
        raise failures.exceptions[0] from None
    finally:
        await strategy.cleanup()
    return [task.result() for task in tasks]


def _log(message: str) -> None:
    try:
        get_run_logger().info(message)
    except MissingContextError:
        logger.info(message)


async def preview_cost(
    input: str | Iterable[Any],
    strategy: LLMCallStrategy[Any],
    *,
    pricing: ModelPricing | None = None,
    output_tokens_per_item: int | None = None,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    concurrency: int = 8,
    retry: RetryConfig | None = None,
    artifact_key: str | None = None,
    artifacts: bool = True,
) -> CostPreview:
    """Project what running `input` through `strategy` would cost; bill nothing.

    Counts the input tokens of every prompt, or of a seeded random sample of `sample_size`
    prompts when there are more, with `strategy.count_tokens()` between
    `strategy.prepare_counting()` and `strategy.cleanup()`: for Gemini strategies, the free
    `countTokens` API (no generate call; a cached strategy creates no cache). Logs one line
    and, inside a flow run, creates a markdown artifact (key `<artifact_key>-cost-preview`).

    Args:
        input: Path or fsspec URL of a JSONL/CSV file (read as the deployable flow reads it:
            invalid lines are counted with their errors, never called), or an iterable of
            prompts or `LLMWorkItem`s.
        strategy: The strategy the batch would use.
        pricing: Prices; default: the list prices of the strategy's Gemini model.
        output_tokens_per_item: Output tokens to assume per item (thinking included).
            Default: the strategy's `max_output_tokens` (an upper bound), else
            `DEFAULT_OUTPUT_TOKENS` (500).
        sample_size: Above this many items, count a random sample of this many (at least 2).
        seed: Seed of the sample (the same seed and input give the same sample).
        concurrency: Counting calls in flight at once.
        retry: Retry policy of failed counting calls (default `RetryConfig()`).
        artifact_key: Key prefix of the artifact (lowercase letters, digits, dashes).
        artifacts: Create the artifact inside a flow run.

    Raises:
        ValueError: the strategy cannot count, or no pricing is known for it.
        RuntimeError: a counting call failed for good.
    """
    if sample_size < 2:
        raise ValueError(f"sample_size={sample_size}: sample at least 2 prompts.")
    prices = pricing or default_pricing(strategy)
    if prices is None:
        raise ValueError(
            f"No prices for {type(strategy).__name__}: pass preview_cost(pricing="
            "ModelPricing(input_per_million=..., output_per_million=...))."
        )
    path = str(getattr(strategy, "execution", "standard"))
    prices = prices.for_path(path)
    output, assumption = _output_assumption(strategy, output_tokens_per_item)
    sample = _sample(input, sample_size, seed)
    counts: list[TokenUsage] = []
    if sample.prompts:
        counts = await _count(strategy, sample.prompts, concurrency, retry or RetryConfig())
    preview = project_cost(
        counts,
        items=sample.items,
        output_tokens_per_item=output,
        pricing=prices,
        output_assumption=assumption,
        seed=seed,
        invalid_items=sample.invalid_items,
        invalid_errors=sample.invalid_errors,
    )
    preview = replace(preview, price_path=path)
    _log(preview.message())
    if artifacts and FlowRunContext.get() is not None:
        try:
            await acreate_markdown_artifact(
                markdown=preview.markdown(),
                key=f"{artifact_key}-cost-preview" if artifact_key else None,
                description=f"Cost preview: {usd(preview.cost_usd)} projected",
            )
        except Exception as exc:  # the preview itself is done; the UI is a convenience
            logger.warning("Could not create the cost preview artifact: %s", describe(exc))
    return preview


__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "DEFAULT_SAMPLE_SIZE",
    "CostPreview",
    "default_pricing",
    "preview_cost",
    "project_cost",
]
