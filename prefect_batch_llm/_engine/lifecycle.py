"""Prepare each strategy instance once per batch (retried under the retry policy); clean
each up once, at exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from prefect_batch_llm._engine.decision import Used, decide
from prefect_batch_llm.config import RetryConfig
from prefect_batch_llm.errors import (
    DefaultErrorClassifier,
    ErrorCategory,
    ErrorClassifier,
    LLMCallError,
    describe,
)
from prefect_batch_llm.strategy import LLMCallStrategy

logger = logging.getLogger("prefect_batch_llm")
_DEFAULT_CLASSIFIER = DefaultErrorClassifier()


class StrategyPrepareError(LLMCallError):
    """A strategy's `prepare()` failed for good; every item using that strategy fails with it."""

    category = ErrorCategory.PREPARE_FAILED


class StrategyLifecycle:
    """Tracks strategy instances by identity.

    `ensure_prepared()` starts one prepare loop per instance, as its own asyncio task, the
    first time the instance is seen; every worker awaits that same task (shielded, so one
    worker's cancellation or timeout does not cancel the others' prepare). A failed
    `prepare()` is classified and retried by the same `decide()` as calls (backoff,
    Retry-After, budgets): an unreachable provider at batch start is waited out once for all
    items, and only a permanent error (bad key, content too small) fails the items.
    `cleanup_all()` calls `cleanup()` once for every instance whose `prepare()` was started,
    in the order they were first used, logging failures and continuing with the rest.
    """

    def __init__(
        self,
        retry: RetryConfig | None = None,
        classifier: ErrorClassifier | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.retry = retry or RetryConfig()
        self.classifier = classifier
        self._clock = clock
        self._rng = rng
        self._prepares: dict[int, tuple[LLMCallStrategy[Any], asyncio.Task[None]]] = {}
        self._cleaned = False

    def configure(self, retry: RetryConfig, classifier: ErrorClassifier | None) -> None:
        """The batch's retry settings and classifier (set before the first item runs)."""
        self.retry, self.classifier = retry, classifier

    @property
    def strategies(self) -> list[LLMCallStrategy[Any]]:
        return [strategy for strategy, _ in self._prepares.values()]

    async def ensure_prepared(self, strategy: LLMCallStrategy[Any]) -> None:
        entry = self._prepares.get(id(strategy))
        if entry is None:
            name = type(strategy).__name__
            task = asyncio.create_task(self._prepare(strategy), name=f"prepare {name}")
            entry = self._prepares[id(strategy)] = (strategy, task)
        await asyncio.shield(entry[1])

    async def _prepare(self, strategy: LLMCallStrategy[Any]) -> None:
        classifier = self.classifier or strategy.error_classifier or _DEFAULT_CLASSIFIER
        used = Used()
        name = type(strategy).__name__
        while True:
            try:
                await strategy.prepare()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = describe(exc)
                try:
                    info = classifier.classify(exc)
                except Exception:
                    info = None
                decision = None
                if info is not None:
                    decision = decide(
                        info, used, self.retry, now=self._clock(), deadline=None, rng=self._rng
                    )
                if decision is None or not decision.retry:
                    why = decision.reason if decision is not None else "the classifier raised"
                    raise StrategyPrepareError(
                        f"{name}.prepare() failed: {error} ({why})"
                    ) from None
                logger.warning(
                    "%s.prepare() failed: %s; %s, waiting %.1f s",
                    name,
                    error,
                    decision.reason,
                    decision.wait,
                )
                used = decision.used_after(used)
                await asyncio.sleep(decision.wait)

    async def cancel_pending(self) -> None:
        """Cancel prepares still running (the batch ended or was cancelled)."""
        for _, task in self._prepares.values():
            if not task.done():
                task.cancel()
        for _, task in self._prepares.values():
            with contextlib.suppress(BaseException):  # outcome already reported to the items
                await task

    async def cleanup_all(self) -> list[tuple[LLMCallStrategy[Any], BaseException]]:
        """Run every cleanup once; returns the (strategy, error) pairs that failed."""
        if self._cleaned:
            return []
        self._cleaned = True
        await self.cancel_pending()
        failures: list[tuple[LLMCallStrategy[Any], BaseException]] = []
        for strategy, _ in self._prepares.values():
            try:
                await strategy.cleanup()
            except Exception as exc:
                logger.error(
                    "cleanup() of %s failed: %s; continuing with the other strategies",
                    type(strategy).__name__,
                    describe(exc),
                )
                failures.append((strategy, exc))
        return failures
