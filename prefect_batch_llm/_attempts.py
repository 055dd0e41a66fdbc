"""The retry policy: one attempt of one item, and the decision taken after it fails.

`ItemRun.attempt()` is the body of an item's Prefect task. On failure it classifies the
error, records tokens and counters, sets `retry` (read by the task's `retry_condition_fn`)
and the earliest start of the next attempt, then re-raises, so Prefect shows every retry
as a state of the item's task run. The wait itself happens at the start of the next attempt,
because Prefect's retry delay is fixed per task and cannot honour a Retry-After.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect_batch_llm._lifecycle import StrategyLifecycle, StrategyPrepareError
from prefect_batch_llm._rate_limit import RateLimiter
from prefect_batch_llm.config import ProcessorConfig
from prefect_batch_llm.errors import (
    DefaultErrorClassifier,
    ErrorCategory,
    ErrorClassifier,
    ErrorInfo,
    FrameworkTimeoutError,
    PermanentError,
    describe,
    info_for_category,
    token_usage_of,
)
from prefect_batch_llm.items import LLMWorkItem
from prefect_batch_llm.results import (
    ResultTotals,
    TokenUsage,
    WorkItemResult,
    add_usage,
    validate_token_usage,
)
from prefect_batch_llm.strategy import (
    LLMCallStrategy,
    RetryState,
    accepts_state,
    unpack_execute_result,
)

logger = logging.getLogger("prefect_batch_llm")

#: Cache-expired retries per item: the strategy renews the cache, the attempt is repeated.
CACHE_EXPIRED_RETRIES = 2
_DEFAULT_CLASSIFIER = DefaultErrorClassifier()


@dataclass
class BatchStats:
    """Live counters of one batch (what `get_stats()` reports).

    `results` counts final results; the token counters include attempts still running.
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
    finished_at: float | None = None

    def record_usage(self, usage: TokenUsage) -> None:
        self.input_tokens += usage.get("input_tokens", 0)
        self.output_tokens += usage.get("output_tokens", 0)
        self.cached_input_tokens += usage.get("cached_input_tokens", 0)


class BatchRuntime:
    """What every item run of one batch shares: settings, lifecycle, rate limiters, counters."""

    def __init__(
        self,
        config: ProcessorConfig,
        lifecycle: StrategyLifecycle,
        classifier: ErrorClassifier | None,
        stats: BatchStats,
    ) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.classifier = classifier
        self.stats = stats
        self._limiters: dict[str, RateLimiter] = {}
        self._accepts_state: dict[type, bool] = {}
        self._fingerprints: dict[int, str] = {}
        #: Item runs by the id of the Prefect task run executing them (for retry decisions).
        self.runs_by_task_run: dict[UUID, ItemRun] = {}

    def limiter_for(self, strategy: LLMCallStrategy[Any]) -> RateLimiter:
        scope = strategy.rate_limit_scope()
        limiter = self._limiters.get(scope)
        if limiter is None:
            limiter = self._limiters[scope] = RateLimiter(
                self.config.max_requests_per_minute,
                slow_start_calls=min(self.config.max_workers, 32),
            )
        return limiter

    def classifier_for(self, strategy: LLMCallStrategy[Any]) -> ErrorClassifier:
        return self.classifier or strategy.error_classifier or _DEFAULT_CLASSIFIER

    def passes_state(self, strategy: LLMCallStrategy[Any]) -> bool:
        kind = type(strategy)
        if kind not in self._accepts_state:
            self._accepts_state[kind] = accepts_state(strategy)
        return self._accepts_state[kind]

    def fingerprint_for(self, strategy: LLMCallStrategy[Any]) -> str:
        """The strategy's cache fingerprint, taken once per batch before its first item runs
        (so state the strategy changes while running never changes its items' keys)."""
        key = id(strategy)
        if key not in self._fingerprints:
            self._fingerprints[key] = strategy.cache_fingerprint()
        return self._fingerprints[key]

    @property
    def prefect_retries(self) -> int:
        """Upper bound of retries a task may need; the condition function decides each one."""
        retry = self.config.retry
        return retry.max_attempts - 1 + retry.max_rate_limit_retries + CACHE_EXPIRED_RETRIES


class ItemRun:
    """One work item's progress through its attempts (a plain object: Prefect does not walk it)."""

    def __init__(self, item: LLMWorkItem[Any, Any, Any], runtime: BatchRuntime) -> None:
        self.item = item
        self.runtime = runtime
        self.state = RetryState()
        self.task_run_id: UUID | None = None
        self.attempt_number = 1
        self.calls = 0
        self.usage = TokenUsage()
        self.rate_limit_retries = 0
        self.cache_expired_retries = 0
        self.retries_by_category: Counter[str] = Counter()
        self.not_before = 0.0
        self.started: float | None = None
        self.deadline: float | None = None
        self.retry = False
        self.success = False
        self.output: Any = None
        self.metadata: dict[str, Any] = {}
        self.last_error: BaseException | None = None
        self.last_info: ErrorInfo | None = None

    async def attempt(self) -> Any:
        """Make one attempt; return the output or raise with `self.retry` decided."""
        config = self.runtime.config
        strategy = self.item.strategy
        now = time.monotonic()
        if self.started is None:
            self.started = now
            if config.total_timeout_per_item is not None:
                self.deadline = now + config.total_timeout_per_item
        self.retry = False
        if self.not_before > now:
            await asyncio.sleep(self.not_before - now)
        try:
            if config.dry_run:
                self.calls += 1
                raw = await strategy.dry_run(self.item.prompt)
            else:
                raw = await self._execute(strategy)
            output, usage, metadata = unpack_execute_result(
                raw, source=f"{type(strategy).__name__}.execute()"
            )
            try:
                usage = validate_token_usage(usage, source=f"{type(strategy).__name__}.execute()")
            except ValueError as exc:
                raise PermanentError(str(exc)) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._after_failure(exc)
            raise
        add_usage(self.usage, usage)
        self.runtime.stats.record_usage(usage)
        self.success, self.output, self.metadata = True, output, metadata
        return output

    async def _execute(self, strategy: LLMCallStrategy[Any]) -> Any:
        runtime = self.runtime
        await runtime.lifecycle.ensure_prepared(strategy)
        await runtime.limiter_for(strategy).acquire()
        limit = runtime.config.timeout_per_item
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise self._total_timeout()
            limit = min(limit, remaining)
        self.calls += 1
        runtime.stats.calls += 1
        started = time.monotonic()
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                if runtime.passes_state(strategy):
                    return await strategy.execute(
                        self.item.prompt, self.attempt_number, limit, self.state
                    )
                return await strategy.execute(self.item.prompt, self.attempt_number, limit)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            elapsed = time.monotonic() - started
            raise FrameworkTimeoutError(
                f"Item {self.item.item_id!r}: attempt {self.attempt_number} timed out after "
                f"{elapsed:.1f}s (limit {limit:.1f}s). Raise ProcessorConfig.timeout_per_item "
                "if calls legitimately take longer.",
                item_id=self.item.item_id,
                elapsed=elapsed,
                timeout_limit=limit,
            ) from exc

    def _total_timeout(self) -> FrameworkTimeoutError:
        total = self.runtime.config.total_timeout_per_item or 0.0
        elapsed = time.monotonic() - (self.started or time.monotonic())
        return FrameworkTimeoutError(
            f"Item {self.item.item_id!r} used its whole total_timeout_per_item ({total:.1f}s) "
            f"over {self.calls} call(s).",
            item_id=self.item.item_id,
            elapsed=elapsed,
            timeout_limit=total,
        )

    def _classify(self, exc: BaseException) -> ErrorInfo:
        if isinstance(exc, StrategyPrepareError):
            return info_for_category(ErrorCategory.PREPARE_FAILED)
        classifier = self.runtime.classifier_for(self.item.strategy)
        try:
            return classifier.classify(exc)
        except Exception as classify_error:
            logger.error(
                "%s.classify() raised %s; treating the error as transient",
                type(classifier).__name__,
                describe(classify_error),
            )
            return info_for_category(ErrorCategory.TRANSIENT)

    async def _after_failure(self, exc: Exception) -> None:
        runtime, config = self.runtime, self.runtime.config
        usage = token_usage_of(exc)
        add_usage(self.usage, usage)
        runtime.stats.record_usage(usage)
        info = self._classify(exc)
        category = str(info.error_category)
        self.last_error, self.last_info = exc, info
        runtime.stats.error_counts[category] += 1
        strategy = self.item.strategy
        if not isinstance(exc, StrategyPrepareError) and not config.dry_run:
            try:
                await strategy.on_error(exc, self.attempt_number, self.state)
            except Exception as hook_error:
                logger.error(
                    "%s.on_error() raised %s; the retry decision is unchanged",
                    type(strategy).__name__,
                    describe(hook_error),
                )

        wait = 0.0
        if info.is_rate_limit:
            runtime.stats.rate_limit_count += 1
            if self.rate_limit_retries < config.retry.max_rate_limit_retries:
                self.rate_limit_retries += 1
                wait = max(
                    info.suggested_wait or 0.0, config.retry.backoff(self.rate_limit_retries)
                )
                runtime.limiter_for(strategy).start_cooldown(wait)
                self.retry = True
        elif category == ErrorCategory.CACHE_EXPIRED and info.is_retryable:
            if self.cache_expired_retries < CACHE_EXPIRED_RETRIES:
                self.cache_expired_retries += 1
                self.retry = True
        elif info.is_retryable and self.attempt_number < config.retry.max_attempts:
            if category != ErrorCategory.VALIDATION:
                wait = config.retry.backoff(self.attempt_number)
            wait = max(wait, info.suggested_wait or 0.0)
            self.attempt_number += 1
            self.retry = True

        now = time.monotonic()
        if self.retry and self.deadline is not None and now + wait >= self.deadline:
            self.retry = False
        if self.retry:
            self.not_before = now + wait
            runtime.stats.retries += 1
            self.retries_by_category[category] += 1

    async def run_to_completion(self) -> WorkItemResult[Any, Any]:
        """All attempts in-process, under the same policy as the per-item tasks (large batches)."""
        while True:
            try:
                await self.attempt()
            except asyncio.CancelledError:
                raise
            except Exception:
                if not self.retry:
                    return self.result()
            else:
                return self.result()

    def cache_key(self) -> str:
        """Result-cache key: item id, prompt, context and strategy configuration (no secrets)."""
        item = self.item
        payload = json.dumps(
            [item.item_id, item.prompt, item.context, self.runtime.fingerprint_for(item.strategy)],
            default=repr,
            sort_keys=True,
        )
        return f"llm-item-{hashlib.sha256(payload.encode()).hexdigest()}"

    def cached(self, output: Any) -> WorkItemResult[Any, Any]:
        """The result of an item an earlier run completed (nothing billed in this run)."""
        return WorkItemResult(
            item_id=self.item.item_id,
            success=True,
            output=output,
            metadata={"cached_result": True},
            context=self.item.context,
        )

    def result(self) -> WorkItemResult[Any, Any]:
        """The item's one terminal result (call once its task has finished)."""
        duration = time.monotonic() - self.started if self.started is not None else 0.0
        common: dict[str, Any] = {
            "item_id": self.item.item_id,
            "token_usage": self.usage,
            "attempts": self.calls,
            "context": self.item.context,
            "retries_by_category": dict(self.retries_by_category),
            "duration": duration,
        }
        if self.success:
            return WorkItemResult(
                success=True, output=self.output, metadata=self.metadata, **common
            )
        error, category = "the item did not finish", str(ErrorCategory.TRANSIENT)
        if self.last_error is not None and self.last_info is not None:
            error = describe(self.last_error)
            if self.last_info.message:
                error = f"{error} ({self.last_info.message})"
            category = str(self.last_info.error_category)
        return WorkItemResult(success=False, error=error, error_category=category, **common)

    def fail(self, error: str, category: str) -> WorkItemResult[Any, Any]:
        """A failed result for an item stopped from outside (batch timeout, crash)."""
        result = self.result()
        result.success, result.output = False, None
        result.error, result.error_category = error, category
        return result
