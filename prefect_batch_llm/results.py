"""What a batch produces: per-item results, batch totals, token accounting and cost."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypedDict, TypeVar, cast

TOutput = TypeVar("TOutput")
TContext = TypeVar("TContext")


class TokenUsage(TypedDict, total=False):
    """Tokens of one call (or the sum over an item's attempts).

    `input_tokens` includes `cached_input_tokens` (the provider's convention); a missing key
    counts as 0. Strategies may add other integer counters (e.g. `thoughts_tokens`).
    """

    input_tokens: int
    output_tokens: int
    total_tokens: int
    cached_input_tokens: int
    thoughts_tokens: int


TOKEN_KEYS: tuple[str, ...] = tuple(TokenUsage.__annotations__)


def validate_token_usage(usage: Any, *, source: str) -> TokenUsage:
    """Check a strategy's usage mapping: known keys, non-negative integers.

    Raises:
        ValueError: naming the bad key and the fix.
    """
    if usage is None:
        return TokenUsage()
    if not isinstance(usage, dict):
        raise ValueError(
            f"{source} returned token usage of type {type(usage).__name__}; return a dict such "
            'as {"input_tokens": 10, "output_tokens": 5}.'
        )
    clean: dict[str, int] = {}
    for key, value in usage.items():
        if key not in TOKEN_KEYS:
            raise ValueError(
                f"{source} returned an unknown token usage key {key!r}; "
                f"use only {', '.join(TOKEN_KEYS)}."
            )
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{source} returned {key}={value!r}; token counts must be non-negative integers."
            )
        clean[key] = value
    return cast(TokenUsage, clean)


def add_usage(total: TokenUsage, extra: TokenUsage) -> None:
    """Add `extra` into `total` in place."""
    counts = cast(dict[str, int], total)
    for key, value in extra.items():
        counts[key] = counts.get(key, 0) + cast(int, value)


#: Price paths of a provider call: the standard online price, the Flex service tier and
#: provider Batch Mode (both billed at about half price by Gemini).
PRICE_PATHS: tuple[str, ...] = ("standard", "flex", "batch")


@dataclass(frozen=True)
class ModelPricing:
    """List prices in US dollars per million tokens, with the discounted paths' own prices.

    `cached_input_per_million` defaults to 10% of the input price (Gemini's cached rate).
    `flex` and `batch` are the prices of calls made on the Flex tier and in Batch Mode;
    without them, those calls are priced at this (standard) price.
    """

    input_per_million: float
    output_per_million: float
    cached_input_per_million: float | None = None
    flex: ModelPricing | None = None
    batch: ModelPricing | None = None

    def for_path(self, path: str) -> ModelPricing:
        """The prices of calls on `path` (`standard`, `flex` or `batch`)."""
        if path == "flex" and self.flex is not None:
            return self.flex
        if path == "batch" and self.batch is not None:
            return self.batch
        return self

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
        """Dollars for these tokens; `input_tokens` includes `cached_tokens`."""
        cached_price = (
            self.cached_input_per_million
            if self.cached_input_per_million is not None
            else self.input_per_million * 0.1
        )
        uncached = max(0, input_tokens - cached_tokens)
        return (
            uncached * self.input_per_million
            + cached_tokens * cached_price
            + output_tokens * self.output_per_million
        ) / 1_000_000

    def cost_of(self, usage: TokenUsage) -> float:
        """Dollars for a `TokenUsage` mapping billed at these prices."""
        return self.cost(
            usage.get("input_tokens", 0),
            usage.get("output_tokens", 0),
            usage.get("cached_input_tokens", 0),
        )

    def cost_by_path(self, usage_by_path: Mapping[str, TokenUsage]) -> dict[str, float]:
        """Dollars per price path, each path's tokens at that path's prices."""
        return {path: self.for_path(path).cost_of(usage) for path, usage in usage_by_path.items()}


@dataclass
class WorkItemResult(Generic[TOutput, TContext]):
    """The one terminal result of one work item.

    Attributes:
        item_id: The item's id.
        success: Whether an attempt succeeded.
        output: The strategy's output (None on failure).
        error: `Type: message` of the last error, on failure.
        error_category: The classifier's category of the last error, on failure.
        token_usage: Tokens summed over every attempt, failed ones included.
        metadata: What the successful attempt's strategy returned as metadata.
        attempts: How many times the strategy was called for this item.
        context: The work item's context, passed through.
        retries_by_category: How many retries each error category caused.
        duration: Seconds from the item's first attempt to its result.
        usage_by_path: `token_usage` split by the price path of each call (`standard`,
            `flex`, `batch`); empty means every call was on the standard path.
    """

    item_id: str
    success: bool
    output: TOutput | None = None
    error: str | None = None
    error_category: str | None = None
    token_usage: TokenUsage = field(default_factory=lambda: TokenUsage())
    metadata: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    context: TContext | None = None
    retries_by_category: dict[str, int] = field(default_factory=dict)
    duration: float = 0.0
    usage_by_path: dict[str, TokenUsage] = field(default_factory=dict)

    def usage_per_path(self) -> dict[str, TokenUsage]:
        """Tokens per price path (all `standard` when the calls were not split by path)."""
        if self.usage_by_path:
            return self.usage_by_path
        return {"standard": self.token_usage} if self.token_usage else {}


class LatencyHistogram:
    """Call latencies in fixed logarithmic buckets: constant memory, percentiles within 4.5%.

    The buckets are those of Prometheus native histograms, schema 3: bucket `i` holds the
    latencies in `(2**((i-1)/8), 2**(i/8)]` seconds, eight per doubling, from 2**-14 s
    (61 µs; smaller values share one bucket) to 2**13 s (2.3 hours; larger values share one
    bucket). That is `BUCKETS` (218) integers however many calls are recorded: a million
    calls take the same memory as one. The exact minimum, maximum, count and sum are kept too.

    A percentile is taken by nearest rank (`percentile(0.95)` is the value of rank
    `ceil(0.95 * count)` in sorted order) and estimated as the geometric middle of its bucket,
    clamped to the observed minimum and maximum: within 2**(1/16) - 1 = 4.4% of the exact
    value for latencies between 61 µs and 2.3 hours, exact for the lowest and highest rank.
    """

    PER_DOUBLING = 8
    LOWEST = -14 * PER_DOUBLING  # bucket index of 2**-14 s
    HIGHEST = 13 * PER_DOUBLING  # bucket index of 2**13 s
    BUCKETS = HIGHEST - LOWEST + 2  # the range, plus one bucket above it

    __slots__ = ("_counts", "count", "maximum", "minimum", "sum")

    def __init__(self) -> None:
        self._counts = [0] * self.BUCKETS
        self.count = 0
        self.sum = 0.0
        self.minimum = math.inf
        self.maximum = 0.0

    @classmethod
    def upper_bound(cls, position: int) -> float:
        """The upper bound, in seconds, of the bucket at `position` (inf for the last)."""
        if position >= cls.BUCKETS - 1:
            return math.inf
        return float(2.0 ** ((position + cls.LOWEST) / cls.PER_DOUBLING))

    @classmethod
    def position(cls, seconds: float) -> int:
        """The bucket that holds `seconds`."""
        if seconds <= 0:
            return 0
        index = math.ceil(math.log2(seconds) * cls.PER_DOUBLING)
        return min(max(index, cls.LOWEST), cls.HIGHEST + 1) - cls.LOWEST

    def record(self, seconds: float) -> None:
        """Add one latency (negative values count as 0)."""
        seconds = max(0.0, seconds)
        self._counts[self.position(seconds)] += 1
        self.count += 1
        self.sum += seconds
        self.minimum = min(self.minimum, seconds)
        self.maximum = max(self.maximum, seconds)

    def copy(self) -> LatencyHistogram:
        twin = LatencyHistogram()
        twin._counts = list(self._counts)
        # The count of the copied buckets: consistent with them even if a call is recorded
        # (in another thread) while this copy is taken.
        twin.count, twin.sum = sum(twin._counts), self.sum
        twin.minimum, twin.maximum = self.minimum, self.maximum
        return twin

    def cumulative(self, bounds: list[float]) -> list[int]:
        """How many latencies are at most each of `bounds` (each a bucket's upper bound,
        e.g. a power of two between 2**-14 and 2**13, so the counts are exact)."""
        counts = list(self._counts)
        totals, running, position = [], 0, 0
        for bound in bounds:
            while position < len(counts) and self.upper_bound(position) <= bound:
                running += counts[position]
                position += 1
            totals.append(running)
        return totals

    def percentile(self, fraction: float) -> float | None:
        """The latency below which `fraction` (0 < fraction <= 1) of the calls fall, by
        nearest rank; None when nothing was recorded."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
        counts, total = list(self._counts), self.count
        if total == 0:
            return None
        rank = max(1, math.ceil(round(fraction * total, 9)))  # 0.07 * 100 is 7.000000000000001
        if rank == 1:
            return self.minimum
        if rank == total:
            return self.maximum
        position, seen = 0, counts[0]
        while seen < rank:
            position += 1
            seen += counts[position]
        if position == 0:
            estimate = self.upper_bound(0) / 2
        elif position == len(counts) - 1:
            estimate = self.maximum
        else:
            estimate = (self.upper_bound(position - 1) * self.upper_bound(position)) ** 0.5
        return min(max(estimate, self.minimum), self.maximum)


@dataclass
class CallTotals:
    """The provider calls of a batch, whatever became of their items.

    Attributes:
        calls: Provider calls made (every attempt that reached `execute()`).
        rate_limited_calls: Attempts the classifier judged rate limited (429s).
        cooldown_seconds: Seconds the rate-limit scopes were paused, summed over scopes.
        latency: Latency of every call, successful or failed (waits not included).
    """

    calls: int = 0
    rate_limited_calls: int = 0
    cooldown_seconds: float = 0.0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)


@dataclass
class ResultTotals:
    """Running totals of a stream of results (what a `BatchResult` reports)."""

    total_items: int = 0
    succeeded: int = 0
    failed: int = 0
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    total_cached_tokens: int = 0
    errors_by_category: Counter[str] = field(default_factory=Counter)
    retries_by_category: Counter[str] = field(default_factory=Counter)
    #: Items that made at least one call, their calls in all, and the most calls of one.
    attempted_items: int = 0
    total_attempts: int = 0
    max_attempts: int = 0
    #: Tokens per price path (`standard`, `flex`, `batch`).
    usage_by_path: dict[str, TokenUsage] = field(default_factory=dict)

    def add(self, result: WorkItemResult[Any, Any]) -> None:
        self.total_items += 1
        if result.attempts > 0:
            self.attempted_items += 1
            self.total_attempts += result.attempts
            self.max_attempts = max(self.max_attempts, result.attempts)
        if result.success:
            self.succeeded += 1
        else:
            self.failed += 1
            self.errors_by_category[result.error_category or "unknown"] += 1
        self.total_input_tokens += result.token_usage.get("input_tokens", 0)
        self.total_output_tokens += result.token_usage.get("output_tokens", 0)
        self.total_cached_tokens += result.token_usage.get("cached_input_tokens", 0)
        self.retries_by_category.update(result.retries_by_category)
        for path, usage in result.usage_per_path().items():
            add_usage(self.usage_by_path.setdefault(path, TokenUsage()), usage)


@dataclass(frozen=True)
class BatchOutcome:
    """The verdict on a batch under its failure policy.

    Attributes:
        failed: More items failed than allowed, or every item failed.
        message: One line, e.g. `37 of 200 items failed (18.5% > 5% allowed): 30 rate_limit,
            7 permanent`.
    """

    failed: bool
    message: str


def judge(totals: ResultTotals, max_failed_fraction: float) -> BatchOutcome:
    """Whether a batch with these totals failed, allowing `max_failed_fraction` of failures.

    A batch in which every item failed is failed whatever the allowance; an empty batch is not.
    """
    total, failed = totals.total_items, totals.failed
    if total == 0:
        return BatchOutcome(False, "0 items")
    fraction = failed / total
    breakdown = ", ".join(
        f"{count} {category}" for category, count in totals.errors_by_category.most_common()
    )
    head = f"{failed} of {total} items failed"
    if failed and failed == total:
        return BatchOutcome(True, f"{head} (every item failed): {breakdown}")
    if fraction > max_failed_fraction:
        return BatchOutcome(
            True,
            f"{head} ({fraction:.1%} > {max_failed_fraction:.0%} allowed): {breakdown}",
        )
    if failed:
        return BatchOutcome(
            False, f"{head} ({fraction:.1%} <= {max_failed_fraction:.0%} allowed): {breakdown}"
        )
    return BatchOutcome(False, f"{total} of {total} items succeeded")


class BatchFailedError(RuntimeError):
    """More items failed than the batch's failure policy allows; `result` has them all."""

    def __init__(self, message: str, result: BatchResult[Any, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class BatchResult(Generic[TOutput, TContext]):
    """The results of a batch and their totals.

    Built from a list of results, the totals are computed from it. A processor run with
    `keep_results=False` gives the totals alone (`results` is then empty).
    """

    results: list[WorkItemResult[TOutput, TContext]]
    total_items: int = 0
    succeeded: int = 0
    failed: int = 0
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    total_cached_tokens: int = 0
    duration: float = 0.0
    totals: ResultTotals | None = field(default=None, repr=False)
    max_failed_fraction: float = 1.0
    call_totals: CallTotals = field(default_factory=CallTotals, repr=False)

    def __post_init__(self) -> None:
        if self.totals is None:
            self.totals = ResultTotals()
            for result in self.results:
                self.totals.add(result)
        totals = self.totals
        self.total_items = totals.total_items
        self.succeeded = totals.succeeded
        self.failed = totals.failed
        self.total_input_tokens = totals.total_input_tokens
        self.total_output_tokens = totals.total_output_tokens
        self.total_cached_tokens = totals.total_cached_tokens

    @property
    def outcome(self) -> BatchOutcome:
        """The verdict under `max_failed_fraction` (the processor sets it from its config)."""
        assert self.totals is not None
        return judge(self.totals, self.max_failed_fraction)

    def raise_for_outcome(self) -> None:
        """Raise `BatchFailedError` if more items failed than allowed (or every item did)."""
        outcome = self.outcome
        if outcome.failed:
            raise BatchFailedError(outcome.message, self)

    def cache_hit_rate(self) -> float:
        """Cached input tokens as a percentage of all input tokens (0.0 when there are none)."""
        if self.total_input_tokens == 0:
            return 0.0
        return self.total_cached_tokens / self.total_input_tokens * 100.0

    def effective_input_tokens(self, cached_token_rate: float = 0.1) -> int:
        """Input tokens weighted by price: a cached token costs `cached_token_rate` of one.

        The default 0.1 is Gemini's cached-token discount.
        """
        if not 0.0 <= cached_token_rate <= 1.0:
            raise ValueError(f"cached_token_rate must be in [0, 1], got {cached_token_rate}.")
        discount = round(self.total_cached_tokens * (1.0 - cached_token_rate))
        return self.total_input_tokens - discount

    def estimated_cost(self, pricing: ModelPricing) -> float:
        """Dollars for every token billed in this batch, failed attempts included, each
        call's tokens at the prices of its path (standard, flex or batch)."""
        return sum(self.cost_by_path(pricing).values())

    def usage_by_path(self) -> dict[str, TokenUsage]:
        """Tokens per price path (`standard`, `flex`, `batch`)."""
        if self.totals is not None and self.totals.usage_by_path:
            return self.totals.usage_by_path
        usage = TokenUsage(
            input_tokens=self.total_input_tokens,
            output_tokens=self.total_output_tokens,
            cached_input_tokens=self.total_cached_tokens,
        )
        return {"standard": usage} if any(usage.values()) else {}

    def cost_by_path(self, pricing: ModelPricing) -> dict[str, float]:
        """Dollars per price path."""
        return pricing.cost_by_path(self.usage_by_path())

    def errors_by_category(self) -> dict[str, int]:
        """How many items failed with each category."""
        return dict(self.totals.errors_by_category) if self.totals else {}

    def retries_by_category(self) -> dict[str, int]:
        """How many retries each category caused, over all items."""
        return dict(self.totals.retries_by_category) if self.totals else {}

    def attempts_mean(self) -> float | None:
        """Calls per item, over the items that made at least one (None if none did)."""
        totals = self.totals
        if totals is None or totals.attempted_items == 0:
            return None
        return totals.total_attempts / totals.attempted_items

    def latency_percentile(self, fraction: float) -> float | None:
        """Call latency at `fraction` (e.g. 0.95), in seconds; None when no call was made.
        See `LatencyHistogram` for the precision."""
        return self.call_totals.latency.percentile(fraction)

    def summary(self, pricing: ModelPricing | None = None) -> dict[str, Any]:
        """A JSON-ready digest of the batch.

        Besides counts, tokens and the outcome: `latency_p50_seconds`, `latency_p95_seconds`,
        `latency_p99_seconds` (of every call, failed ones included; None when no call was
        made), `attempts_mean` (None when no item made a call) and `attempts_max` (over the
        items that made calls), `calls`, `rate_limited_calls` and `cooldown_seconds`.
        """
        calls = self.call_totals
        attempts_mean = self.attempts_mean()
        digest: dict[str, Any] = {
            "total_items": self.total_items,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "success_rate": (self.succeeded / self.total_items * 100.0)
            if self.total_items
            else 0.0,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "total_cached_tokens": self.total_cached_tokens,
            "cache_hit_rate": round(self.cache_hit_rate(), 2),
            "effective_input_tokens": self.effective_input_tokens(),
            "errors_by_category": self.errors_by_category(),
            "retries_by_category": self.retries_by_category(),
            "duration_seconds": round(self.duration, 3),
            "outcome": "failed" if self.outcome.failed else "completed",
            "outcome_message": self.outcome.message,
            "latency_p50_seconds": _rounded(self.latency_percentile(0.5)),
            "latency_p95_seconds": _rounded(self.latency_percentile(0.95)),
            "latency_p99_seconds": _rounded(self.latency_percentile(0.99)),
            "attempts_mean": None if attempts_mean is None else round(attempts_mean, 3),
            "attempts_max": self.totals.max_attempts if self.totals else 0,
            "calls": calls.calls,
            "rate_limited_calls": calls.rate_limited_calls,
            "cooldown_seconds": round(calls.cooldown_seconds, 3),
        }
        paths = self.usage_by_path()
        digest["price_paths"] = sorted(paths)
        if pricing is not None:
            digest["estimated_cost_usd"] = round(self.estimated_cost(pricing), 6)
            if set(paths) - {"standard"}:
                digest["cost_by_path_usd"] = {
                    path: round(cost, 6) for path, cost in self.cost_by_path(pricing).items()
                }
        return digest


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)
