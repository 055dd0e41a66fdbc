"""`GeminiEmulator`: a local Gemini API server on 127.0.0.1, in-process or as a command."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

import uvicorn

from prefect_batch_llm.testing.emulator._app import EmulatorApp, ResponseFn
from prefect_batch_llm.testing.emulator._jobs import BatchFault
from prefect_batch_llm.testing.emulator._state import EmulatorClock, EmulatorState, Fault


class GeminiEmulator:
    """A wire-faithful Gemini Developer API on loopback, for tests, demos and benchmarks.

    The real `google-genai` and `pydantic-ai` clients talk to it over HTTP. It serves
    `models/{m}:generateContent`, `:streamGenerateContent?alt=sse`, `:countTokens` and
    `cachedContents` create/get/list/update/delete, Batch Mode
    (`models/{m}:batchGenerateContent`, `batches` get/list/cancel/delete) and the Files API
    (resumable upload, get/list/delete/download) under `/v1`, `/v1beta` and `/v1alpha`,
    requires an `x-goog-api-key` header, bills tokens at list prices (Batch Mode and the
    Flex tier, `serviceTier: flex`, at 50% under their own price paths) and can inject faults.

    Batch jobs run on the emulator's clock: queued for `batch_queued_seconds`, then
    `BATCH_STATE_PENDING` for `batch_pending_seconds`, `BATCH_STATE_RUNNING` for
    `batch_running_seconds`, then done; a job not done 48 hours after creation expires.
    `emulator.clock.advance(seconds)` makes a job take hours instantly.

    Token rule: one token per 4 characters of text, rounded up, per part. Outputs are a
    pure function of model and prompt unless `response_fn` says otherwise.

    Example:
        ```python
        from google import genai
        from prefect_batch_llm.testing import GeminiEmulator, Fault

        with GeminiEmulator(latency=0.05, faults=[Fault(kind="429", times=1)]) as emulator:
            client = genai.Client(api_key="test-key",
                                  http_options={"base_url": emulator.base_url})
            ...
            print(emulator.stats()["billed"])
        ```

    Args:
        host: Interface to bind (loopback by default).
        port: Port to bind; 0 picks a free one.
        api_keys: Accepted keys; None accepts any non-empty key.
        latency: Seconds added to every generate call.
        latency_jitter: Up to this many random extra seconds.
        rpm: Requests-per-minute quota (sliding minute); beyond it, 429 with RetryInfo.
        tpm: Tokens-per-minute quota (prompt tokens), same answer.
        min_cache_tokens: Smallest cacheable content (Flash's 1,024 by default).
        faults: Scripted failures, see [`Fault`][prefect_batch_llm.testing.Fault].
        response_fn: `fn(model, prompt, request_body)` returning text, a JSON value for
            JSON/function-call requests, or None for the default answer.
        batch_faults: Scripted Batch Mode job failures, see `BatchFault`.
        batch_queued_seconds: Emulated seconds a new job is `JOB_STATE_QUEUED` (0: never).
        batch_pending_seconds: Emulated seconds a job is `BATCH_STATE_PENDING`.
        batch_running_seconds: Emulated seconds a job is `BATCH_STATE_RUNNING`.
        batch_inline_limit_bytes: Largest `batchGenerateContent` body (20 MB, the API's).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: Iterable[str] | None = None,
        latency: float = 0.0,
        latency_jitter: float = 0.0,
        rpm: int | None = None,
        tpm: int | None = None,
        min_cache_tokens: int = 1024,
        faults: Iterable[Fault] = (),
        response_fn: ResponseFn | None = None,
        batch_faults: Iterable[BatchFault] = (),
        batch_queued_seconds: float = 0.0,
        batch_pending_seconds: float = 1.0,
        batch_running_seconds: float = 2.0,
        batch_inline_limit_bytes: int = 20 * 1024 * 1024,
    ) -> None:
        self.state = EmulatorState(
            api_keys=set(api_keys) if api_keys is not None else None,
            min_cache_tokens=min_cache_tokens,
            latency=latency,
            latency_jitter=latency_jitter,
            rpm=rpm,
            tpm=tpm,
            faults=list(faults),
        )
        batches = self.state.batches
        batches.faults = list(batch_faults)
        batches.queued_seconds = batch_queued_seconds
        batches.pending_seconds = batch_pending_seconds
        batches.running_seconds = batch_running_seconds
        batches.inline_limit_bytes = batch_inline_limit_bytes
        self._host, self._port = host, port
        self._app = EmulatorApp(self.state, response_fn)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def clock(self) -> EmulatorClock:
        """The emulator's clock; `clock.advance(seconds)` fast-forwards cache expiry, batch
        jobs and file expiry."""
        return self.state.clock

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`, for `HttpOptions(base_url=...)`."""
        if self._socket is None:
            raise RuntimeError("The emulator is not running: use it as a context manager.")
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def response_fn(self) -> ResponseFn | None:
        """`fn(model, prompt, request_body)` answering instead of the default (settable)."""
        return self._app.response_fn

    @response_fn.setter
    def response_fn(self, fn: ResponseFn | None) -> None:
        self._app.response_fn = fn

    def stats(self) -> dict[str, Any]:
        """Calls by endpoint/model/status; caches, batch jobs and files created/live; billed
        tokens and cost per price path (`billed`: online standard tier and cache storage;
        `billed_by_path`: `standard`, `flex`, `batch`)."""
        return self.state.stats()

    def add_fault(self, fault: Fault) -> None:
        with self.state.lock:
            self.state.faults.append(fault)

    def add_batch_fault(self, fault: BatchFault) -> None:
        with self.state.lock:
            self.state.batches.faults.append(fault)

    def configure_batches(
        self,
        *,
        queued_seconds: float | None = None,
        pending_seconds: float | None = None,
        running_seconds: float | None = None,
        inline_limit_bytes: int | None = None,
    ) -> None:
        """Change how long jobs created from now on stay in each state, or the inline limit."""
        batches = self.state.batches
        with self.state.lock:
            if queued_seconds is not None:
                batches.queued_seconds = queued_seconds
            if pending_seconds is not None:
                batches.pending_seconds = pending_seconds
            if running_seconds is not None:
                batches.running_seconds = running_seconds
            if inline_limit_bytes is not None:
                batches.inline_limit_bytes = inline_limit_bytes

    def reset(self) -> None:
        """Zero the counters and billing (caches, jobs, files and faults stay)."""
        self.state.reset_counters()

    def start(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self._socket = sock
        config = uvicorn.Config(
            self._app.app,
            log_level="critical",
            lifespan="off",
            timeout_graceful_shutdown=1,
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="gemini-emulator", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("The Gemini emulator did not start.")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
