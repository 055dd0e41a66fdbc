"""Prepare each strategy instance once per batch; clean each up once, at exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from prefect_batch_llm.errors import ErrorCategory, LLMCallError
from prefect_batch_llm.strategy import LLMCallStrategy

logger = logging.getLogger("prefect_batch_llm")


class StrategyPrepareError(LLMCallError):
    """A strategy's `prepare()` raised; every item using that strategy fails with this."""

    category = ErrorCategory.PREPARE_FAILED


class StrategyLifecycle:
    """Tracks strategy instances by identity.

    `ensure_prepared()` starts `prepare()` as its own asyncio task the first time an instance
    is seen; every worker awaits that same task (shielded, so one worker's cancellation does
    not cancel the others' prepare). `cleanup_all()` calls `cleanup()` once for every instance
    whose `prepare()` was started, in the order they were first used, logging failures and
    continuing with the rest.
    """

    def __init__(self) -> None:
        self._prepares: dict[int, tuple[LLMCallStrategy[Any], asyncio.Task[None]]] = {}
        self._cleaned = False

    @property
    def strategies(self) -> list[LLMCallStrategy[Any]]:
        return [strategy for strategy, _ in self._prepares.values()]

    async def ensure_prepared(self, strategy: LLMCallStrategy[Any]) -> None:
        entry = self._prepares.get(id(strategy))
        if entry is None:
            name = type(strategy).__name__
            task = asyncio.create_task(strategy.prepare(), name=f"prepare {name}")
            entry = self._prepares[id(strategy)] = (strategy, task)
        try:
            await asyncio.shield(entry[1])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise StrategyPrepareError(
                f"{type(strategy).__name__}.prepare() failed: {type(exc).__name__}: {exc}"
            ) from exc

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
                    "cleanup() of %s failed: %s: %s; continuing with the other strategies",
                    type(strategy).__name__,
                    type(exc).__name__,
                    exc,
                )
                failures.append((strategy, exc))
        return failures
