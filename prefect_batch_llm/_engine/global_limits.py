"""One provider quota shared by every process: requests and tokens per minute on Prefect's
global concurrency limits (GCLs), and a 429 anywhere pausing all of them.

Each limit is a token bucket kept by the Prefect server: a GCL whose `slot_decay_per_second`
frees slots continuously (Prefect's "rate limit" mode). Before each provider call a process
takes one request's slots from `<name>-rpm` and the call's estimated tokens from
`<name>-tpm` (`POST /v2/concurrency_limits/increment`, mode `rate_limit`); when the bucket is
full the server answers 423 and the process reads the limit (`GET`, which returns the slots
left after decay) to sleep until its slots are free (re-reading every 2 s of a long wait).
Nothing is released: slots decay.

Bucket sizes (configured on `ProcessorConfig`; `R` requests or tokens per minute, `b` the
burst seconds): capacity `B = max(1 unit, R * b / 60)` and decay `(R - B) / 60` per second,
so in ANY 60 s window at most `B + (R - B) = R` calls start (tokens are charged), and in a
window of `w` seconds at most `B + (R - B) * w / 60`. The price is `B / R` of the quota
(`b / 60`, e.g. 2 s of burst: 3.3 %).

A request is `SLOTS_PER_REQUEST` slots of the requests limit: the server applies decay as
`floor(decay * seconds since the last update)` and then restarts the clock, so a decay of a
few slots per second loses up to one slot per update (measured on a 10/s limit: 66-76 % of
its rate delivered with one slot per request, 85-99 % with 100; `benchmarks/global_limits.py`).

A rate limit (429) seen by any process sets the first limit's active slots to its capacity
plus `decay * cooldown` (`PATCH`): every process's next acquisition is refused until the
cooldown has passed, by the server's clock, and then resumes at the decay rate (no burst).
Measured against the alternative, a Prefect Variable holding the cooldown's end that each
process re-reads every second, see `docs/guides/scale-out.md`.

Tokens: a call is charged an estimate before it runs (the configured tokens per call, else
the mean input + output tokens of this process's finished calls, else a quarter of the
prompt's characters); when it reports more, the difference is owed and added to this
process's next charge. Over-estimates are not given back (slots cannot be returned), so the
tokens limit errs on the safe side by the mean over-estimate; under-estimates can exceed it
for a moment by at most the calls in flight times their under-estimate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from prefect_batch_llm.config import ProcessorConfig
from prefect_batch_llm.errors import PermanentError, TransientError
from prefect_batch_llm.results import TokenUsage

logger = logging.getLogger("prefect_batch_llm")

#: Slots of the requests limit one request occupies (see the module docstring).
SLOTS_PER_REQUEST = 100
#: The largest slot count a GCL holds (a 32-bit integer column on PostgreSQL).
MAX_SLOTS = 2**31 - 1
#: Shortest sleep before retrying a refused acquisition; the longest before re-reading the
#: limit during a long wait (a pause may be lifted early, e.g. by resetting the limit).
_MIN_WAIT, _REREAD = 0.005, 2.0


@dataclass
class Bucket:
    """One GCL as this process uses it: `capacity` and `decay` in slots, `scale` slots per
    request (or token)."""

    name: str
    capacity: int
    decay: float
    scale: int
    per_minute: int

    @classmethod
    def sized(cls, name: str, per_minute: int, burst_seconds: float, scale: int = 1) -> Bucket:
        quota = per_minute * scale
        capacity = min(MAX_SLOTS, max(scale, round(quota * burst_seconds / 60)))
        # At least half the quota's rate: a tiny quota (1-2 requests a minute) with a burst of
        # one request would otherwise decay at nothing.
        decay = max(quota - capacity, quota / 2) / 60
        return cls(name, capacity, decay, scale, per_minute)


def buckets_for(config: ProcessorConfig) -> tuple[Bucket | None, Bucket | None]:
    """The requests and tokens buckets a config asks for (each None when not configured)."""
    prefix, burst = config.global_limit_name, config.global_burst_seconds
    if prefix is None:
        return None, None
    rpm = config.global_requests_per_minute
    tpm = config.global_tokens_per_minute
    requests = Bucket.sized(f"{prefix}-rpm", rpm, burst, SLOTS_PER_REQUEST) if rpm else None
    tokens = Bucket.sized(f"{prefix}-tpm", tpm, burst) if tpm else None
    return requests, tokens


def call_tokens(usage: TokenUsage) -> int:
    """Tokens a call counts against a tokens-per-minute quota: input (cached included) and
    output."""
    return int(usage.get("input_tokens", 0)) + int(usage.get("output_tokens", 0))


class GlobalLimits:
    """The global requests/tokens limits as one process of the batch uses them.

    One instance per batch (`BatchRuntime.global_limits`); every method runs on the batch's
    event loop and never blocks it. Acquisitions of one process are made one at a time (an
    `asyncio.Lock`, first come, first served), and no two writes of one process race each
    other on the server's database.
    """

    def __init__(
        self,
        requests: Bucket | None,
        tokens: Bucket | None,
        *,
        tokens_per_call: int | None = None,
        create: bool = True,
    ) -> None:
        if requests is None and tokens is None:
            raise ValueError("GlobalLimits needs a requests or a tokens limit")
        self.requests = requests
        self.tokens = tokens
        self._tokens_per_call = tokens_per_call
        self._create = create
        self._lock = asyncio.Lock()
        #: Held around each write to the server (never across a sleep): two writes at once
        #: collide on a SQLite-backed server ("database is locked", ~2 s lost).
        self._writing = asyncio.Lock()
        self._ready = False
        self._setup_error: Exception | None = None
        self._debt = 0
        self._finished_calls = 0
        self._finished_tokens = 0
        self._cooldown_until = 0.0
        self._warned_oversized = False
        #: Acquisitions made, refusals (423) waited out, seconds waited, cooldowns set.
        self.acquired = 0
        self.refused = 0
        self.waited_seconds = 0.0
        self.cooldowns = 0

    @classmethod
    def for_config(cls, config: ProcessorConfig) -> GlobalLimits | None:
        requests, tokens = buckets_for(config)
        if requests is None and tokens is None:
            return None
        return cls(
            requests,
            tokens,
            tokens_per_call=config.global_tokens_per_call,
            create=config.global_limit_create,
        )

    # -- the limits on the server ----------------------------------------------------------

    async def _ensure(self, client: PrefectClient) -> None:
        """Create or check the GCLs once (under `_lock`)."""
        if self._ready:
            return
        if self._setup_error is not None:
            raise self._setup_error
        try:
            for bucket in (self.requests, self.tokens):
                if bucket is not None:
                    await self._ensure_one(client, bucket)
        except PermanentError as exc:
            self._setup_error = exc
            raise
        self._ready = True

    async def _ensure_one(self, client: PrefectClient, bucket: Bucket) -> None:
        try:
            current = await client.read_global_concurrency_limit_by_name(bucket.name)
        except ObjectNotFound:
            current = None
        if current is None:
            if not self._create:
                raise PermanentError(
                    f"The global concurrency limit {bucket.name!r} does not exist. Create it "
                    f"(limit {bucket.capacity}, slot decay {bucket.decay:g}/s) or set "
                    "ProcessorConfig.global_limit_create=True."
                )
            with contextlib.suppress(ObjectAlreadyExists):  # another process was first
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(
                        name=bucket.name, limit=bucket.capacity, slot_decay_per_second=bucket.decay
                    )
                )
            return
        decay = float(current.slot_decay_per_second or 0.0)
        if not self._create:
            if decay <= 0:
                raise PermanentError(
                    f"The global concurrency limit {bucket.name!r} has no slot decay: it "
                    "cannot be used as a rate limit. Give it a slot decay per second."
                )
            bucket.capacity, bucket.decay = int(current.limit), decay
            return
        if int(current.limit) != bucket.capacity or not math.isclose(decay, bucket.decay):
            logger.warning(
                "Global concurrency limit %r: limit %s, decay %g/s changed to limit %s, "
                "decay %g/s (this batch's config).",
                bucket.name,
                current.limit,
                decay,
                bucket.capacity,
                bucket.decay,
            )
            await client.update_global_concurrency_limit(
                bucket.name,
                GlobalConcurrencyLimitUpdate(
                    limit=bucket.capacity, slot_decay_per_second=bucket.decay
                ),
            )

    # -- before and after a call -----------------------------------------------------------

    def estimate(self, prompt: Any) -> int:
        """Tokens to charge a call before it runs (see the module docstring)."""
        if self._tokens_per_call is not None:
            return self._tokens_per_call
        if self._finished_calls:
            return max(1, round(self._finished_tokens / self._finished_calls))
        return max(1, math.ceil(len(str(prompt)) / 4))

    async def acquire(self, prompt: Any) -> int:
        """Wait for one request's slots and the call's estimated tokens.

        Returns the tokens charged for this call (0 without a tokens limit), for `settle()`.

        Raises:
            PermanentError: A limit is missing (and not to be created) or unusable.
            TransientError: The Prefect API failed (after the client's own retries).
        """
        estimate = self.estimate(prompt) if self.tokens is not None else 0
        async with self._lock:
            started = time.monotonic()
            try:
                async with get_client() as client:
                    await self._ensure(client)
                    if self.requests is not None:
                        await self._take(client, self.requests, self.requests.scale)
                    charge = 0
                    if self.tokens is not None:
                        charge = min(estimate, self.tokens.capacity)
                        repay = min(self._debt, self.tokens.capacity - charge)
                        await self._take(client, self.tokens, charge + repay)
                        self._debt -= repay
            finally:
                self.waited_seconds += time.monotonic() - started
            self.acquired += 1
            return charge

    def settle(self, charged: int, usage: TokenUsage) -> None:
        """A call charged `charged` tokens reported `usage`: learn the mean, owe the rest."""
        if self.tokens is None:
            return
        used = call_tokens(usage)
        if used <= 0:
            return
        self._finished_calls += 1
        self._finished_tokens += used
        self._debt += max(0, used - charged)
        if used > self.tokens.capacity and not self._warned_oversized:
            self._warned_oversized = True
            logger.warning(
                "A call used %s tokens, more than the tokens limit %r holds (%s, the burst "
                "of global_burst_seconds): raise global_burst_seconds so one call fits.",
                used,
                self.tokens.name,
                self.tokens.capacity,
            )

    async def _take(self, client: PrefectClient, bucket: Bucket, slots: int) -> None:
        """Occupy `slots` of `bucket`, waiting as long as the server refuses."""
        slots = max(1, min(slots, bucket.capacity))
        while True:
            try:
                async with self._writing:
                    response = await client.increment_concurrency_slots(
                        names=[bucket.name], slots=slots, mode="rate_limit"
                    )
            except httpx.HTTPStatusError as exc:
                status = exc.response.status_code
                if status == 423:
                    self.refused += 1
                    await self._wait_for(client, bucket, slots)
                    continue
                if status == 422:
                    raise PermanentError(
                        f"The global concurrency limit {bucket.name!r} refused {slots} "
                        f"slot(s): {exc.response.text[:300]}"
                    ) from None
                raise TransientError(
                    f"Acquiring the global concurrency limit {bucket.name!r} failed: HTTP {status}"
                ) from None
            except httpx.HTTPError as exc:
                raise TransientError(
                    f"Acquiring the global concurrency limit {bucket.name!r} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            if not response.json():  # an unknown name is acquired as "no limits"
                self._ready = False
                raise PermanentError(
                    f"The global concurrency limit {bucket.name!r} does not exist (deleted "
                    "while the batch ran?)."
                )
            return

    async def _wait_for(self, client: PrefectClient, bucket: Bucket, slots: int) -> None:
        """Sleep until `slots` should be free, from the limit's slots after decay. Reads (which
        neither take the database's write lock nor restart the decay clock) every `_REREAD`
        seconds of a long wait; the next acquisition attempt (a write) comes at its end."""
        while True:
            try:
                current = await client.read_global_concurrency_limit_by_name(bucket.name)
            except (httpx.HTTPError, ObjectNotFound):
                await asyncio.sleep(1.0)
                return
            decay = float(current.slot_decay_per_second or bucket.decay) or bucket.decay
            missing = int(current.active_slots) + slots - int(current.limit)
            # Decay is applied in whole slots: one more slot's worth avoids a wasted retry.
            wait = max(_MIN_WAIT, max(missing + 1, 1) / decay * random.uniform(1.0, 1.1))
            if wait <= _REREAD:
                await asyncio.sleep(wait)
                return
            await asyncio.sleep(_REREAD)

    # -- a rate limit anywhere pauses everyone ---------------------------------------------

    async def cooldown(self, seconds: float) -> None:
        """Pause every process sharing the limits for `seconds` from now (never shortens a
        pause). Best effort: a failure is logged, and this process pauses anyway."""
        bucket = self.requests or self.tokens
        if bucket is None or seconds <= 0 or not self._ready:
            return
        now = time.monotonic()
        if now + seconds <= self._cooldown_until:
            return  # this process has set a pause at least as long
        self._cooldown_until = now + seconds
        target = min(MAX_SLOTS, bucket.capacity + math.ceil(bucket.decay * seconds))
        try:
            async with get_client() as client:
                current = await client.read_global_concurrency_limit_by_name(bucket.name)
                if int(current.active_slots) >= target:
                    return
                async with self._writing:
                    await client.update_global_concurrency_limit(
                        bucket.name, GlobalConcurrencyLimitUpdate(active_slots=target)
                    )
        except Exception as exc:
            logger.warning(
                "Could not pause the global concurrency limit %r for %.1f s: %s: %s",
                bucket.name,
                seconds,
                type(exc).__name__,
                exc,
            )
            return
        self.cooldowns += 1
