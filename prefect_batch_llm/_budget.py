"""The budget cap (`ProcessorConfig.max_cost_usd`): whether the next item may start.

The decision is `budget_verdict()`, a pure function of the cap, the spend so far, the items
in flight and the projected cost of one item. `Budget` holds those figures for one batch:

- **spent**: every token billed so far, by every attempt (failed ones and attempts of items
  still running included), priced with the batch's `ModelPricing`;
- **projected cost of one item**: the mean cost of the items that finished after at least
  one call; before any has, `ProcessorConfig.expected_cost_per_item_usd` (e.g. a cost
  preview's `cost_per_item_usd`) if given, else none: items then start one at a time until
  the first finishes;
- **in flight**: items started and not finished.

An item starts when spent + (in flight + 1) x projected <= cap. Otherwise, while items are in
flight, the worker waits for one to finish (its real cost may leave room); with none in
flight, the batch stops and every item not started gets a `budget_exceeded` result.

Overshoot bound: at each start, spent + in flight x projected <= cap, and each item in flight
then costs at most the largest item's cost c_max, so the final spend is at most
cap + in flight x (c_max - projected) <= cap + in flight x c_max, where in flight is at most
`max_workers` (in large-batch mode, the items of the chunks in flight).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Literal

from prefect_batch_llm.config import ProcessorConfig
from prefect_batch_llm.results import ModelPricing, WorkItemResult

if TYPE_CHECKING:  # the engine imports this module
    from prefect_batch_llm._engine.runtime import BatchStats

BudgetVerdict = Literal["start", "wait", "stop"]


def budget_verdict(
    *, cap: float, spent: float, in_flight: int, per_item: float | None
) -> BudgetVerdict:
    """Start the next item, wait for one in flight to finish, or stop the batch.

    `per_item` is the projected cost of one item (None: nothing to project from yet, so one
    item at a time). An item starts only if the spend, the projection of the items in flight
    and its own projection all fit under `cap`.
    """
    if per_item is None:
        if in_flight:
            return "wait"
        return "start" if spent < cap else "stop"
    if spent + (in_flight + 1) * per_item <= cap:
        return "start"
    return "wait" if in_flight else "stop"


def usd(amount: float) -> str:
    """Dollars with enough digits for fractions of a cent."""
    if amount < 0.01:
        return f"${amount:.6f}"
    return f"${amount:.4f}" if amount < 1 else f"${amount:,.2f}"


class Budget:
    """The spend, the projection and the items in flight of one batch with a cost cap."""

    def __init__(
        self,
        cap: float,
        pricing: ModelPricing,
        stats: BatchStats,
        expected_per_item: float | None = None,
    ) -> None:
        self.cap = cap
        self.pricing = pricing
        self.stats = stats
        self.expected_per_item = expected_per_item
        self.in_flight = 0
        self.finished = 0
        self._finished_cost = 0.0
        self._changed: asyncio.Future[None] | None = None

    @classmethod
    def for_batch(
        cls, config: ProcessorConfig, pricing: ModelPricing | None, stats: BatchStats
    ) -> Budget | None:
        """The batch's budget, or None without a cap."""
        if config.max_cost_usd is None:
            return None
        if pricing is None:
            raise ValueError(missing_pricing_message(config.max_cost_usd))
        return cls(config.max_cost_usd, pricing, stats, config.expected_cost_per_item_usd)

    def spent(self) -> float:
        """Dollars billed so far, every attempt included."""
        return self.stats.cost(self.pricing)

    def per_item(self) -> float | None:
        """The projected cost of one item."""
        if self.finished:
            return self._finished_cost / self.finished
        return self.expected_per_item

    def verdict(self) -> BudgetVerdict:
        return budget_verdict(
            cap=self.cap, spent=self.spent(), in_flight=self.in_flight, per_item=self.per_item()
        )

    async def admit(self, *, may_wait: bool) -> bool | None:
        """True: one item may start (it is in flight until `done()` or `unused()`); False: the
        cap stops the batch; None: not now (only when `may_wait` is False)."""
        while True:
            verdict = self.verdict()
            if verdict == "start":
                self.in_flight += 1
                return True
            if verdict == "stop":
                return False
            if not may_wait:
                return None
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            # Shielded: one waiter cancelled (batch timeout) must not cancel the others' wait.
            await asyncio.shield(self._changed)

    def unused(self) -> None:
        """An admission that started no item (the source was empty, the item was rejected)."""
        self.in_flight -= 1
        self._notify()

    def done(self, result: WorkItemResult[Any, Any]) -> None:
        """A started item finished: it leaves the flight; if it made calls, its cost counts
        towards the projection (items an earlier run completed made none and cost nothing)."""
        self.in_flight -= 1
        if result.attempts > 0:
            self.finished += 1
            self._finished_cost += sum(self.pricing.cost_by_path(result.usage_per_path()).values())
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    def stop_message(self) -> str:
        """Why the items not started fail: the cap, the spend and the fix."""
        per_item = self.per_item()
        projection = (
            f"the next item is projected at {usd(per_item)} (the mean of {self.finished} "
            "finished items)"
            if per_item is not None and self.finished
            else "no item has finished to project from"
        )
        return (
            f"The budget cap stopped the batch before this item started: max_cost_usd is "
            f"{usd(self.cap)}, {usd(self.spent())} was spent and {projection}. Raise "
            "ProcessorConfig.max_cost_usd (or remove it) and run the batch again; with "
            "cache_results, items already completed are not called again."
        )


def missing_pricing_message(cap: float) -> str:
    return (
        f"ProcessorConfig.max_cost_usd={cap} needs prices to turn tokens into dollars, and "
        "the processor has none: pass ParallelBatchProcessor(pricing=ModelPricing(...)) "
        "(for Gemini, prefect_batch_llm.gemini.gemini_pricing(model)), or remove max_cost_usd."
    )
