"""`generateContent`'s answers, shared by online calls and the requests of Batch Mode jobs.

One code path decides a request's answer: its cache (and cached tokens), its tokens, the
scripted fault that hits it, its output and its billing. Online calls add latency, quota and
transport faults around it (`_app.py`); a batch job runs it for each request when the job
finishes (`_jobs.py`), turning errors into per-request `google.rpc.Status` entries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from prefect_batch_llm.testing.emulator._http import ApiError
from prefect_batch_llm.testing.emulator._jobs import BatchAnswer, BatchJob
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
    CachedContent,
    EmulatorState,
    Fault,
    count_tokens,
)

#: `response_fn(model, prompt, request_body)` -> text, a JSON value, or None for the default.
ResponseFn = Callable[[str, str, dict[str, Any]], Any]
Tier = Literal["standard", "flex", "batch"]

#: The hosted API's 503 when a model is overloaded (the 2026 wording; older answers said
#: "The model is overloaded. Please try again later."). No Flex-specific wording is
#: documented, so a shed Flex request gets this one.
HIGH_DEMAND = (
    "This model is currently experiencing high demand. Spikes in demand are usually "
    "temporary. Please try again later."
)
SAFE_RATINGS = [
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"},
]


def service_tier(body: dict[str, Any]) -> Literal["standard", "flex"]:
    """The request's tier: google-genai sends `serviceTier` at the top of the body (from
    `GenerateContentConfig(service_tier=...)`); REST examples write `service_tier: "FLEX"`."""
    tier = pick(body, "serviceTier")
    return "flex" if isinstance(tier, str) and tier.lower() == "flex" else "standard"


@dataclass
class Prepared:
    """A request with its cache resolved and its prompt tokens counted."""

    model: str
    body: dict[str, Any]
    prompt: str
    prompt_tokens: int
    cached_tokens: int
    cache_contents: list[dict[str, Any]]


@dataclass
class Generated:
    """A `GenerateContentResponse` body; `candidate` is None for a blocked prompt/answer."""

    payload: dict[str, Any]
    candidate: dict[str, Any] | None
    usage: dict[str, Any]


class Generation:
    """Answers, faults and billing of `generateContent` requests for one `EmulatorState`."""

    def __init__(self, state: EmulatorState, response_fn: ResponseFn | None = None) -> None:
        self.state = state
        self.response_fn = response_fn

    # -- the request ---------------------------------------------------------------------

    def prepare(self, model: str, body: dict[str, Any], at: datetime | None = None) -> Prepared:
        """Resolve the cache (as of `at` for a batch job, now otherwise) and count tokens."""
        contents: list[dict[str, Any]] = body.get("contents") or []
        cache_name = pick(body, "cachedContent")
        cached_tokens = 0
        cache_contents: list[dict[str, Any]] = []
        if cache_name:
            cache = self._cache(str(cache_name), model, body, at)
            cached_tokens = cache.tokens
            cache_contents = cache.contents
        own_text = texts(contents) + texts(pick(body, "systemInstruction"))
        own_tokens = sum(count_tokens(t) for t in own_text)
        if body.get("tools"):
            own_tokens += count_tokens(json.dumps(body["tools"]))
        return Prepared(
            model=model,
            body=body,
            prompt=last_user_text(contents),
            prompt_tokens=own_tokens + cached_tokens,
            cached_tokens=cached_tokens,
            cache_contents=cache_contents,
        )

    def _cache(
        self, cache_name: str, model: str, body: dict[str, Any], at: datetime | None
    ) -> CachedContent:
        state = self.state
        cache_id = cache_name.rsplit("/", 1)[-1]
        full_name = f"cachedContents/{cache_id}"
        if at is None:
            cache = state.get_cache(full_name)
        else:
            with state.lock:
                cache = state.caches.get(full_name)
                if cache is not None and cache.expire_time <= at:
                    cache = None
                    expired = True
                else:
                    expired = full_name in state.expired
            if cache is None and expired:
                raise ApiError(400, f"Cache content {cache_id} is expired.")
        if cache is None and full_name in state.expired:
            raise ApiError(400, f"Cache content {cache_id} is expired.")
        if cache is None:
            raise ApiError(404, f"CachedContent not found: {full_name}.")
        if cache.model.removeprefix("models/") != model.removeprefix("models/"):
            raise ApiError(400, f"Model {model} does not match the cache's model {cache.model}.")
        if any(pick(body, k) for k in ("systemInstruction", "tools", "toolConfig")):
            raise ApiError(
                400,
                "CachedContent can not be used with GenerateContent request setting "
                "system_instruction, tools or tool_config.\n\nProposed fix: move those "
                "values to CachedContent from GenerateContent request.",
            )
        return cache

    # -- the answer ----------------------------------------------------------------------

    def complete(
        self,
        prepared: Prepared,
        fault: Fault | None,
        tier: Tier,
        response_id: str,
        *,
        api_key: str = "",
        version: str = "v1beta",
    ) -> Generated:
        """Answer and bill under `tier`, or raise the fault's `ApiError`."""
        state = self.state
        model = prepared.model
        if fault is not None:
            failure = fault_error(fault, model, api_key, version)
            if failure is not None:
                if fault.kind == "flex_shed":
                    with state.lock:
                        state.flex_shed += 1
                raise failure
            if fault.kind in ("safety", "prompt_blocked"):
                return self._blocked(fault, prepared, tier)

        config = pick(prepared.body, "generationConfig") or {}
        candidate, output_tokens = self._answer(prepared, config, fault)
        thinking = pick(config, "thinkingConfig") or {}
        budget = pick(thinking, "thinkingBudget")
        thoughts = min(int(budget), 16) if isinstance(budget, int) and budget > 0 else 0
        prompt_tokens, cached_tokens = prepared.prompt_tokens, prepared.cached_tokens
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
        state.bill(model, prompt_tokens, cached_tokens, output_tokens + thoughts, path=tier)
        payload = {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": response_id,
        }
        return Generated(payload=payload, candidate=candidate, usage=usage)

    def _blocked(self, fault: Fault, prepared: Prepared, tier: Tier) -> Generated:
        """A safety-blocked answer or prompt: billed for the prompt, no output."""
        model, cached = prepared.model, prepared.cached_tokens
        usage: dict[str, Any] = {
            "promptTokenCount": prepared.prompt_tokens,
            "totalTokenCount": prepared.prompt_tokens,
        }
        if cached:
            usage["cachedContentTokenCount"] = cached
        self.state.bill(model, prepared.prompt_tokens, cached, 0, path=tier)
        payload: dict[str, Any]
        if fault.kind == "safety":
            blocked = {
                "category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                "probability": "HIGH",
                "blocked": True,
            }
            payload = {
                "candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [blocked]}],
                "usageMetadata": usage,
                "modelVersion": model,
            }
        else:
            payload = {
                "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                "usageMetadata": usage,
                "modelVersion": model,
            }
        return Generated(payload=payload, candidate=None, usage=usage)

    def _answer(
        self, prepared: Prepared, config: dict[str, Any], fault: Fault | None
    ) -> tuple[dict[str, Any], int]:
        model, prompt, body = prepared.model, prepared.prompt, prepared.body
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
            "safetyRatings": SAFE_RATINGS,
        }
        return candidate, output_tokens

    # -- Batch Mode ----------------------------------------------------------------------

    def batch_answer(self, job: BatchJob, index: int, at: datetime) -> BatchAnswer:
        """Request `index` of a job that finished at `at`: its response or its error."""
        model = job.model.removeprefix("models/")
        request = job.requests[index]
        response_id = f"emu-{job.name.removeprefix('batches/')}-{index}"
        try:
            prepared = self.prepare(model, request.request, at=at)
            fault = self.state.pick_fault(None, prepared.prompt, "batch")
            generated = self.complete(
                prepared, fault, "batch", response_id, api_key=job.api_key, version=job.version
            )
        except ApiError as failure:
            return "error", failure.rpc_status()
        return "response", generated.payload


def fault_error(fault: Fault, model: str, api_key: str, version: str) -> ApiError | None:
    """The error an error-kind fault answers with (None for the other kinds)."""
    kind = fault.kind
    message = fault.message
    if kind in ("401", "403", "404"):
        return auth_error(kind, model, api_key, version, message)
    if kind == "429":
        delay = fault.retry_after
        return ApiError(
            429,
            message
            or "You exceeded your current quota, please check your plan and billing details.",
            details=[
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{delay:g}s",
                }
            ],
            headers={"Retry-After": f"{math.ceil(delay)}"} if fault.retry_after_header else None,
        )
    simple = {
        "500": (500, "An internal error has occurred. Please retry."),
        "503": (503, "The model is overloaded. Please try again later."),
        "flex_shed": (503, HIGH_DEMAND),
        "504": (504, "The request timed out. Please try again."),
        "400": (400, "Request contains an invalid argument."),
    }
    if kind in simple:
        code, default = simple[kind]
        return ApiError(code, message or default)
    return None


def auth_error(
    kind: str, model: str, api_key: str, version: str, message: str | None = None
) -> ApiError:
    """401/403/404 as the hosted API sends them (its 403 quotes the caller's API key)."""
    if kind == "401":
        return ApiError(
            401,
            message
            or "Request had invalid authentication credentials. Expected OAuth 2 access token, "
            "login cookie or other valid authentication credential. See "
            "https://developers.google.com/identity/sign-in/web/devconsole-project.",
        )
    if kind == "403":
        consumer = f"api_key:{api_key}"
        text = message or f"Permission denied: Consumer '{consumer}' has been suspended."
        return ApiError(
            403,
            text,
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
                    "message": text,
                },
            ],
        )
    name = model if model.startswith("models/") else f"models/{model}"
    return ApiError(
        404,
        message
        or f"{name} is not found for API version {version}, or is not supported for "
        "generateContent. Call ListModels to see the list of available models and their "
        "supported methods.",
    )
