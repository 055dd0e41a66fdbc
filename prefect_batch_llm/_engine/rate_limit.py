"""Coordinated cooldown and request pacing, shared by every worker of one scope.

One rate limit (429) starts a cooldown: every worker of the scope waits until it ends, then
calls resume one by one (a slow start), so a quota is not hit again by a thundering herd.
`max_requests_per_minute` spaces call starts evenly. Waiting is `asyncio.sleep`: the event
loop is never blocked, and a waiting worker holds no connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class RateLimiter:
    """Gate that every attempt of a scope passes through before calling the provider."""

    def __init__(
        self,
        requests_per_minute: float | None = None,
        *,
        slow_start_calls: int = 8,
        slow_start_spacing: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._slow_start_calls = slow_start_calls
        self._slow_start_spacing = slow_start_spacing
        self._clock = clock
        self._cooldown_until = 0.0
        self._next_slot = 0.0
        self._ramp_remaining = 0
        self.cooldowns = 0

    @property
    def cooling_down(self) -> bool:
        return self._clock() < self._cooldown_until

    def start_cooldown(self, seconds: float) -> None:
        """Pause the scope for `seconds` from now (extends, never shortens, a cooldown)."""
        until = self._clock() + max(0.0, seconds)
        if until > self._cooldown_until:
            self._cooldown_until = until
            self.cooldowns += 1
        self._ramp_remaining = self._slow_start_calls

    async def acquire(self) -> None:
        """Wait for the end of any cooldown, then for this call's paced slot."""
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
            if self._clock() >= self._cooldown_until:
                return
