"""`GeminiCredentials`: the API key block, and the one shared client per key per event loop."""

from __future__ import annotations

import asyncio
import hashlib
import os
import weakref

import httpx2
from google import genai
from google.genai import types
from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr

from prefect_batch_llm._links import LOGO_URL, docs_page
from prefect_batch_llm._secrets import register_secret
from prefect_batch_llm.errors import PermanentError

_ENV_KEYS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")

# One client per (credentials fingerprint) per event loop: google-genai's async connection
# pool is bound to the loop that first used it. Entries vanish with their loop.
_clients_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, genai.Client]]
_clients_by_loop = weakref.WeakKeyDictionary()
_clients_without_loop: dict[str, genai.Client] = {}
# How many prepared strategies use each client: the last release closes it. An async client
# left to the garbage collector can close a socket whose descriptor a new connection reuses.
_users: weakref.WeakKeyDictionary[genai.Client, int] = weakref.WeakKeyDictionary()


class MissingAPIKeyError(PermanentError, ValueError):
    """Neither the credentials block nor the environment has an API key."""


class GeminiCredentials(Block):
    """An API key for the Gemini Developer API, and where to send requests.

    `get_client()` returns one shared `google.genai.Client` per credentials per event loop,
    with the SDK's own retries off (the processor's classifier owns retries) and an explicit
    timeout. Strategies acquire it in `prepare()` and release it in `cleanup()`; the last
    release closes it. Close a client you got yourself with `aclose()`. When `api_key` is
    empty, `GEMINI_API_KEY` or `GOOGLE_API_KEY` is read from the environment of the process
    that uses the block.

    Example:
        ```python
        from prefect_batch_llm.gemini import GeminiCredentials

        gemini_credentials = GeminiCredentials.load("BLOCK_NAME")
        client = gemini_credentials.get_client()
        ```
    """

    _block_type_name = "Gemini Credentials"
    _logo_url = HttpUrl(LOGO_URL)
    _documentation_url = HttpUrl(docs_page("guides/gemini/"))
    _description = "An API key for the Gemini Developer API (or a local Gemini emulator)."
    _code_example = """
```python
from prefect_batch_llm.gemini import GeminiCredentials

gemini_credentials = GeminiCredentials.load("BLOCK_NAME")
client = gemini_credentials.get_client()
```
"""

    api_key: SecretStr | None = Field(
        default=None,
        description="Gemini API key; when empty, GEMINI_API_KEY or GOOGLE_API_KEY is used.",
    )
    base_url: str | None = Field(
        default=None,
        description="Endpoint override, e.g. a local emulator at http://127.0.0.1:8765.",
    )
    api_version: str = Field(default="v1beta", description="API version path: v1beta or v1.")
    timeout_seconds: float = Field(
        default=120.0, gt=0, description="Timeout of one HTTP request, in seconds."
    )
    max_connections: int = Field(
        default=100, ge=1, description="Connection pool size of the shared client."
    )

    def resolved_api_key(self) -> str:
        """The key to send: the block's, else the environment's.

        Raises:
            MissingAPIKeyError: (a `PermanentError` and a `ValueError`) when there is none,
                saying where to put one; not retried.
        """
        if self.api_key is not None and self.api_key.get_secret_value():
            register_secret(self.api_key.get_secret_value())
            return self.api_key.get_secret_value()
        for name in _ENV_KEYS:
            value = os.environ.get(name)
            if value:
                register_secret(value)
                return value
        raise MissingAPIKeyError(
            "No Gemini API key: set GeminiCredentials(api_key=...) or the GEMINI_API_KEY "
            "environment variable of the process that runs the flow."
        )

    def _fingerprint(self) -> str:
        raw = "\x1f".join(
            [
                self.resolved_api_key(),
                self.base_url or "",
                self.api_version,
                repr(self.timeout_seconds),
                str(self.max_connections),
            ]
        )
        return hashlib.sha256(raw.encode()).hexdigest()

    def _new_client(self) -> genai.Client:
        limits = httpx2.Limits(
            max_connections=self.max_connections,
            max_keepalive_connections=min(self.max_connections, 100),
        )
        options = types.HttpOptions(
            base_url=self.base_url,
            api_version=self.api_version,
            timeout=int(self.timeout_seconds * 1000),
            retry_options=types.HttpRetryOptions(attempts=1),
            async_client_args={"limits": limits},
        )
        return genai.Client(api_key=self.resolved_api_key(), http_options=options)

    def _registry(self) -> dict[str, genai.Client]:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return _clients_without_loop
        return _clients_by_loop.setdefault(loop, {})

    def get_client(self) -> genai.Client:
        """The shared `genai.Client` for these credentials on the running event loop."""
        registry = self._registry()
        key = self._fingerprint()
        client = registry.get(key)
        if client is None:
            client = registry[key] = self._new_client()
        return client

    def acquire_client(self) -> genai.Client:
        """`get_client()`, counted: pair with `release_client()` (strategies do, in prepare and
        cleanup), so the shared client is closed when its last user is done."""
        client = self.get_client()
        _users[client] = _users.get(client, 0) + 1
        return client

    async def release_client(self) -> None:
        """One user is done with the shared client; the last one closes it."""
        client = self._registry().get(self._fingerprint())
        if client is None:
            return
        remaining = _users.get(client, 0) - 1
        _users[client] = max(0, remaining)
        if remaining <= 0:
            await self.aclose()

    async def aclose(self) -> None:
        """Close this event loop's client for these credentials (a later call makes a new one)."""
        client = self._registry().pop(self._fingerprint(), None)
        if client is not None:
            _users.pop(client, None)
            await client.aio.aclose()

    def endpoint(self) -> str:
        """Where requests go (for logs and rate-limit scopes; never includes the key)."""
        return self.base_url or "https://generativelanguage.googleapis.com"
