"""The emulator's clock and the time formats of the API (RFC 3339 timestamps, "300s")."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime


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
