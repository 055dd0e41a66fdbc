"""The emulator's model of the Gemini service: clock, caches, quota, faults, billing.

Pure Python and thread-safe: the HTTP layer (`_app.py`) calls it from the server's thread,
tests read it from theirs.
"""

from __future__ import annotations

import hashlib
import math
import threading
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field

from prefect_batch_llm.gemini.pricing import gemini_prices, gemini_pricing
from prefect_batch_llm.testing.emulator._clock import (
    EmulatorClock,
    parse_duration,
    parse_rfc3339,
    rfc3339,
)
from prefect_batch_llm.testing.emulator._jobs import BatchStore, FileStore

__all__ = [
    "Billing",
    "CachedContent",
    "EmulatorClock",
    "EmulatorState",
    "Fault",
    "count_tokens",
    "parse_duration",
    "parse_rfc3339",
    "rfc3339",
    "stable_hash",
]

FaultKind = Literal[
    "429",
    "500",
    "502_html",
    "503",
    "504",
    "400",
    "401",
    "403",
    "404",
    "slow",
    "drop",
    "safety",
    "prompt_blocked",
    "malformed_json",
    "invalid_output",
    "flex_shed",
]
#: Which calls a fault may hit: online calls by service tier, or a batch job's requests.
FaultTier = Literal["any", "standard", "flex", "batch"]
#: Faults about the HTTP exchange itself: they cannot happen to a request inside a batch job.
TRANSPORT_FAULTS = frozenset({"slow", "drop", "502_html", "malformed_json"})


def count_tokens(text: str) -> int:
    """The emulator's token rule: one token per 4 characters, rounded up (0 for "")."""
    return math.ceil(len(text) / 4)


class Fault(BaseModel):
    """A scripted failure of `generateContent` / `streamGenerateContent` calls.

    A fault applies to calls whose last user text contains `prompt_contains` (every call if
    None) and, if `on_calls` is given, only to those global call numbers (1-based). It fires
    at most `times` times (unlimited if None).

    `401`, `403` and `404` answer with the hosted API's bodies: 401 UNAUTHENTICATED; 403
    PERMISSION_DENIED "Consumer 'api_key:...' has been suspended", which, like the hosted
    service, quotes the request's API key (in the message and the ErrorInfo metadata); 404
    NOT_FOUND "models/... is not found for API version ...".

    `tier` limits a fault to online calls of one service tier (`standard`, `flex`) or to the
    requests of Batch Mode jobs (`batch`), where an error fault becomes that request's error
    in the job's output (`safety`, `prompt_blocked` and `invalid_output` shape its response;
    `slow`, `drop`, `502_html` and `malformed_json` never hit batch requests, and `on_calls`
    counts online calls only). `flex_shed` answers only Flex-tier calls: 503 UNAVAILABLE
    "This model is currently experiencing high demand...", the hosted API's overload answer.
    `message` replaces an error fault's message.
    """

    kind: FaultKind = Field(description="What the emulator does instead of answering.")
    prompt_contains: str | None = Field(None, description="Only prompts containing this.")
    on_calls: list[int] | None = Field(None, description="Only these call numbers (1-based).")
    times: int | None = Field(None, ge=1, description="Fire at most this many times.")
    tier: FaultTier = Field("any", description="Only online calls of this tier, or batch.")
    message: str | None = Field(None, description="The error message, instead of the default.")
    retry_after: float = Field(2.0, ge=0, description="For 429: RetryInfo and Retry-After.")
    retry_after_header: bool = Field(True, description="For 429: send the Retry-After header.")
    delay: float = Field(30.0, ge=0, description="For slow: seconds before answering.")
    fired: int = Field(0, description="How many times the fault has fired so far.")


@dataclass
class CachedContent:
    name: str
    model: str
    display_name: str | None
    contents: list[dict[str, Any]]
    system_instruction: dict[str, Any] | None
    tools: list[dict[str, Any]] | None
    tokens: int
    create_time: datetime
    update_time: datetime
    expire_time: datetime
    billed_storage_until: datetime

    def resource(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "model": self.model,
            "createTime": rfc3339(self.create_time),
            "updateTime": rfc3339(self.update_time),
            "expireTime": rfc3339(self.expire_time),
            "usageMetadata": {"totalTokenCount": self.tokens},
        }
        if self.display_name is not None:
            body["displayName"] = self.display_name
        return body


@dataclass
class Billing:
    """Tokens the emulated service billed, and their cost at list prices."""

    input_tokens: int = 0  # uncached prompt tokens
    cached_tokens: int = 0
    output_tokens: int = 0  # candidates + thoughts
    input_usd: float = 0.0
    cached_usd: float = 0.0
    output_usd: float = 0.0
    storage_usd: float = 0.0

    @property
    def total_usd(self) -> float:
        return self.input_usd + self.cached_usd + self.output_usd + self.storage_usd


@dataclass
class EmulatorState:
    """Everything the emulator knows. Mutate only under `lock`."""

    api_keys: set[str] | None = None
    min_cache_tokens: int = 1024
    latency: float = 0.0
    latency_jitter: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    faults: list[Fault] = field(default_factory=list)
    clock: EmulatorClock = field(default_factory=EmulatorClock)
    lock: threading.RLock = field(default_factory=threading.RLock)
    caches: dict[str, CachedContent] = field(default_factory=dict)
    expired: set[str] = field(default_factory=set)
    calls: Counter[str] = field(default_factory=Counter)
    generate_calls: int = 0
    caches_created: int = 0
    caches_deleted: int = 0
    caches_updated: int = 0
    caches_expired: int = 0
    billing: Billing = field(default_factory=Billing)
    flex_billing: Billing = field(default_factory=Billing)
    batch_billing: Billing = field(default_factory=Billing)
    flex_calls: int = 0
    flex_shed: int = 0
    _recent: deque[tuple[float, int]] = field(default_factory=deque)
    files: FileStore = field(init=False)
    batches: BatchStore = field(init=False)

    def __post_init__(self) -> None:
        self.files = FileStore(self.clock, self.lock)
        self.batches = BatchStore(self.clock, self.lock, self.files)

    # -- calls ---------------------------------------------------------------------------

    def record_call(self, endpoint: str, model: str | None, status: int) -> None:
        name = model.removeprefix("models/") if model else "-"
        with self.lock:
            self.calls[f"{endpoint}|{name}|{status}"] += 1

    def next_generate_call(self) -> int:
        with self.lock:
            self.generate_calls += 1
            return self.generate_calls

    def pick_fault(
        self, call_number: int | None, prompt: str, tier: str = "standard"
    ) -> Fault | None:
        """The first fault for this call (`call_number` None: a batch job's request)."""
        with self.lock:
            for fault in self.faults:
                if fault.times is not None and fault.fired >= fault.times:
                    continue
                if fault.tier not in ("any", tier):
                    continue
                if fault.kind == "flex_shed" and tier != "flex":
                    continue
                if tier == "batch" and fault.kind in TRANSPORT_FAULTS:
                    continue
                if fault.prompt_contains is not None and fault.prompt_contains not in prompt:
                    continue
                if fault.on_calls is not None and call_number not in fault.on_calls:
                    continue
                fault.fired += 1
                return fault
        return None

    def check_quota(self, tokens: int) -> float | None:
        """Admit a call of `tokens` or return seconds until the quota frees (sliding minute)."""
        if self.rpm is None and self.tpm is None:
            return None
        with self.lock:
            now = self.clock.now()
            while self._recent and self._recent[0][0] <= now - 60.0:
                self._recent.popleft()
            over_rpm = self.rpm is not None and len(self._recent) >= self.rpm
            used = sum(t for _, t in self._recent)
            over_tpm = self.tpm is not None and used + tokens > self.tpm and self._recent
            if over_rpm or over_tpm:
                return max(0.001, self._recent[0][0] + 60.0 - now)
            self._recent.append((now, tokens))
            return None

    # -- billing -------------------------------------------------------------------------

    def bill(
        self, model: str, prompt_tokens: int, cached: int, output: int, path: str = "standard"
    ) -> None:
        """Bill one answered request under a price path: `standard`, `flex` or `batch`.

        At the library's own price table (`gemini_pricing(model).for_path(path)`, the prices
        in effect on the emulator clock's day), so the emulator's bill and the client-side
        `BatchResult.estimated_cost(gemini_pricing(model))` agree by construction.
        """
        prices = gemini_pricing(model, on=self.clock.datetime()).for_path(path)
        uncached = max(0, prompt_tokens - cached)
        with self.lock:
            billing = {"flex": self.flex_billing, "batch": self.batch_billing}.get(
                path, self.billing
            )
            billing.input_tokens += uncached
            billing.cached_tokens += cached
            billing.output_tokens += output
            billing.input_usd += prices.cost(uncached, 0)
            billing.cached_usd += prices.cost(cached, 0, cached)
            billing.output_usd += prices.cost(0, output)

    def _bill_storage(self, cache: CachedContent, until: datetime) -> None:
        end = min(until, cache.expire_time)
        hours = max(0.0, (end - cache.billed_storage_until).total_seconds() / 3600)
        storage = gemini_prices(cache.model, on=cache.billed_storage_until)[3]
        self.billing.storage_usd += cache.tokens * hours * storage / 1e6
        cache.billed_storage_until = max(cache.billed_storage_until, end)

    # -- caches --------------------------------------------------------------------------

    def sweep(self) -> None:
        """Drop caches whose expireTime has passed (remembered as expired).

        Batch jobs due before now are finished first, so a job that ended while its cache
        was live still used it.
        """
        self.batches.advance()
        with self.lock:
            now = self.clock.datetime()
            for name, cache in list(self.caches.items()):
                if cache.expire_time <= now:
                    self._bill_storage(cache, cache.expire_time)
                    del self.caches[name]
                    self.expired.add(name)
                    self.caches_expired += 1

    def create_cache(
        self,
        model: str,
        contents: list[dict[str, Any]],
        system_instruction: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None,
        display_name: str | None,
        tokens: int,
        ttl: float | None,
        expire_time: datetime | None,
    ) -> CachedContent:
        with self.lock:
            now = self.clock.datetime()
            expires = expire_time or now + timedelta(seconds=3600 if ttl is None else ttl)
            cache = CachedContent(
                name=f"cachedContents/{uuid.uuid4().hex[:12]}",
                model=model if model.startswith("models/") else f"models/{model}",
                display_name=display_name,
                contents=contents,
                system_instruction=system_instruction,
                tools=tools,
                tokens=tokens,
                create_time=now,
                update_time=now,
                expire_time=expires,
                billed_storage_until=now,
            )
            self.caches[cache.name] = cache
            self.caches_created += 1
            return cache

    def get_cache(self, name: str) -> CachedContent | None:
        self.sweep()
        with self.lock:
            return self.caches.get(name)

    def list_caches(self) -> list[CachedContent]:
        self.sweep()
        with self.lock:
            return sorted(self.caches.values(), key=lambda c: (c.create_time, c.name))

    def update_cache(
        self, name: str, ttl: float | None, expire_time: datetime | None
    ) -> CachedContent | None:
        self.sweep()
        with self.lock:
            cache = self.caches.get(name)
            if cache is None:
                return None
            now = self.clock.datetime()
            self._bill_storage(cache, now)
            cache.expire_time = expire_time or now + timedelta(seconds=ttl or 3600)
            cache.update_time = now
            self.caches_updated += 1
            return cache

    def delete_cache(self, name: str) -> bool:
        self.sweep()
        with self.lock:
            cache = self.caches.pop(name, None)
            if cache is None:
                return False
            self._bill_storage(cache, self.clock.datetime())
            self.caches_deleted += 1
            return True

    # -- inspection ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and billing, JSON-ready (also served at `GET /_emulator/stats`)."""
        self.sweep()
        with self.lock:
            now = self.clock.datetime()
            for cache in self.caches.values():
                self._bill_storage(cache, now)
            by_endpoint: Counter[str] = Counter()
            by_status: Counter[str] = Counter()
            for key, n in self.calls.items():
                endpoint, _, status = key.split("|")
                by_endpoint[endpoint] += n
                by_status[status] += n
            b = self.billing
            self.files.sweep()
            return {
                "calls": dict(self.calls),
                "calls_by_endpoint": dict(by_endpoint),
                "calls_by_status": dict(by_status),
                "generate_calls": self.generate_calls,
                "caches": {
                    "created": self.caches_created,
                    "deleted": self.caches_deleted,
                    "updated": self.caches_updated,
                    "expired": self.caches_expired,
                    "live": len(self.caches),
                    "live_names": sorted(self.caches),
                },
                "billed": {
                    "input_tokens": b.input_tokens,
                    "cached_tokens": b.cached_tokens,
                    "output_tokens": b.output_tokens,
                    "input_usd": round(b.input_usd, 8),
                    "cached_usd": round(b.cached_usd, 8),
                    "output_usd": round(b.output_usd, 8),
                    "storage_usd": round(b.storage_usd, 8),
                    "total_usd": round(b.total_usd, 8),
                },
                "billed_by_path": {
                    "standard": _billed(b),
                    "flex": _billed(self.flex_billing),
                    "batch": _billed(self.batch_billing),
                },
                "flex_calls": self.flex_calls,
                "flex_shed": self.flex_shed,
                "batches": self.batches.stats(),
                "files": self.files.stats(),
                "clock": rfc3339(self.clock.datetime()),
            }

    def reset_counters(self) -> None:
        with self.lock:
            self.calls.clear()
            self.generate_calls = 0
            self.caches_created = self.caches_deleted = 0
            self.caches_updated = self.caches_expired = 0
            self.billing = Billing()
            self.flex_billing = Billing()
            self.batch_billing = Billing()
            self.flex_calls = self.flex_shed = 0
            self._recent.clear()
        self.batches.reset_counters()
        self.files.reset_counters()


def _billed(billing: Billing) -> dict[str, Any]:
    """Tokens and cost of one price path (cache storage is in `billed`, not here)."""
    return {
        "input_tokens": billing.input_tokens,
        "cached_tokens": billing.cached_tokens,
        "output_tokens": billing.output_tokens,
        "input_usd": round(billing.input_usd, 8),
        "cached_usd": round(billing.cached_usd, 8),
        "output_usd": round(billing.output_usd, 8),
        "total_usd": round(billing.input_usd + billing.cached_usd + billing.output_usd, 8),
    }


def stable_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
