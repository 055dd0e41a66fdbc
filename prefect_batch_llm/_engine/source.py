"""Where a batch takes its next item: a list, an iterator or an async iterator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any


class Source:
    """Numbers items in the order they are read; safe to call from concurrent workers."""

    def __init__(self, items: Iterable[Any] | AsyncIterable[Any], total: int | None) -> None:
        self.total = total
        self.read = 0
        self._sync: Iterator[Any] | None = None
        self._async: AsyncIterator[Any] | None = None
        if isinstance(items, AsyncIterable):
            self._async = aiter(items)
        else:
            self._sync = iter(items)
        self._lock = asyncio.Lock()
        self._pending: asyncio.Task[Any] | None = None
        self.exhausted = False

    async def next(self) -> tuple[int, Any] | None:
        """The next (index, item), or None when the source is exhausted."""
        if self.exhausted:
            return None
        if self._sync is not None:
            try:
                item = next(self._sync)  # no await: atomic between workers
            except StopIteration:
                self.exhausted = True
                return None
        else:
            async with self._lock:  # an async generator cannot be advanced concurrently
                assert self._async is not None
                if self._pending is None:
                    self._pending = asyncio.ensure_future(anext(self._async))
                # Shielded, and kept until consumed: a reader cancelled (batch timeout), even
                # as the read completes, leaves the item to the next reader instead of losing
                # it or closing the generator.
                try:
                    item = await asyncio.shield(self._pending)
                except StopAsyncIteration:
                    self._pending, self.exhausted = None, True
                    return None
                except asyncio.CancelledError:
                    raise
                except BaseException:
                    self._pending = None
                    raise
                self._pending = None
        self.read += 1
        return self.read - 1, item
