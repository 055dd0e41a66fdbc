"""What every item run of one batch shares: settings, lifecycle, rate limiters, counters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prefect_batch_llm._engine.global_limits import GlobalLimits
from prefect_batch_llm._engine.lifecycle import StrategyLifecycle
from prefect_batch_llm._engine.rate_limit import CooldownObserver, RateLimiter
from prefect_batch_llm.config import ProcessorConfig
from prefect_batch_llm.errors import DefaultErrorClassifier, ErrorClassifier
from prefect_batch_llm.results import (
    CallTotals,
    LatencyHistogram,
    ModelPricing,
    ResultTotals,
    TokenUsage,
    add_usage,
)
from prefect_batch_llm.strategy import LLMCallStrategy, accepts_state

_DEFAULT_CLASSIFIER = DefaultErrorClassifier()
#: Failed items of one batch that get a markdown artifact on their task run.
FAILED_ITEM_ARTIFACTS = 100


@dataclass
class BatchStats:
    """Live counters of one batch (what `get_stats()` and the metrics report).

    `results` counts final results; the token counters include attempts still running.
    Memory is constant in the number of items and calls: `latency` is a fixed histogram,
    `limiters` holds one rate limiter per scope.
    """

    total: int = 0
    results: ResultTotals = field(default_factory=ResultTotals)
    calls: int = 0
    retries: int = 0
    rate_limit_count: int = 0
    error_counts: Counter[str] = field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    started_at: float | None = None
    started_at_wall: float | None = None
    finished_at: float | None = None
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    limiters: list[RateLimiter] = field(default_factory=list)

    @property
    def cooldown_seconds(self) -> float:
        """Seconds the rate-limit scopes were paused so far, summed over scopes."""
        return sum(limiter.paused_seconds for limiter in list(self.limiters))

    def call_totals(self) -> CallTotals:
        """A snapshot of the call counters (what `BatchResult.call_totals` holds)."""
        return CallTotals(
            calls=self.calls,
            rate_limited_calls=self.rate_limit_count,
            cooldown_seconds=self.cooldown_seconds,
            latency=self.latency.copy(),
        )

    #: Tokens per price path (`standard`, `flex`, `batch`), attempts still running included.
    usage_by_path: dict[str, TokenUsage] = field(default_factory=dict)

    def record_usage(self, usage: TokenUsage, path: str = "standard") -> None:
        self.input_tokens += usage.get("input_tokens", 0)
        self.output_tokens += usage.get("output_tokens", 0)
        self.cached_input_tokens += usage.get("cached_input_tokens", 0)
        if usage:
            add_usage(self.usage_by_path.setdefault(path, TokenUsage()), usage)

    def cost(self, pricing: ModelPricing) -> float:
        """Dollars billed so far, each path's tokens at its prices."""
        return sum(pricing.cost_by_path(self.usage_by_path).values())


class BatchRuntime:
    """Settings, strategy lifecycle, rate limiters and counters of one batch."""

    def __init__(
        self,
        config: ProcessorConfig,
        lifecycle: StrategyLifecycle,
        classifier: ErrorClassifier | None,
        stats: BatchStats,
        *,
        on_cooldown: CooldownObserver | None = None,
    ) -> None:
        self.config = config
        self._on_cooldown = on_cooldown
        self.lifecycle = lifecycle
        self.classifier = classifier
        self.stats = stats
        lifecycle.configure(config.retry, classifier)
        self._limiters: dict[str, RateLimiter] = {}
        #: The quota shared with other processes (ProcessorConfig.global_*), if configured.
        self.global_limits = GlobalLimits.for_config(config)
        self._accepts_state: dict[type, bool] = {}
        self._fingerprints: dict[int, str] = {}
        self._failure_artifacts_left = FAILED_ITEM_ARTIFACTS

    def limiter_for(self, strategy: LLMCallStrategy[Any]) -> RateLimiter:
        scope = strategy.rate_limit_scope()
        limiter = self._limiters.get(scope)
        if limiter is None:
            limiter = self._limiters[scope] = RateLimiter(
                self.config.max_requests_per_minute,
                slow_start_calls=min(self.config.max_workers, 32),
                scope=scope,
                observer=self._on_cooldown,
            )
            self.stats.limiters.append(limiter)
        return limiter

    def close(self) -> None:
        """The batch is over: end every rate-limit storm still open."""
        for limiter in self._limiters.values():
            limiter.close()

    def classifier_for(self, strategy: LLMCallStrategy[Any]) -> ErrorClassifier:
        return self.classifier or strategy.error_classifier or _DEFAULT_CLASSIFIER

    def passes_state(self, strategy: LLMCallStrategy[Any]) -> bool:
        kind = type(strategy)
        if kind not in self._accepts_state:
            self._accepts_state[kind] = accepts_state(strategy)
        return self._accepts_state[kind]

    def take_failure_artifact(self) -> bool:
        """Whether one more failed item of this batch gets an artifact (a bounded number)."""
        if self._failure_artifacts_left <= 0:
            return False
        self._failure_artifacts_left -= 1
        return True

    def fingerprint_for(self, strategy: LLMCallStrategy[Any]) -> str:
        """The strategy's answer fingerprint, taken once per batch before its first item runs
        (so state the strategy changes while running never changes its items' keys)."""
        key = id(strategy)
        if key not in self._fingerprints:
            self._fingerprints[key] = strategy.cache_fingerprint()
        return self._fingerprints[key]
