"""One work item's attempts: execute one, account for it, apply the retry decision.

`ItemRun.attempt()` is the body of the item's Prefect task (or of one loop turn in a chunk
task). On failure it classifies the error, records tokens and counters, asks `decide()`
whether to retry and raises `ItemAttemptFailed`, which carries that decision to Prefect's
`retry_condition_fn`. The wait itself happens at the start of the next attempt, because
Prefect's retry delay is fixed per task and cannot honour a Retry-After. Only scrubbed text
of a provider error is kept: the exception itself (which may hold request headers) is not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from typing import Any

from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from prefect_batch_llm._engine.decision import Used, decide
from prefect_batch_llm._engine.lifecycle import StrategyPrepareError
from prefect_batch_llm._engine.runtime import BatchRuntime
from prefect_batch_llm.errors import (
    ErrorCategory,
    ErrorInfo,
    FrameworkTimeoutError,
    PermanentError,
    describe,
    info_for_category,
    token_usage_of,
)
from prefect_batch_llm.items import LLMWorkItem
from prefect_batch_llm.results import (
    TokenUsage,
    WorkItemResult,
    add_usage,
    validate_token_usage,
)
from prefect_batch_llm.strategy import (
    PRICE_PATH,
    ExecuteResult,
    LLMCallStrategy,
    RetryState,
    unpack_execute_result,
)

logger = logging.getLogger("prefect_batch_llm")

#: Retries that do not use up an attempt: repeated within the same Prefect task run.
_IN_PLACE_BUDGETS = frozenset({"rate_limit", "cache"})
#: Characters of a prompt shown in its task run's state and the report.
PROMPT_EXCERPT = 80


def prompt_excerpt(item: LLMWorkItem[Any, Any, Any], limit: int = PROMPT_EXCERPT) -> str:
    """The prompt on one line, cut to `limit` characters (`…` when cut)."""
    text = " ".join(str(item.prompt)[: limit * 4].split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The task run's logger (its lines reach the Prefect UI), else this package's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logger


class ItemAttemptFailed(Exception):
    """A failed attempt as Prefect sees it: scrubbed text and the retry decision.

    It is what the item's task run raises, so it is all Prefect logs, shows in the task
    run's state and could persist: never the provider's exception object.

    `in_place` retries (rate limits, a renewed cache) do not use up one of the item's
    `max_attempts`: the item task repeats them within the same Prefect run, so the retries
    Prefect counts and shows are exactly the attempts the retry policy allows.
    """

    def __init__(self, message: str, retry: bool = False, in_place: bool = False) -> None:
        super().__init__(message)
        self.retry = retry
        self.in_place = in_place

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.retry, self.in_place))


class ItemRun:
    """One work item's progress through its attempts (a plain object: Prefect does not walk it)."""

    def __init__(self, item: LLMWorkItem[Any, Any, Any], runtime: BatchRuntime) -> None:
        self.item = item
        self.runtime = runtime
        self.state = RetryState()
        self.used = Used()
        self.calls = 0
        self.usage = TokenUsage()
        self.retries_by_category: Counter[str] = Counter()
        self.not_before = 0.0
        self.started: float | None = None
        self.deadline: float | None = None
        self.success = False
        self.output: Any = None
        self.metadata: dict[str, Any] = {}
        self.error: str | None = None
        self.error_category: str | None = None
        self.task_run_id: str | None = None
        self.usage_by_path: dict[str, TokenUsage] = {}
        #: Outcomes of this item's requests in provider batch jobs, not yet taken as attempts.
        self._answered: deque[ExecuteResult | Exception] = deque()
        #: The attempts are over (decided outside the item's task, in batch jobs).
        self.settled = False
        self._last_failure: str | None = None
        self._path = "standard"
        #: Tokens the global limits charged the call in progress (settled in `_record`).
        self._global_charge: int | None = None

    @property
    def attempt_number(self) -> int:
        return self.used.attempt

    # -- one attempt -----------------------------------------------------------------------

    def answered(self, outcome: ExecuteResult | Exception) -> None:
        """A provider batch job answered this item: its next attempt takes this outcome
        instead of calling (priced on the batch path)."""
        if self.started is None:
            self.started = time.monotonic()  # no total deadline: the job took what it took
        self._answered.append(outcome)

    async def attempt(self) -> Any:
        """Make one attempt; return the output or raise `ItemAttemptFailed`."""
        config = self.runtime.config
        strategy = self.item.strategy
        now = time.monotonic()
        if self.task_run_id is None:
            context = TaskRunContext.get()
            if context is not None:
                self.task_run_id = str(context.task_run.id)
        if self.settled:  # decided in batch jobs: the task run only reports it
            if self.success:
                return self.output
            raise ItemAttemptFailed(self._last_failure or self.error or "failed")
        if self.started is None:
            self.started = now
            if config.total_timeout_per_item is not None:
                self.deadline = now + config.total_timeout_per_item
        self._path = "standard"
        try:
            if self._answered:
                self._path = "batch"
                self.calls += 1
                self.runtime.stats.calls += 1
                raw = self._answered.popleft()
                if isinstance(raw, Exception):
                    raise raw
            elif config.dry_run:
                if self.not_before > now:
                    await asyncio.sleep(self.not_before - now)
                self.calls += 1
                raw = await strategy.dry_run(self.item.prompt)
            else:
                if self.not_before > now:
                    await asyncio.sleep(self.not_before - now)
                self.state.delete(PRICE_PATH)
                try:
                    raw = await self._within_deadline(self._execute(strategy))
                finally:
                    self._path = str(self.state.get(PRICE_PATH, "standard"))
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
            raise await self._after_failure(exc) from None
        self._record(usage)
        self.success, self.output, self.metadata = True, output, metadata
        if self._path != "standard":
            self.metadata = {**metadata, "price_path": self._path}
        return output

    def _record(self, usage: TokenUsage) -> None:
        """Tokens of one call, on the price path it was made on."""
        add_usage(self.usage, usage)
        limits, charged = self.runtime.global_limits, self._global_charge
        if limits is not None and charged is not None:
            self._global_charge = None
            limits.settle(charged, usage)
        if usage:
            add_usage(self.usage_by_path.setdefault(self._path, TokenUsage()), usage)
        self.runtime.stats.record_usage(usage, self._path)

    async def _within_deadline(self, call: Any) -> Any:
        """Everything an attempt waits for (prepare, cooldown, pacing, the call) ends at the
        item's deadline."""
        if self.deadline is None:
            return await call
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            call.close()
            raise self._total_timeout()
        try:
            async with asyncio.timeout(remaining):
                return await call
        except TimeoutError as exc:
            if isinstance(exc, FrameworkTimeoutError) or time.monotonic() < self.deadline:
                raise
            raise self._total_timeout() from None

    async def _execute(self, strategy: LLMCallStrategy[Any]) -> Any:
        runtime = self.runtime
        await runtime.lifecycle.ensure_prepared(strategy)
        limiter = runtime.limiter_for(strategy)
        if runtime.global_limits is not None:  # the quota shared with other processes (first:
            # a 429 here pauses at once the calls that were waiting for their global slots)
            self._global_charge = await runtime.global_limits.acquire(self.item.prompt)
        passed_gate_at = await limiter.acquire()
        limit = runtime.config.timeout_per_item
        if self.deadline is not None:
            limit = min(limit, max(0.0, self.deadline - time.monotonic()))
        self.calls += 1
        runtime.stats.calls += 1
        started = time.monotonic()
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                if runtime.passes_state(strategy):
                    raw = await strategy.execute(
                        self.item.prompt, self.attempt_number, limit, self.state
                    )
                else:
                    raw = await strategy.execute(self.item.prompt, self.attempt_number, limit)
            limiter.call_succeeded(passed_gate_at)
            return raw
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
        finally:
            # Every call's latency, failed and cut-short ones included (waits are not).
            runtime.stats.latency.record(time.monotonic() - started)

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

    # -- after a failed attempt ------------------------------------------------------------

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

    async def _after_failure(self, exc: Exception) -> ItemAttemptFailed:
        runtime, config = self.runtime, self.runtime.config
        self._record(token_usage_of(exc))
        info = self._classify(exc)
        category = str(info.error_category)
        runtime.stats.error_counts[category] += 1
        if info.is_rate_limit:
            runtime.stats.rate_limit_count += 1
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
        now = time.monotonic()
        decision = decide(info, self.used, config.retry, now=now, deadline=self.deadline)
        if decision.cooldown > 0:
            runtime.limiter_for(strategy).start_cooldown(
                decision.cooldown, retry_after=info.suggested_wait
            )
            if runtime.global_limits is not None:  # pauses every process sharing the quota
                await runtime.global_limits.cooldown(decision.cooldown)
        error = describe(exc)
        if info.message:
            error = f"{error} ({info.message})"
        self.error, self.error_category = error, category
        if decision.retry:
            self.used = decision.used_after(self.used)
            self.not_before = now + decision.wait
            runtime.stats.retries += 1
            self.retries_by_category[category] += 1
            explanation = f"retry: {decision.reason}, waiting {decision.wait:.1f} s"
        else:
            explanation = f"final: {decision.reason}"
        # In the task run's logs (the Prefect UI): why the call failed, what happens next.
        _run_logger().warning(
            "Item %r, call %d: %s: %s; %s",
            self.item.item_id,
            self.calls,
            category,
            error,
            explanation,
        )
        self._last_failure = f"{category}: {error} [{explanation}]"
        return ItemAttemptFailed(
            self._last_failure,
            retry=decision.retry,
            in_place=decision.budget in _IN_PLACE_BUDGETS,
        )

    # -- what the task run shows -----------------------------------------------------------

    def facts(self) -> str:
        """Calls, tokens and the prompt's start, on one line (the task run's state message)."""
        usage = self.usage
        return (
            f"{self.calls} call(s) · tokens in {usage.get('input_tokens', 0):,} "
            f"(cached {usage.get('cached_input_tokens', 0):,}) / "
            f"out {usage.get('output_tokens', 0):,} · prompt: {prompt_excerpt(self.item)}"
        )

    # -- the item's one result -------------------------------------------------------------

    async def run_to_completion(self) -> WorkItemResult[Any, Any]:
        """All attempts in-process, under the same policy as the per-item tasks (chunks)."""
        while True:
            try:
                await self.attempt()
            except ItemAttemptFailed as failure:
                if not failure.retry:
                    return self.result()
            else:
                return self.result()

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
        """The item's one terminal result (call once its attempts are over)."""
        duration = time.monotonic() - self.started if self.started is not None else 0.0
        common: dict[str, Any] = {
            "item_id": self.item.item_id,
            "token_usage": self.usage,
            "attempts": self.calls,
            "context": self.item.context,
            "retries_by_category": dict(self.retries_by_category),
            "duration": duration,
            "usage_by_path": self.usage_by_path if set(self.usage_by_path) - {"standard"} else {},
        }
        if self.success:
            return WorkItemResult(
                success=True, output=self.output, metadata=self.metadata, **common
            )
        return WorkItemResult(
            success=False,
            error=self.error or "the item did not finish",
            error_category=self.error_category or str(ErrorCategory.TRANSIENT),
            **common,
        )

    def fail(self, error: str, category: str) -> WorkItemResult[Any, Any]:
        """A failed result for an item stopped from outside (batch timeout, crash, abort)."""
        result = self.result()
        result.success, result.output = False, None
        result.error, result.error_category = error, category
        return result
