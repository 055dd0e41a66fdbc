"""How our context caches are named on the server, and who in this process uses them."""

from __future__ import annotations

import threading
from collections import Counter

_PREFIX = "pbl"


#: A cache, as this process knows it: (endpoint, `cachedContents/...` name).
CacheKey = tuple[str, str]


class _CacheUsers:
    """How many prepared strategy instances of this process use each cache.

    With `delete_cache_on_cleanup=True`, a strategy that cleans up while others of this
    process still use its cache leaves the deletion to the last of them. Other processes
    cannot be seen: a run there whose cache is deleted re-creates it on its next call.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uses: Counter[CacheKey] = Counter()
        self._delete_when_unused: set[CacheKey] = set()

    def move(self, old: CacheKey | None, new: CacheKey | None, uses: int) -> None:
        """`uses` uses go from `old` to `new` (either may be None: no cache)."""
        if uses <= 0 or old == new:
            return
        with self._lock:
            if old is not None:
                self._uses[old] -= uses
                if self._uses[old] <= 0:
                    del self._uses[old]
            if new is not None:
                self._uses[new] += uses

    def release(self, key: CacheKey | None, uses: int, *, delete: bool) -> tuple[bool, int]:
        """Drop `uses` uses of `key`. Returns (delete it now, uses left by others): the last
        user deletes if it asked to or an earlier user did; otherwise a deletion asked for
        is remembered for the last one."""
        if key is None:
            return False, 0
        with self._lock:
            self._uses[key] -= uses
            left = self._uses[key]
            if left > 0:
                if delete:
                    self._delete_when_unused.add(key)
                return False, left
            del self._uses[key]
            asked = key in self._delete_when_unused
            self._delete_when_unused.discard(key)
            return delete or asked, 0

    def deleted(self, key: CacheKey) -> None:
        """The cache was deleted: no deletion is pending any more."""
        with self._lock:
            self._delete_when_unused.discard(key)


cache_users = _CacheUsers()


def display_name(fingerprint: str, tags: dict[str, str]) -> str:
    """What identifies our caches: the Developer API has no labels, only a displayName."""
    parts = [f"{_PREFIX}:{fingerprint}", *(f"{k}={v}" for k, v in sorted(tags.items()))]
    return ";".join(parts)


def parse_display_name(name: str | None) -> tuple[str, dict[str, str]] | None:
    """(fingerprint, tags) of one of our caches, or None for a foreign cache."""
    if not name or not name.startswith(f"{_PREFIX}:"):
        return None
    head, *rest = name.split(";")
    tags = dict(item.split("=", 1) for item in rest if "=" in item)
    return head.removeprefix(f"{_PREFIX}:"), tags
