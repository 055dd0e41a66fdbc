"""The emulator's HTTP layer: Gemini Developer API routes on Starlette."""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from prefect_batch_llm.testing.emulator._responses import (
    default_answer,
    forced_function,
    instance_for,
    last_user_text,
    pick,
    response_schema,
    texts,
)
from prefect_batch_llm.testing.emulator._state import (
    EmulatorState,
    Fault,
    count_tokens,
    parse_duration,
    parse_rfc3339,
)

#: `response_fn(model, prompt, request_body)` -> text, a JSON value, or None for the default.
ResponseFn = Callable[[str, str, dict[str, Any]], Any]

_VERSIONS = {"v1", "v1beta", "v1alpha"}
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_SAFE_RATINGS = [
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"},
]


class _Reply(Exception):
    """Raised inside a handler to answer with an error envelope (or any response)."""

    def __init__(self, response: Response) -> None:
        self.response = response


def error(
    code: int,
    message: str,
    *,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Google's error envelope."""
    body: dict[str, Any] = {
        "error": {"code": code, "message": message, "status": _STATUS.get(code, "UNKNOWN")}
    }
    if details:
        body["error"]["details"] = details
    return JSONResponse(body, status_code=code, headers=headers)


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
        self.response_fn = response_fn
        self.app = Starlette(
            routes=[
                Route("/_emulator/stats", self.stats, methods=["GET"]),
                Route("/_emulator/reset", self.reset, methods=["POST"]),
                Route("/_emulator/clock/advance", self.advance, methods=["POST"]),
                Route("/_emulator/faults", self.add_faults, methods=["POST"]),
                Route("/{version}/models/{target:path}", self.model_action, methods=["POST"]),
                Route("/{version}/cachedContents", self.caches, methods=["GET", "POST"]),
                Route(
                    "/{version}/cachedContents/{cache_id}",
                    self.cache,
                    methods=["GET", "PATCH", "DELETE"],
                ),
                Route("/{path:path}", self.unknown, methods=["GET", "POST", "PATCH", "DELETE"]),
            ]
        )

    # -- plumbing ------------------------------------------------------------------------

    def _check(self, request: Request) -> None:
        if request.path_params.get("version") not in _VERSIONS:
            raise _Reply(error(404, f"Unknown API version {request.path_params.get('version')}"))
        key = request.headers.get("x-goog-api-key")
        if not key:
            raise _Reply(
                error(403, "Method doesn't allow unregistered callers. Send x-goog-api-key.")
            )
        if self.state.api_keys is not None and key not in self.state.api_keys:
            raise _Reply(error(401, "API key not valid. Please pass a valid API key."))

    async def _json(self, request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _Reply(error(400, f"Invalid JSON payload received. {exc}")) from None
        if not isinstance(body, dict):
            raise _Reply(error(400, "Invalid JSON payload received. Expected an object."))
        return body

    def _done(self, endpoint: str, model: str | None, response: Response) -> Response:
        self.state.record_call(endpoint, model, response.status_code)
        return response

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
        body = await request.json()
        faults = [Fault.model_validate(f) for f in body.get("faults", [])]
        with self.state.lock:
            self.state.faults.extend(faults)
        return JSONResponse({"faults": len(self.state.faults)})

    # -- models/{model}:{action} ---------------------------------------------------------

    async def model_action(self, request: Request) -> Response:
        model, _, action = request.path_params["target"].rpartition(":")
        endpoint = action or "unknown"
        try:
            self._check(request)
            if action in ("generateContent", "streamGenerateContent"):
                return await self._generate(request, model, stream=action != "generateContent")
            if action == "countTokens":
                body = await self._json(request)
                contents = body.get("contents") or pick(
                    pick(body, "generateContentRequest"), "contents"
                )
                total = sum(count_tokens(t) for t in texts(contents or []))
                details = [{"modality": "TEXT", "tokenCount": total}]
                payload = {"totalTokens": total, "promptTokensDetails": details}
                return self._done(endpoint, model, JSONResponse(payload))
            raise _Reply(error(404, f"Method {action!r} not found for models/{model}."))
        except _Reply as reply:
            return self._done(endpoint, model, reply.response)

    async def _generate(self, request: Request, model: str, *, stream: bool) -> Response:
        endpoint = "streamGenerateContent" if stream else "generateContent"
        state = self.state
        body = await self._json(request)
        contents: list[dict[str, Any]] = body.get("contents") or []
        prompt = last_user_text(contents)
        call_number = state.next_generate_call()
        if state.latency or state.latency_jitter:
            await asyncio.sleep(state.latency + random.uniform(0, state.latency_jitter))

        cache_name = pick(body, "cachedContent")
        cached_tokens = 0
        cache_contents: list[dict[str, Any]] = []
        if cache_name:
            cache_id = str(cache_name).rsplit("/", 1)[-1]
            full_name = f"cachedContents/{cache_id}"
            cache = state.get_cache(full_name)
            if cache is None and full_name in state.expired:
                raise _Reply(error(400, f"Cache content {cache_id} is expired."))
            if cache is None:
                raise _Reply(error(404, f"CachedContent not found: {full_name}."))
            if cache.model.removeprefix("models/") != model.removeprefix("models/"):
                raise _Reply(
                    error(400, f"Model {model} does not match the cache's model {cache.model}.")
                )
            if any(pick(body, k) for k in ("systemInstruction", "tools", "toolConfig")):
                raise _Reply(
                    error(
                        400,
                        "CachedContent can not be used with GenerateContent request setting "
                        "system_instruction, tools or tool_config.\n\nProposed fix: move those "
                        "values to CachedContent from GenerateContent request.",
                    )
                )
            cached_tokens = cache.tokens
            cache_contents = cache.contents

        own_text = texts(contents) + texts(pick(body, "systemInstruction"))
        own_tokens = sum(count_tokens(t) for t in own_text)
        if body.get("tools"):
            own_tokens += count_tokens(json.dumps(body["tools"]))
        prompt_tokens = own_tokens + cached_tokens

        wait = state.check_quota(prompt_tokens)
        if wait is not None:
            delay = math.ceil(wait)
            raise _Reply(
                error(
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
            )

        fault = state.pick_fault(call_number, prompt)
        if fault is not None:
            early = await self._fault(fault, model, prompt_tokens, cached_tokens, request)
            if early is not None:
                return self._done(endpoint, model, early)

        config = pick(body, "generationConfig") or {}
        payload = self._answer(model, prompt, body, config, cache_contents, fault)
        candidate = payload["candidate"]
        output_tokens = payload["output_tokens"]
        thinking = pick(config, "thinkingConfig") or {}
        budget = pick(thinking, "thinkingBudget")
        thoughts = min(int(budget), 16) if isinstance(budget, int) and budget > 0 else 0
        usage: dict[str, Any] = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": prompt_tokens + output_tokens + thoughts,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
        }
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        if cached_tokens:
            usage["cachedContentTokenCount"] = cached_tokens
        state.bill(model, prompt_tokens, cached_tokens, output_tokens + thoughts)
        response_id = f"emu-{call_number}"
        if not stream:
            result = {
                "candidates": [candidate],
                "usageMetadata": usage,
                "modelVersion": model,
                "responseId": response_id,
            }
            return self._done(endpoint, model, JSONResponse(result))
        return self._done(endpoint, model, self._stream(candidate, usage, model, response_id))

    def _answer(
        self,
        model: str,
        prompt: str,
        body: dict[str, Any],
        config: dict[str, Any],
        cache_contents: list[dict[str, Any]],
        fault: Fault | None,
    ) -> dict[str, Any]:
        invalid = fault is not None and fault.kind == "invalid_output"
        custom = self.response_fn(model, prompt, body) if self.response_fn else None
        function = forced_function(body)
        schema = response_schema(config)
        seed = f"{model}|{prompt}"
        part: dict[str, Any]
        if function is not None:
            name, parameters = function
            args = {} if invalid else (custom if isinstance(custom, dict) else None)
            if args is None:
                args = instance_for(parameters, seed)
                if not isinstance(args, dict):
                    args = {"response": args}
            part = {"functionCall": {"name": name, "args": args}}
            text_for_tokens = json.dumps(args)
        else:
            if invalid:
                text = '{"unexpected": true}' if schema is not None else ""
            elif custom is not None:
                text = custom if isinstance(custom, str) else json.dumps(custom)
            elif schema is not None or pick(config, "responseMimeType") == "application/json":
                text = json.dumps(instance_for(schema or {"type": "object"}, seed))
            else:
                text = default_answer(model, prompt)
            part = {"text": text}
            text_for_tokens = text
        output_tokens = count_tokens(text_for_tokens)
        finish = "STOP"
        limit = pick(config, "maxOutputTokens")
        if isinstance(limit, int) and "text" in part and output_tokens > limit:
            part = {"text": part["text"][: limit * 4]}
            output_tokens, finish = limit, "MAX_TOKENS"
        candidate = {
            "content": {"parts": [part], "role": "model"},
            "finishReason": finish,
            "index": 0,
            "safetyRatings": _SAFE_RATINGS,
        }
        return {"candidate": candidate, "output_tokens": output_tokens}

    async def _fault(
        self,
        fault: Fault,
        model: str,
        prompt_tokens: int,
        cached_tokens: int,
        request: Request | None = None,
    ) -> Response | None:
        kind = fault.kind
        if kind in ("401", "403", "404"):
            return self._auth_fault(kind, model, request)
        if kind == "429":
            delay = fault.retry_after
            return error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                details=[
                    {
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{delay:g}s",
                    }
                ],
                headers={"Retry-After": f"{math.ceil(delay)}"}
                if fault.retry_after_header
                else None,
            )
        if kind == "500":
            return error(500, "An internal error has occurred. Please retry.")
        if kind == "503":
            return error(503, "The model is overloaded. Please try again later.")
        if kind == "504":
            return error(504, "The request timed out. Please try again.")
        if kind == "400":
            return error(400, "Request contains an invalid argument.")
        if kind == "502_html":
            html = (
                "<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>"
            )
            return Response(html, status_code=502, media_type="text/html")
        if kind == "malformed_json":
            return Response('{"candidates": [{"content": ', media_type="application/json")
        if kind == "drop":
            return _DroppedConnection()
        if kind == "slow":
            await asyncio.sleep(fault.delay)
            return None
        usage = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
        if cached_tokens:
            usage["cachedContentTokenCount"] = cached_tokens
        if kind == "safety":
            self.state.bill(model, prompt_tokens, cached_tokens, 0)
            blocked = {
                "category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                "probability": "HIGH",
                "blocked": True,
            }
            body = {
                "candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [blocked]}],
                "usageMetadata": usage,
                "modelVersion": model,
            }
            return JSONResponse(body)
        if kind == "prompt_blocked":
            self.state.bill(model, prompt_tokens, cached_tokens, 0)
            body = {
                "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                "usageMetadata": usage,
                "modelVersion": model,
            }
            return JSONResponse(body)
        return None  # invalid_output: handled while answering

    @staticmethod
    def _auth_fault(kind: str, model: str, request: Request | None) -> Response:
        """401/403/404 as the hosted API sends them (its 403 quotes the caller's API key)."""
        if kind == "401":
            return error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential. See "
                "https://developers.google.com/identity/sign-in/web/devconsole-project.",
            )
        headers = request.headers if request is not None else {}
        if kind == "403":
            consumer = f"api_key:{headers.get('x-goog-api-key', '')}"
            message = f"Permission denied: Consumer '{consumer}' has been suspended."
            return error(
                403,
                message,
                details=[
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "CONSUMER_SUSPENDED",
                        "domain": "googleapis.com",
                        "metadata": {
                            "consumer": "projects/123456789012",
                            "service": "generativelanguage.googleapis.com",
                            "containerInfo": consumer,
                        },
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                        "locale": "en-US",
                        "message": message,
                    },
                ],
            )
        version = request.path_params.get("version", "v1beta") if request is not None else "v1beta"
        name = model if model.startswith("models/") else f"models/{model}"
        return error(
            404,
            f"{name} is not found for API version {version}, or is not supported for "
            "generateContent. Call ListModels to see the list of available models and their "
            "supported methods.",
        )

    @staticmethod
    def _stream(
        candidate: dict[str, Any], usage: dict[str, Any], model: str, response_id: str
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

        return StreamingResponse(body(), media_type="text/event-stream")

    # -- cachedContents ------------------------------------------------------------------

    async def caches(self, request: Request) -> Response:
        endpoint = "cachedContents.create" if request.method == "POST" else "cachedContents.list"
        try:
            self._check(request)
            if request.method == "GET":
                return self._done(endpoint, None, self._list(request))
            body = await self._json(request)
            model = str(body.get("model") or "")
            if not model:
                raise _Reply(error(400, "model is required to create cached content."))
            display_name = pick(body, "displayName")
            if display_name is not None and len(display_name) > 128:
                raise _Reply(error(400, "displayName must be at most 128 characters."))
            contents = body.get("contents") or []
            system = pick(body, "systemInstruction")
            tools = body.get("tools")
            tokens = sum(count_tokens(t) for t in texts(contents) + texts(system))
            if tools:
                tokens += count_tokens(json.dumps(tools))
            if tokens < self.state.min_cache_tokens:
                raise _Reply(
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
        except _Reply as reply:
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
            raise _Reply(error(400, f"Invalid ttl or expireTime: {exc}")) from None

    async def cache(self, request: Request) -> Response:
        name = f"cachedContents/{request.path_params['cache_id']}"
        method = request.method
        endpoint = {"GET": "get", "PATCH": "update", "DELETE": "delete"}[method]
        endpoint = f"cachedContents.{endpoint}"
        try:
            self._check(request)
            if method == "GET":
                cache = self.state.get_cache(name)
                if cache is None:
                    raise _Reply(error(404, f"CachedContent not found: {name}."))
                return self._done(endpoint, cache.model, JSONResponse(cache.resource()))
            if method == "DELETE":
                if not self.state.delete_cache(name):
                    raise _Reply(error(404, f"CachedContent not found: {name}."))
                return self._done(endpoint, None, JSONResponse({}))
            body = await self._json(request)
            ttl, expire = self._expiry(body)
            updated = self.state.update_cache(name, ttl, expire)
            if updated is None:
                raise _Reply(error(404, f"CachedContent not found: {name}."))
            return self._done(endpoint, updated.model, JSONResponse(updated.resource()))
        except _Reply as reply:
            return self._done(endpoint, None, reply.response)
