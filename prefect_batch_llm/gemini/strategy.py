"""`GeminiStrategy`: one `generateContent` call per attempt, as a savable block."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import Field, HttpUrl, PrivateAttr

from prefect_batch_llm._links import LOGO_URL, docs_page
from prefect_batch_llm._unknown_args import (
    GEMINI_HINTS,
    GEMINI_UNCACHED_HINTS,
)
from prefect_batch_llm.errors import ErrorClassifier, OutputValidationError
from prefect_batch_llm.gemini.credentials import GeminiCredentials
from prefect_batch_llm.gemini.errors import (
    GeminiContentBlockedError,
    GeminiEmptyResponseError,
    GeminiErrorClassifier,
)
from prefect_batch_llm.results import TokenUsage
from prefect_batch_llm.strategy import PRICE_PATH, ExecuteResult, RetryState, StrategyBlock

if TYPE_CHECKING:
    from prefect_batch_llm.batch_mode import BatchJobs

logger = logging.getLogger("prefect_batch_llm")

#: The `RetryState` key counting an item's Flex calls the service shed (503).
_FLEX_SHEDS = "gemini_flex_sheds"
#: Fields that never change an answer: how (and at what price) it is obtained.
EXECUTION_FIELDS = frozenset({"execution", "flex_fallback_after", "batch_inline_max_bytes"})

_BLOCKED_FINISH = {"SAFETY", "RECITATION", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII"}


def usage_of(response: types.GenerateContentResponse) -> TokenUsage:
    """Tokens Gemini billed: prompt (cached included), candidates + thoughts, cached."""
    meta = response.usage_metadata
    if meta is None:
        return TokenUsage()
    prompt = meta.prompt_token_count or 0
    candidates = meta.candidates_token_count or 0
    thoughts = meta.thoughts_token_count or 0
    return TokenUsage(
        input_tokens=prompt,
        output_tokens=candidates + thoughts,
        total_tokens=meta.total_token_count or prompt + candidates + thoughts,
        cached_input_tokens=meta.cached_content_token_count or 0,
        thoughts_tokens=thoughts,
    )


async def count_gemini_tokens(client: genai.Client, model: str, contents: Any) -> int:
    """Tokens of `contents` for `model`, from Gemini's free `countTokens` API."""
    response = await client.aio.models.count_tokens(model=model, contents=contents)
    return response.total_tokens or 0


def as_contents(texts: list[str]) -> list[types.Content]:
    """Texts as user contents, one part each: how a system instruction or cached documents
    are counted (the Developer API's `countTokens` takes no system instruction)."""
    return [types.Content(role="user", parts=[types.Part(text=text)]) for text in texts if text]


def _is_shed(exception: BaseException) -> bool:
    link: BaseException | None = exception
    while link is not None:
        if isinstance(link, genai_errors.APIError) and link.code == 503:
            return True
        link = link.__cause__ or link.__context__
    return False


def _name(value: Any) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


class GeminiStrategy(StrategyBlock):
    """Calls a Gemini model once per attempt through the shared client of its credentials.

    Returns the text, or the parsed JSON when `response_json_schema` is set; the token usage
    including thinking and cached tokens; and metadata (finish reason, safety ratings, model
    version). A blocked or empty answer raises a classified error carrying the billed tokens.

    Unknown arguments are refused with what to use instead (batch-llm's `client=` is
    `credentials=GeminiCredentials(...)`; its `response_parser=` is a subclass overriding
    `parse_response()`).

    Example:
        ```python
        from prefect_batch_llm.gemini import GeminiStrategy

        gemini_strategy = GeminiStrategy.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "Gemini Strategy"
    _logo_url = HttpUrl(LOGO_URL)
    _documentation_url = HttpUrl(docs_page("guides/gemini/"))
    _description = "Calls a Gemini model once per work item attempt."
    _code_example = """
```python
from prefect_batch_llm.gemini import GeminiStrategy

gemini_strategy = GeminiStrategy.load("BLOCK_NAME")
```
"""

    error_classifier: ClassVar[ErrorClassifier | None] = GeminiErrorClassifier()
    #: What to use instead of arguments these blocks do not have (see `_unknown_args`).
    _argument_hints: ClassVar[Mapping[str, str]] = {**GEMINI_HINTS, **GEMINI_UNCACHED_HINTS}

    credentials: GeminiCredentials = Field(
        default_factory=GeminiCredentials, description="API key and endpoint."
    )
    model: str = Field(default="gemini-2.5-flash", description="Gemini model name.")
    system_instruction: str | None = Field(
        default=None, description="System instruction sent with every prompt."
    )
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="Sampling temperature (model default if empty)."
    )
    max_output_tokens: int | None = Field(
        default=None, ge=1, description="Upper bound of output tokens per answer."
    )
    response_mime_type: str | None = Field(
        default=None, description="Output format, e.g. application/json."
    )
    response_json_schema: dict[str, Any] | None = Field(
        default=None, description="JSON schema the answer must follow; output is parsed JSON."
    )
    safety_settings: dict[str, str] = Field(
        default_factory=dict,
        description="Harm category to block threshold, e.g. HARM_CATEGORY_HATE_SPEECH: BLOCK_NONE.",
    )
    thinking_budget: int | None = Field(
        default=None, ge=0, description="Thinking tokens budget (0 turns thinking off)."
    )
    execution: Literal["standard", "flex", "batch"] = Field(
        default="standard",
        description="How calls are made: standard (online, full price), flex (online on the "
        "Flex tier: half price, best effort, may be shed) or batch (Gemini Batch Mode jobs: "
        "half price, results within 24 hours).",
    )
    flex_fallback_after: int = Field(
        default=2,
        ge=0,
        description="Flex: after this many shed (503) Flex calls of an item, its further "
        "attempts use the standard tier.",
    )
    batch_inline_max_bytes: int = Field(
        default=19_000_000,
        ge=0,
        description="Batch: requests up to this size go inline in the job; larger batches "
        "are uploaded as a JSONL file (the API takes at most 20 MB inline).",
    )

    fingerprint_exclude: ClassVar[frozenset[str]] = EXECUTION_FIELDS

    _client: genai.Client | None = PrivateAttr(default=None)
    _request_config: types.GenerateContentConfig | None = PrivateAttr(default=None)
    _config_built: bool = PrivateAttr(default=False)
    _fixed_tokens: int | None = PrivateAttr(default=None)
    _count_lock: asyncio.Lock | None = PrivateAttr(default=None)

    async def prepare(self) -> None:
        self._client = self.credentials.acquire_client()

    async def prepare_counting(self) -> None:
        """The shared client only (what `prepare()` of the plain strategy does, no cache)."""
        if self._client is None:
            self._client = self.credentials.acquire_client()

    async def count_tokens(self, prompt: Any) -> TokenUsage | None:
        """The prompt's tokens plus the system instruction's (counted once), by `countTokens`.

        The system instruction is counted as a content of its own, since the Developer API's
        `countTokens` takes none: Gemini may bill a few tokens more for its framing."""
        fixed = await self.count_fixed_tokens()
        own = await count_gemini_tokens(self.client(), self.model, prompt)
        return TokenUsage(input_tokens=own + fixed, cached_input_tokens=0)

    async def count_fixed_tokens(self) -> int:
        """Tokens every call sends besides its prompt, counted once (the system instruction;
        for the cached strategy, the cached content)."""
        if self._fixed_tokens is None:
            async with self._counting_lock():
                if self._fixed_tokens is None:
                    self._fixed_tokens = await self._count_fixed()
        return self._fixed_tokens

    def _counting_lock(self) -> asyncio.Lock:
        if self._count_lock is None:
            self._count_lock = asyncio.Lock()
        return self._count_lock

    async def _count_fixed(self) -> int:
        """Tokens every call sends besides the prompt: the system instruction."""
        contents = as_contents([self.system_instruction or ""])
        return await count_gemini_tokens(self.client(), self.model, contents) if contents else 0

    async def cleanup(self) -> None:
        if self._client is not None:
            self._client = None
            await self.credentials.release_client()

    def client(self) -> genai.Client:
        """The client `prepare()` took (or the shared one, if used without a processor)."""
        if self._client is None:
            self._client = self.credentials.get_client()
        return self._client

    def rate_limit_scope(self) -> str:
        return f"gemini|{self.credentials.endpoint()}|{self.model}"

    def generation_config(
        self, *, cached_content: str | None = None
    ) -> types.GenerateContentConfig | None:
        """The request config, or None when nothing is set (the SDK converts every field of a
        config on every call: ~0.5 ms of CPU per item for nothing). With a context cache, the
        system instruction lives in the cache. No per-request timeout: the processor enforces
        each attempt's timeout, and the client's timeout stays as a backstop."""
        mime = self.response_mime_type
        if self.response_json_schema is not None and mime is None:
            mime = "application/json"
        settings: dict[str, Any] = {
            "system_instruction": None if cached_content else self.system_instruction,
            "temperature": self.temperature,
            "max_output_tokens": self.max_output_tokens,
            "response_mime_type": mime,
            "response_json_schema": self.response_json_schema,
            "safety_settings": [
                types.SafetySetting(category=category, threshold=threshold)
                for category, threshold in self.safety_settings.items()
            ]
            or None,
            "thinking_config": (
                types.ThinkingConfig(thinking_budget=self.thinking_budget)
                if self.thinking_budget is not None
                else None
            ),
            "cached_content": cached_content,
        }
        settings = {key: value for key, value in settings.items() if value is not None}
        return types.GenerateContentConfig(**settings) if settings else None

    async def call_arguments(
        self, prompt: Any, state: RetryState | None = None
    ) -> tuple[Any, types.GenerateContentConfig | None]:
        """The contents and config of one call of `prompt`, online or in a batch job."""
        return prompt, self._config()

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> ExecuteResult:
        contents, config = await self.call_arguments(prompt, state)
        response = await self.client().aio.models.generate_content(
            model=self.model, contents=contents, config=self._on_tier(config, state)
        )
        return self.parse_response(response)

    def _on_tier(
        self, config: types.GenerateContentConfig | None, state: RetryState | None
    ) -> types.GenerateContentConfig | None:
        """Flex: the call goes on the Flex tier until the item was shed
        `flex_fallback_after` times; then on the standard tier. The path is recorded."""
        if self.execution != "flex":
            return config
        sheds = state.get(_FLEX_SHEDS, 0) if state is not None else 0
        if sheds >= self.flex_fallback_after:
            return config
        if state is not None:
            state.set(PRICE_PATH, "flex")
        flex = config.model_copy() if config is not None else types.GenerateContentConfig()
        flex.service_tier = types.ServiceTier.FLEX
        return flex

    async def on_error(
        self, exception: BaseException, attempt: int, state: RetryState | None = None
    ) -> None:
        """Counts the item's shed Flex calls (a 503 answer to a Flex call)."""
        if state is None or state.get(PRICE_PATH) != "flex" or not _is_shed(exception):
            return
        sheds = state.get(_FLEX_SHEDS, 0) + 1
        state.set(_FLEX_SHEDS, sheds)
        if sheds == self.flex_fallback_after:
            logger.warning(
                "Flex shed this item's call %d time(s): its next attempts use the standard tier "
                "(flex_fallback_after=%d)",
                sheds,
                self.flex_fallback_after,
            )

    def batch_jobs(self) -> BatchJobs | None:
        """Gemini Batch Mode for this strategy's items when `execution="batch"`."""
        if self.execution != "batch":
            return None
        from prefect_batch_llm.gemini.batch_mode import GeminiBatchJobs

        return GeminiBatchJobs(self)

    def _config(self) -> types.GenerateContentConfig | None:
        """The uncached request config, built once (fields do not change while running)."""
        if not self._config_built:
            self._request_config = self.generation_config()
            self._config_built = True
        return self._request_config

    def parse_response(self, response: types.GenerateContentResponse) -> ExecuteResult:
        """(output, usage, metadata), or a classified error that carries the billed tokens."""
        usage = usage_of(response)
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason is not None:
            raise GeminiContentBlockedError(
                f"Gemini blocked the prompt ({_name(feedback.block_reason)}).", token_usage=usage
            )
        candidate = response.candidates[0] if response.candidates else None
        finish = _name(candidate.finish_reason) if candidate is not None else None
        if finish in _BLOCKED_FINISH:
            raise GeminiContentBlockedError(
                f"Gemini blocked the answer (finish reason {finish}).", token_usage=usage
            )
        text = response.text
        if not text:
            raise GeminiEmptyResponseError(
                f"Gemini returned no text (finish reason {finish}).", token_usage=usage
            )
        output: Any = text
        if self.response_json_schema is not None or self.response_mime_type == "application/json":
            try:
                output = json.loads(text)
            except json.JSONDecodeError as exc:
                raise OutputValidationError(
                    f"Gemini's answer is not valid JSON: {exc}", token_usage=usage
                ) from exc
        metadata = {
            "finish_reason": finish,
            "safety_ratings": [
                {
                    "category": _name(r.category),
                    "probability": _name(r.probability),
                    "blocked": bool(r.blocked),
                }
                for r in (candidate.safety_ratings or [] if candidate is not None else [])
            ],
            "model_version": response.model_version,
            "response_id": response.response_id,
        }
        return output, usage, metadata
