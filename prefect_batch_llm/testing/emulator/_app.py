"""The emulator's HTTP layer: Gemini Developer API routes on Starlette.

`models/{m}:generateContent` and friends and `cachedContents` live here; Batch Mode
(`_batches.py`) and the Files API (`_files.py`) register their own routes. What a request is
answered with comes from `_generation.py`, shared with batch jobs.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from datetime import timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from prefect_batch_llm.testing.emulator._batches import BatchRoutes
from prefect_batch_llm.testing.emulator._files import FileRoutes
from prefect_batch_llm.testing.emulator._generation import (
    Generation,
    ResponseFn,
    service_tier,
)
from prefect_batch_llm.testing.emulator._http import (
    ApiError,
    Reply,
    check,
    done,
    error,
    read_json,
)
from prefect_batch_llm.testing.emulator._jobs import BatchFault
from prefect_batch_llm.testing.emulator._responses import pick, texts
from prefect_batch_llm.testing.emulator._state import (
    EmulatorState,
    Fault,
    count_tokens,
    parse_duration,
    parse_rfc3339,
)

__all__ = ["EmulatorApp", "ResponseFn"]


class _DroppedConnection(Response):
    """Starts a response, sends part of it, then stops: the client sees the peer close."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"candidates": [', "more_body": True})
        raise ConnectionAbortedError("emulator fault: dropped connection")


class EmulatorApp:
    """Routes bound to one `EmulatorState`."""

    def __init__(self, state: EmulatorState, response_fn: ResponseFn | None = None) -> None:
        self.state = state
        self.generation = Generation(state, response_fn)
        state.batches.runner = self.generation.batch_answer
        self.batches = BatchRoutes(state)
        self.files = FileRoutes(state)
        self.app = Starlette(
            routes=[
                Route("/_emulator/stats", self.stats, methods=["GET"]),
                Route("/_emulator/reset", self.reset, methods=["POST"]),
                Route("/_emulator/clock/advance", self.advance, methods=["POST"]),
                Route("/_emulator/faults", self.add_faults, methods=["POST"]),
                Route("/_emulator/batches/config", self.batch_config, methods=["GET", "POST"]),
                Route("/{version}/models/{target:path}", self.model_action, methods=["POST"]),
                Route("/{version}/cachedContents", self.caches, methods=["GET", "POST"]),
                Route(
                    "/{version}/cachedContents/{cache_id}",
                    self.cache,
                    methods=["GET", "PATCH", "DELETE"],
                ),
                *self.batches.routes(),
                *self.files.routes(),
                Route("/{path:path}", self.unknown, methods=["GET", "POST", "PATCH", "DELETE"]),
            ]
        )

    @property
    def response_fn(self) -> ResponseFn | None:
        return self.generation.response_fn

    @response_fn.setter
    def response_fn(self, fn: ResponseFn | None) -> None:
        self.generation.response_fn = fn

    # -- plumbing ------------------------------------------------------------------------

    def _done(self, endpoint: str, model: str | None, response: Response) -> Response:
        return done(self.state, endpoint, model, response)

    async def unknown(self, request: Request) -> Response:
        path = request.url.path
        return self._done("unknown", None, error(404, f"The emulator does not serve {path}."))

    # -- /_emulator ----------------------------------------------------------------------

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.state.stats())

    async def reset(self, request: Request) -> Response:
        self.state.reset_counters()
        return JSONResponse({})

    async def advance(self, request: Request) -> Response:
        body = await request.json()
        self.state.clock.advance(float(body.get("seconds", 0)))
        return JSONResponse({"clock": self.state.stats()["clock"]})

    async def add_faults(self, request: Request) -> Response:
        """`{"faults": [Fault...], "batch_faults": [BatchFault...]}`."""
        body = await request.json()
        faults = [Fault.model_validate(f) for f in body.get("faults", [])]
        batch_faults = [BatchFault.model_validate(f) for f in body.get("batch_faults", [])]
        with self.state.lock:
            self.state.faults.extend(faults)
            self.state.batches.faults.extend(batch_faults)
            counts = {
                "faults": len(self.state.faults),
                "batch_faults": len(self.state.batches.faults),
            }
        return JSONResponse(counts)

    async def batch_config(self, request: Request) -> Response:
        """GET or POST `{"queued_seconds", "pending_seconds", "running_seconds",
        "expire_after_seconds", "inline_limit_bytes"}` (POST sets those given)."""
        store = self.state.batches
        if request.method == "POST":
            body = await request.json()
            with self.state.lock:
                for name in ("queued_seconds", "pending_seconds", "running_seconds"):
                    if name in body:
                        setattr(store, name, float(body[name]))
                if "expire_after_seconds" in body:
                    store.expire_after = timedelta(seconds=float(body["expire_after_seconds"]))
                if "inline_limit_bytes" in body:
                    store.inline_limit_bytes = int(body["inline_limit_bytes"])
        return JSONResponse(
            {
                "queued_seconds": store.queued_seconds,
                "pending_seconds": store.pending_seconds,
                "running_seconds": store.running_seconds,
                "expire_after_seconds": store.expire_after.total_seconds(),
                "inline_limit_bytes": store.inline_limit_bytes,
            }
        )

    # -- models/{model}:{action} ---------------------------------------------------------

    async def model_action(self, request: Request) -> Response:
        model, _, action = request.path_params["target"].rpartition(":")
        endpoint = action or "unknown"
        try:
            check(self.state, request)
            if action in ("generateContent", "streamGenerateContent"):
                return await self._generate(request, model, stream=action != "generateContent")
            if action == "batchGenerateContent":
                return await self.batches.create(request, model)
            if action == "countTokens":
                body = await read_json(request)
                contents = body.get("contents") or pick(
                    pick(body, "generateContentRequest"), "contents"
                )
                total = sum(count_tokens(t) for t in texts(contents or []))
                details = [{"modality": "TEXT", "tokenCount": total}]
                payload = {"totalTokens": total, "promptTokensDetails": details}
                return self._done(endpoint, model, JSONResponse(payload))
            raise Reply(error(404, f"Method {action!r} not found for models/{model}."))
        except Reply as reply:
            return self._done(endpoint, model, reply.response)

    async def _generate(self, request: Request, model: str, *, stream: bool) -> Response:
        endpoint = "streamGenerateContent" if stream else "generateContent"
        state = self.state
        body = await read_json(request)
        tier = service_tier(body)
        call_number = state.next_generate_call()
        if tier == "flex":
            with state.lock:
                state.flex_calls += 1
        if state.latency or state.latency_jitter:
            await asyncio.sleep(state.latency + random.uniform(0, state.latency_jitter))
        try:
            prepared = self.generation.prepare(model, body)
            wait = state.check_quota(prepared.prompt_tokens)
            if wait is not None:
                delay = math.ceil(wait)
                raise ApiError(
                    429,
                    "You exceeded your current quota, please check your plan and billing details.",
                    details=[
                        {
                            "@type": "type.googleapis.com/google.rpc.RetryInfo",
                            "retryDelay": f"{delay}s",
                        }
                    ],
                    headers={"Retry-After": str(delay)},
                )
            fault = state.pick_fault(call_number, prepared.prompt, tier)
            if fault is not None:
                early = await self._transport_fault(fault)
                if early is not None:
                    return self._done(endpoint, model, early)
            response_id = f"emu-{call_number}"
            generated = self.generation.complete(
                prepared,
                fault,
                tier,
                response_id,
                api_key=request.headers.get("x-goog-api-key", ""),
                version=request.path_params.get("version", "v1beta"),
            )
        except ApiError as failure:
            raise Reply(failure.response()) from None
        # The hosted API names the tier that served the call in this header.
        headers: dict[str, str] = {"x-gemini-service-tier": tier}
        if not stream or generated.candidate is None:
            return self._done(endpoint, model, JSONResponse(generated.payload, headers=headers))
        streamed = self._stream(generated.candidate, generated.usage, model, response_id, headers)
        return self._done(endpoint, model, streamed)

    @staticmethod
    async def _transport_fault(fault: Fault) -> Response | None:
        """Faults of the HTTP exchange itself (`slow` waits, then answers normally)."""
        if fault.kind == "502_html":
            html = (
                "<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>"
            )
            return Response(html, status_code=502, media_type="text/html")
        if fault.kind == "malformed_json":
            return Response('{"candidates": [{"content": ', media_type="application/json")
        if fault.kind == "drop":
            return _DroppedConnection()
        if fault.kind == "slow":
            await asyncio.sleep(fault.delay)
        return None

    @staticmethod
    def _stream(
        candidate: dict[str, Any],
        usage: dict[str, Any],
        model: str,
        response_id: str,
        headers: dict[str, str],
    ) -> Response:
        part = candidate["content"]["parts"][0]
        if part.get("text"):
            text = part["text"]
            step = max(1, math.ceil(len(text) / 3))
            pieces = [text[i : i + step] for i in range(0, len(text), step)]
        else:
            pieces = [None]
        frames: list[bytes] = []
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            chunk_part = part if piece is None else {"text": piece}
            chunk: dict[str, Any] = {
                "candidates": [
                    {
                        "content": {"parts": [chunk_part], "role": "model"},
                        "index": 0,
                        **({"finishReason": candidate["finishReason"]} if last else {}),
                        "safetyRatings": candidate["safetyRatings"],
                    }
                ],
                "modelVersion": model,
                "responseId": response_id,
            }
            if last:
                chunk["usageMetadata"] = usage
            frames.append(f"data: {json.dumps(chunk)}\r\n\r\n".encode())

        async def body() -> Any:
            for frame in frames:
                yield frame

        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    # -- cachedContents ------------------------------------------------------------------

    async def caches(self, request: Request) -> Response:
        endpoint = "cachedContents.create" if request.method == "POST" else "cachedContents.list"
        try:
            check(self.state, request)
            if request.method == "GET":
                return self._done(endpoint, None, self._list(request))
            body = await read_json(request)
            model = str(body.get("model") or "")
            if not model:
                raise Reply(error(400, "model is required to create cached content."))
            display_name = pick(body, "displayName")
            if display_name is not None and len(display_name) > 128:
                raise Reply(error(400, "displayName must be at most 128 characters."))
            contents = body.get("contents") or []
            system = pick(body, "systemInstruction")
            tools = body.get("tools")
            tokens = sum(count_tokens(t) for t in texts(contents) + texts(system))
            if tools:
                tokens += count_tokens(json.dumps(tools))
            if tokens < self.state.min_cache_tokens:
                raise Reply(
                    error(
                        400,
                        f"Cached content is too small. total_token_count={tokens}, "
                        f"min_total_token_count={self.state.min_cache_tokens}",
                    )
                )
            ttl, expire = self._expiry(body)
            cache = self.state.create_cache(
                model, contents, system, tools, display_name, tokens, ttl, expire
            )
            return self._done(endpoint, model, JSONResponse(cache.resource()))
        except Reply as reply:
            return self._done(endpoint, None, reply.response)

    def _list(self, request: Request) -> Response:
        try:
            size = int(request.query_params.get("pageSize", "100"))
            start = int(request.query_params.get("pageToken", "0") or 0)
        except ValueError:
            return error(400, "pageSize and pageToken must be integers.")
        size = max(1, min(size, 1000))
        caches = self.state.list_caches()
        page = caches[start : start + size]
        body: dict[str, Any] = {"cachedContents": [c.resource() for c in page]}
        if start + size < len(caches):
            body["nextPageToken"] = str(start + size)
        return JSONResponse(body)

    @staticmethod
    def _expiry(body: dict[str, Any]) -> tuple[float | None, Any]:
        try:
            ttl = pick(body, "ttl")
            expire = pick(body, "expireTime")
            return (
                parse_duration(ttl) if ttl is not None else None,
                parse_rfc3339(expire) if expire is not None else None,
            )
        except ValueError as exc:
            raise Reply(error(400, f"Invalid ttl or expireTime: {exc}")) from None

    async def cache(self, request: Request) -> Response:
        name = f"cachedContents/{request.path_params['cache_id']}"
        method = request.method
        endpoint = {"GET": "get", "PATCH": "update", "DELETE": "delete"}[method]
        endpoint = f"cachedContents.{endpoint}"
        try:
            check(self.state, request)
            if method == "GET":
                cache = self.state.get_cache(name)
                if cache is None:
                    raise Reply(error(404, f"CachedContent not found: {name}."))
                return self._done(endpoint, cache.model, JSONResponse(cache.resource()))
            if method == "DELETE":
                if not self.state.delete_cache(name):
                    raise Reply(error(404, f"CachedContent not found: {name}."))
                return self._done(endpoint, None, JSONResponse({}))
            body = await read_json(request)
            ttl, expire = self._expiry(body)
            updated = self.state.update_cache(name, ttl, expire)
            if updated is None:
                raise Reply(error(404, f"CachedContent not found: {name}."))
            return self._done(endpoint, updated.model, JSONResponse(updated.resource()))
        except Reply as reply:
            return self._done(endpoint, None, reply.response)
