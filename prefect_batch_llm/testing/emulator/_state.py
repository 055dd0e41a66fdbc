"""The emulator's model of the Gemini service: clock, caches, quota, faults, billing.

Pure Python and thread-safe: the HTTP layer (`_app.py`) calls it from the server's thread,
tests read it from theirs.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field

from prefect_batch_llm.gemini.pricing import gemini_prices

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
]


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
    """

    kind: FaultKind = Field(description="What the emulator does instead of answering.")
    prompt_contains: str | None = Field(None, description="Only prompts containing this.")
    on_calls: list[int] | None = Field(None, description="Only these call numbers (1-based).")
    times: int | None = Field(None, ge=1, description="Fire at most this many times.")
    retry_after: float = Field(2.0, ge=0, description="For 429: RetryInfo and Retry-After.")
    retry_after_header: bool = Field(True, description="For 429: send the Retry-After header.")
    delay: float = Field(30.0, ge=0, description="For slow: seconds before answering.")
    fired: int = Field(0, description="How many times the fault has fired so far.")


class EmulatorClock:
    """Wall-clock time plus an offset tests can advance ("fast-forward")."""

    def __init__(self) -> None:
        self._offset = 0.0

    def now(self) -> float:
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += seconds

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now(), UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> datetime:
    cleaned = text.strip().replace("Z", "+00:00")
    # Python 3.11 accepts at most 6 fractional digits; the API may send 9.
    cleaned = re.sub(r"(\.\d{6})\d+", r"\1", cleaned)
    moment = datetime.fromisoformat(cleaned)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_duration(text: str) -> float:
    """`"300s"` / `"1.5s"` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)s\s*", str(text))
    if not match:
        raise ValueError(f"invalid duration {text!r}; expected a string like '300s'")
    return float(match.group(1))


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
    _recent: deque[tuple[float, int]] = field(default_factory=deque)

    # -- calls ---------------------------------------------------------------------------

    def record_call(self, endpoint: str, model: str | None, status: int) -> None:
        name = model.removeprefix("models/") if model else "-"
        with self.lock:
            self.calls[f"{endpoint}|{name}|{status}"] += 1

    def next_generate_call(self) -> int:
        with self.lock:
            self.generate_calls += 1
            return self.generate_calls

    def pick_fault(self, call_number: int, prompt: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times is not None and fault.fired >= fault.times:
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

    def bill(self, model: str, prompt_tokens: int, cached: int, output: int) -> None:
        price_in, price_out, price_cached, _ = gemini_prices(model)
        uncached = max(0, prompt_tokens - cached)
        with self.lock:
            self.billing.input_tokens += uncached
            self.billing.cached_tokens += cached
            self.billing.output_tokens += output
            self.billing.input_usd += uncached * price_in / 1e6
            self.billing.cached_usd += cached * price_cached / 1e6
            self.billing.output_usd += output * price_out / 1e6

    def _bill_storage(self, cache: CachedContent, until: datetime) -> None:
        end = min(until, cache.expire_time)
        hours = max(0.0, (end - cache.billed_storage_until).total_seconds() / 3600)
        self.billing.storage_usd += cache.tokens * hours * gemini_prices(cache.model)[3] / 1e6
        cache.billed_storage_until = max(cache.billed_storage_until, end)

    # -- caches --------------------------------------------------------------------------

    def sweep(self) -> None:
        """Drop caches whose expireTime has passed (remembered as expired)."""
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
                "clock": rfc3339(self.clock.datetime()),
            }

    def reset_counters(self) -> None:
        with self.lock:
            self.calls.clear()
            self.generate_calls = 0
            self.caches_created = self.caches_deleted = 0
            self.caches_updated = self.caches_expired = 0
            self.billing = Billing()
            self._recent.clear()


def stable_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
