"""Coordinated cooldown and request pacing, shared by every worker of one scope.

One rate limit (429) starts a cooldown: every worker of the scope waits until it ends, then
calls resume one by one (a slow start), so a quota is not hit again by a thundering herd.
`max_requests_per_minute` spaces call starts evenly. Waiting is `asyncio.sleep`: the event
loop is never blocked, and a waiting worker holds no connection.

A *storm* is one cooldown with its extensions: it starts with the first 429 of a calm scope
and ends when a call that passed the gate after the pause returns successfully (or when the
batch ends, `close()`). The limiter reports each storm once to its observer
(`CooldownStarted`, then `CooldownEnded`), whatever the number of 429s in it; it stays pure
(no Prefect): the observer decides what a storm becomes (events, counters).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("prefect_batch_llm")


@dataclass(frozen=True)
class CooldownStarted:
    """A storm began: the first rate limit of a calm scope paused it.

    Attributes:
        scope: The rate-limit scope (`LLMCallStrategy.rate_limit_scope()`).
        wait_seconds: How long the scope pauses for this first rate limit.
        retry_after_seconds: The wait the provider asked for (Retry-After), if it did.
        cooldowns: Storms of this scope so far in this batch, this one included.
    """

    scope: str
    wait_seconds: float
    retry_after_seconds: float | None
    cooldowns: int


@dataclass(frozen=True)
class CooldownEnded:
    """A storm is over.

    Attributes:
        scope: The rate-limit scope.
        paused_seconds: From the storm's first rate limit to the end of its last extension
            (or to `close()`, if the batch ended first).
        rate_limited_calls: The rate-limited calls that started or extended the pause.
        resumed: True when a call made after the pause succeeded; False when the batch
            ended during the storm.
    """

    scope: str
    paused_seconds: float
    rate_limited_calls: int
    resumed: bool


CooldownEvent = CooldownStarted | CooldownEnded
CooldownObserver = Callable[[CooldownEvent], None]


class RateLimiter:
    """Gate that every attempt of a scope passes through before calling the provider."""

    def __init__(
        self,
        requests_per_minute: float | None = None,
        *,
        slow_start_calls: int = 8,
        slow_start_spacing: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        scope: str = "default",
        observer: CooldownObserver | None = None,
    ) -> None:
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._slow_start_calls = slow_start_calls
        self._slow_start_spacing = slow_start_spacing
        self._clock = clock
        self._cooldown_until = 0.0
        self._next_slot = 0.0
        self._ramp_remaining = 0
        self.scope = scope
        self._observer = observer
        #: Storms so far (see the module docstring).
        self.cooldowns = 0
        self._storm_started: float | None = None
        self._storm_rate_limits = 0
        self._paused_before = 0.0

    @property
    def cooling_down(self) -> bool:
        return self._clock() < self._cooldown_until

    @property
    def paused_seconds(self) -> float:
        """Seconds this scope has been paused: every storm, the open one up to now."""
        if self._storm_started is None:
            return self._paused_before
        return self._paused_before + self._storm_pause(self._clock())

    def _storm_pause(self, now: float) -> float:
        assert self._storm_started is not None
        return max(0.0, min(now, self._cooldown_until) - self._storm_started)

    def start_cooldown(self, seconds: float, *, retry_after: float | None = None) -> None:
        """Pause the scope for `seconds` from now (extends, never shortens, a cooldown).

        The first call of a calm scope starts a storm; later calls, until the storm ends,
        extend it. `retry_after` is what the provider asked for (reported, not applied here).
        """
        now = self._clock()
        until = now + max(0.0, seconds)
        if until > self._cooldown_until:
            self._cooldown_until = until
        self._ramp_remaining = self._slow_start_calls
        if self._storm_started is not None:
            self._storm_rate_limits += 1
            return
        self._storm_started = now
        self._storm_rate_limits = 1
        self.cooldowns += 1
        self._notify(CooldownStarted(self.scope, max(0.0, seconds), retry_after, self.cooldowns))

    def call_succeeded(self, passed_gate_at: float) -> None:
        """A call that passed `acquire()` at `passed_gate_at` returned successfully: if it
        passed after the storm's pause ended, the storm is over."""
        if self._storm_started is not None and passed_gate_at >= self._cooldown_until:
            self._end_storm(resumed=True)

    def close(self) -> None:
        """The batch is over: a storm still open ends now."""
        if self._storm_started is not None:
            self._end_storm(resumed=False)

    def _end_storm(self, *, resumed: bool) -> None:
        paused = self._storm_pause(self._clock())
        rate_limits = self._storm_rate_limits
        self._paused_before += paused
        self._storm_started, self._storm_rate_limits = None, 0
        self._notify(CooldownEnded(self.scope, paused, rate_limits, resumed))

    def _notify(self, event: CooldownEvent) -> None:
        if self._observer is None:
            return
        try:
            self._observer(event)
        except Exception as exc:  # an observer never fails a call
            logger.warning("The rate-limit observer raised %s: %s", type(exc).__name__, exc)

    async def acquire(self) -> float:
        """Wait for the end of any cooldown, then for this call's paced slot.

        Returns the clock's time at which the call passed (for `call_succeeded()`).
        """
        while True:
            now = self._clock()
            if now < self._cooldown_until:
                await asyncio.sleep(self._cooldown_until - now)
                continue
            spacing = self._interval
            if self._ramp_remaining > 0:
                self._ramp_remaining -= 1
                spacing = max(spacing, self._slow_start_spacing)
            slot = max(now, self._next_slot)
            self._next_slot = slot + spacing
            if slot > now:
                await asyncio.sleep(slot - now)
            passed = self._clock()
            if passed >= self._cooldown_until:
                return passed
