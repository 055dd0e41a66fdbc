"""`GeminiCachedStrategy`: one shared Gemini context cache for a whole batch (and later ones)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from google.genai import errors as genai_errors
from google.genai import types
from pydantic import Field, HttpUrl, PrivateAttr, model_validator

from prefect_batch_llm._links import docs_page
from prefect_batch_llm._unknown_args import GEMINI_CACHE_HINTS, GEMINI_HINTS
from prefect_batch_llm.errors import PermanentError
from prefect_batch_llm.gemini._caches import (
    CacheKey,
    cache_users,
    display_name,
    parse_display_name,
)
from prefect_batch_llm.gemini.errors import is_cache_expired
from prefect_batch_llm.gemini.strategy import GeminiStrategy, as_contents, count_gemini_tokens
from prefect_batch_llm.results import TokenUsage
from prefect_batch_llm.strategy import RetryState

logger = logging.getLogger("prefect_batch_llm")

_STATE_KEY = "gemini_cache_name"


class GeminiCachedStrategy(GeminiStrategy):
    """A Gemini strategy whose system instruction and context documents live in a context cache.

    Share **one** instance across a batch: `prepare()` runs once and every item reads the same
    cache, billed at the cached-token rate.

    - `prepare()` adopts a live cache only if its model, `cache_tags` and a fingerprint of the
      cached content all match (a changed prompt is never served from a stale cache); the
      remaining life is read from its `expireTime`. Otherwise it creates one. If two flows
      create at once, both converge on the oldest cache and the other is deleted.
    - Before each call, a cache expiring within `cache_renewal_buffer_seconds` is renewed
      (one PATCH under a lock, however many workers), or re-created if it is gone.
    - A cache that expired or is gone on the server (400 "Cache content X is expired"; 403/404
      "CachedContent not found" after a deletion by hand, by another run or in a restart) is
      found or re-created once, however many workers saw it, and their items are retried
      without using up an attempt.
    - `cleanup()` keeps the cache for later runs within its TTL; `delete_cache()` deletes it;
      `delete_cache_on_cleanup=True` does so at the end of the batch (one-off jobs), unless
      another strategy instance of this process still uses the cache: then the last of them
      deletes it. Runs in other processes are not known; one whose cache is deleted
      re-creates it.

    Example:
        ```python
        from prefect_batch_llm.gemini import GeminiCachedStrategy

        gemini_cached_strategy = GeminiCachedStrategy.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "Gemini Cached Strategy"
    _documentation_url = HttpUrl(docs_page("guides/gemini/#context-caching"))
    _description = "Calls Gemini with a shared context cache (system instruction + documents)."
    _code_example = """
```python
from prefect_batch_llm.gemini import GeminiCachedStrategy

gemini_cached_strategy = GeminiCachedStrategy.load("BLOCK_NAME")
```
"""

    _argument_hints: ClassVar[Mapping[str, str]] = {**GEMINI_HINTS, **GEMINI_CACHE_HINTS}

    cached_documents: list[str] = Field(
        default_factory=list, description="Context documents (text) to cache."
    )
    cached_document_paths: list[str] = Field(
        default_factory=list,
        description="Files whose text is cached too, read at prepare() where the flow runs; "
        "a relative path is read from the flow run's working directory (for a deployment, "
        "the directory it was deployed from).",
    )
    cache_ttl_seconds: int = Field(default=3600, gt=0, description="Lifetime of the cache.")
    cache_renewal_buffer_seconds: int = Field(
        default=300, ge=0, description="Renew the cache when it expires within this many seconds."
    )
    cache_tags: dict[str, str] = Field(
        default_factory=dict,
        description="Tags a reusable cache must carry (e.g. customer, version).",
    )
    auto_renew: bool = Field(default=True, description="Renew the cache before it expires.")
    delete_cache_on_cleanup: bool = Field(
        default=False, description="Delete the cache when the batch ends (for one-off jobs)."
    )
    fallback_to_uncached: bool = Field(
        default=False,
        description="If the content is below the minimum cache size, call uncached with a warning.",
    )

    _cache_name: str | None = PrivateAttr(default=None)
    _expires_at: float | None = PrivateAttr(default=None)
    _lock: asyncio.Lock | None = PrivateAttr(default=None)
    _documents: list[str] = PrivateAttr(default_factory=list)
    _fingerprint: str = PrivateAttr(default="")
    _uncached: bool = PrivateAttr(default=False)
    _clock: Callable[[], float] = PrivateAttr(default=time.time)
    _uses: int = PrivateAttr(default=0)
    _used_key: CacheKey | None = PrivateAttr(default=None)

    #: Lifetimes, renewal, tags and clean-up never change an answer; the document paths are
    #: replaced by their content (`fingerprint_extras`), so an edited file is a new answer.
    fingerprint_exclude: ClassVar[frozenset[str]] = GeminiStrategy.fingerprint_exclude | frozenset(
        {
            "cache_ttl_seconds",
            "cache_renewal_buffer_seconds",
            "cache_tags",
            "auto_renew",
            "delete_cache_on_cleanup",
            "fallback_to_uncached",
            "cached_document_paths",
        }
    )

    def fingerprint_extras(self) -> dict[str, Any]:
        """The SHA-256 of every cached document file's content (read now, where the flow runs)."""
        digests: list[str] = []
        for raw in self.cached_document_paths:
            try:
                content = Path(raw).expanduser().read_bytes()
            except OSError as exc:
                digests.append(f"unreadable {raw}: {exc.strerror or exc}")
                continue
            digests.append(hashlib.sha256(content).hexdigest())
        return {"cached_document_content_sha256": digests}

    @model_validator(mode="after")
    def _check_cache_settings(self) -> GeminiCachedStrategy:
        if self.cache_renewal_buffer_seconds >= self.cache_ttl_seconds:
            raise ValueError(
                f"cache_renewal_buffer_seconds ({self.cache_renewal_buffer_seconds}) must be less "
                f"than cache_ttl_seconds ({self.cache_ttl_seconds}), or the cache would be renewed "
                "before every call. Typical: a TTL of 3600 with a buffer of 300."
            )
        for key, value in self.cache_tags.items():
            if not key or any(c in f"{key}{value}" for c in ";="):
                raise ValueError(
                    f"cache tag {key!r}={value!r}: keys must be non-empty and tags may not "
                    "contain ';' or '='."
                )
        length = len(display_name("0" * 16, self.cache_tags))
        if length > 128:
            raise ValueError(
                f"cache_tags are too long: they are stored in the cache's displayName, which "
                f"holds 128 characters, and would need {length}. Use fewer or shorter tags."
            )
        return self

    # -- state -----------------------------------------------------------------------------

    @property
    def cache_name(self) -> str | None:
        """The cache in use (`cachedContents/...`), once prepared."""
        return self._cache_name

    def _load_documents(self) -> list[str]:
        documents = list(self.cached_documents)
        for raw in self.cached_document_paths:
            path = Path(raw).expanduser()
            try:
                documents.append(path.read_text(encoding="utf-8"))
            except OSError as exc:
                where = "" if path.is_absolute() else f" (relative to {os.getcwd()!r})"
                raise PermanentError(
                    f"Cannot read cached document {str(path)!r}{where}: "
                    f"{exc.strerror or exc}. Fix cached_document_paths: paths are read where "
                    "the flow runs, relative ones from the flow run's working directory."
                ) from exc
        return documents

    def _compute_fingerprint(self) -> str:
        canonical = json.dumps(
            {
                "model": self.model.removeprefix("models/"),
                "system_instruction": self.system_instruction,
                "documents": self._documents,
            },
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def _remaining(self) -> float:
        return -1.0 if self._expires_at is None else self._expires_at - self._clock()

    def _adopt(self, cache: types.CachedContent) -> None:
        self._cache_name = cache.name
        self._expires_at = cache.expire_time.timestamp() if cache.expire_time else None
        key = (self.credentials.endpoint(), cache.name) if cache.name else None
        cache_users.move(self._used_key, key, self._uses)
        self._used_key = key

    def _lock_for_cache(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # -- finding, creating, renewing -------------------------------------------------------

    async def _matching_caches(self) -> list[types.CachedContent]:
        wanted_model = self.model.removeprefix("models/")
        pager = await self.client().aio.caches.list(
            config=types.ListCachedContentsConfig(page_size=100)
        )
        found: list[types.CachedContent] = []
        async for cache in pager:
            parsed = parse_display_name(cache.display_name)
            if parsed is None or (cache.model or "").removeprefix("models/") != wanted_model:
                continue
            if parsed == (self._fingerprint, self.cache_tags):
                found.append(cache)
        return found

    async def _create(self) -> None:
        contents = [
            types.Content(role="user", parts=[types.Part(text=document)])
            for document in self._documents
        ]
        try:
            created = await self.client().aio.caches.create(
                model=self.model,
                config=types.CreateCachedContentConfig(
                    contents=contents or None,
                    system_instruction=self.system_instruction,
                    ttl=f"{self.cache_ttl_seconds}s",
                    display_name=display_name(self._fingerprint, self.cache_tags),
                ),
            )
        except genai_errors.ClientError as exc:
            if exc.code == 400 and "too small" in (exc.message or "").lower():
                if self.fallback_to_uncached:
                    logger.warning(
                        "Cached content for %s is below the minimum cache size; calling "
                        "uncached (fallback_to_uncached=True): every call pays full price.",
                        self.model,
                    )
                    self._uncached = True
                    return
                raise PermanentError(
                    f"Gemini refused to cache the content: {exc.message} Add content to reach "
                    "the model's minimum cache size, or set fallback_to_uncached=True."
                ) from exc
            raise
        # Another flow may have created the same cache at the same moment: converge on the
        # oldest matching cache and delete ours if it lost.
        matches = await self._matching_caches()
        winner = min(
            matches or [created],
            key=lambda c: (c.create_time.timestamp() if c.create_time else 0.0, c.name or ""),
        )
        if winner.name != created.name and created.name:
            logger.info("Another run created the same cache first; using %s", winner.name)
            await self._delete_quietly(created.name)
        self._adopt(winner)
        logger.info(
            "Created Gemini cache %s (TTL %ss, fingerprint %s)",
            self._cache_name,
            self.cache_ttl_seconds,
            self._fingerprint,
        )

    async def _find_or_create(self) -> None:
        live = [
            cache
            for cache in await self._matching_caches()
            if cache.expire_time is not None and cache.expire_time.timestamp() > self._clock()
        ]
        if not live:
            await self._create()
            return
        oldest = min(live, key=lambda c: c.create_time.timestamp() if c.create_time else 0.0)
        self._adopt(oldest)
        logger.info(
            "Reusing Gemini cache %s (expires in %.0fs)", self._cache_name, self._remaining()
        )
        if self.auto_renew and self._remaining() <= self.cache_renewal_buffer_seconds:
            await self._renew()

    async def _renew(self) -> None:
        """Extend the cache by its TTL; re-create it if the server no longer has it."""
        if self._cache_name is None:
            await self._find_or_create()
            return
        try:
            updated = await self.client().aio.caches.update(
                name=self._cache_name,
                config=types.UpdateCachedContentConfig(ttl=f"{self.cache_ttl_seconds}s"),
            )
        except genai_errors.ClientError as exc:
            if exc.code not in (403, 404):
                raise
            logger.info("Gemini cache %s is gone; creating a new one", self._cache_name)
            self._cache_name = self._expires_at = None
            await self._find_or_create()
            return
        self._adopt(updated)
        logger.info("Renewed Gemini cache %s for %ss", self._cache_name, self.cache_ttl_seconds)

    async def _delete_quietly(self, name: str) -> None:
        try:
            await self.client().aio.caches.delete(name=name)
        except genai_errors.ClientError as exc:
            if exc.code not in (403, 404):
                raise

    # -- strategy hooks --------------------------------------------------------------------

    async def prepare(self) -> None:
        await super().prepare()
        self._documents = self._load_documents()
        self._fingerprint = self._compute_fingerprint()
        async with self._lock_for_cache():
            await self._find_or_create()
            # Counted per prepare(): an instance shared by two processors is two uses.
            self._uses += 1
            cache_users.move(None, self._used_key, 1)

    async def prepare_counting(self) -> None:
        """The client and the documents to cache; no cache is looked up or created."""
        await super().prepare_counting()
        self._documents = self._load_documents()

    async def count_tokens(self, prompt: Any) -> TokenUsage | None:
        """The prompt's tokens plus the cached content's, which calls read from the cache.

        The cached content (documents and system instruction) is counted once, as contents,
        without creating a cache: the projection assumes the cache works (a content below the
        model's minimum cache size with `fallback_to_uncached` is billed as without a cache).
        """
        usage = await super().count_tokens(prompt)
        assert usage is not None
        return TokenUsage(
            input_tokens=usage.get("input_tokens", 0),
            cached_input_tokens=await self.count_fixed_tokens(),
        )

    async def _count_fixed(self) -> int:
        """Tokens every call reads from the cache: the documents and the system instruction."""
        documents = self._documents or self._load_documents()
        contents = as_contents([*documents, self.system_instruction or ""])
        return await count_gemini_tokens(self.client(), self.model, contents) if contents else 0

    async def fresh_cache_name(self, state: RetryState | None = None) -> str | None:
        """The cache to call with now: found or created on first use, renewed when it expires
        within the buffer. None when calls fall back to uncached. Records the name in `state`
        so `on_error()` knows which cache an expired or lost cache error was about."""
        if self._uncached:
            return None
        if self._cache_name is None:
            async with self._lock_for_cache():
                if self._cache_name is None:
                    self._documents = self._documents or self._load_documents()
                    self._fingerprint = self._fingerprint or self._compute_fingerprint()
                    await self._find_or_create()
        if self.auto_renew and self._remaining() <= self.cache_renewal_buffer_seconds:
            async with self._lock_for_cache():
                if self._remaining() <= self.cache_renewal_buffer_seconds:
                    await self._renew()
        if state is not None:
            state.set(_STATE_KEY, self._cache_name)
        return self._cache_name

    async def call_arguments(
        self, prompt: Any, state: RetryState | None = None
    ) -> tuple[Any, types.GenerateContentConfig | None]:
        """The prompt with the live cache's name (renewed if it expires soon); uncached, the
        documents go before the prompt."""
        name = await self.fresh_cache_name(state)
        if name is None:
            contents: Any = [*self._documents, prompt] if isinstance(prompt, str) else prompt
            return contents, self._config()
        return prompt, self.generation_config(cached_content=name)

    async def on_error(
        self, exception: BaseException, attempt: int, state: RetryState | None = None
    ) -> None:
        await super().on_error(exception, attempt, state)
        if not is_cache_expired(exception):
            return
        failed = state.get(_STATE_KEY) if state is not None else self._cache_name
        async with self._lock_for_cache():
            if failed is not None and failed != self._cache_name:
                return  # another worker already replaced it
            logger.warning(
                "Gemini cache %s expired or is gone on the server; finding or creating it again",
                failed,
            )
            self._cache_name = self._expires_at = None
            await self._find_or_create()

    async def cleanup(self) -> None:
        uses, self._uses = min(self._uses, 1), max(0, self._uses - 1)
        delete, others = cache_users.release(
            self._used_key, uses, delete=self.delete_cache_on_cleanup
        )
        if delete:
            await self.delete_cache()
        elif self.delete_cache_on_cleanup and others:
            logger.info(
                "Not deleting Gemini cache %s yet: %d other user(s) in this process; the last "
                "one deletes it",
                self._cache_name,
                others,
            )
        elif self._cache_name is not None:
            logger.info(
                "Leaving Gemini cache %s for reuse (expires in %.0fs)",
                self._cache_name,
                self._remaining(),
            )
        await super().cleanup()

    async def delete_cache(self) -> None:
        """Delete the cache now (one API call, however many concurrent callers).

        Unconditional: other strategy instances still using the cache re-create it on their
        next call. `delete_cache_on_cleanup=True` is the polite form: it waits for the last
        user of this process."""
        async with self._lock_for_cache():
            name, self._cache_name, self._expires_at = self._cache_name, None, None
            if name is not None:
                await self._delete_quietly(name)
                cache_users.deleted((self.credentials.endpoint(), name))
                logger.info("Deleted Gemini cache %s", name)
