"""`PydanticAIStrategy`: a pydantic-ai agent as a strategy block."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, cast

from prefect.client.orchestration import PrefectClient
from pydantic import Field, HttpUrl, PrivateAttr, model_validator
from pydantic_ai import Agent, NativeOutput
from pydantic_ai import exceptions as pai
from pydantic_ai.models import Model
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import RunUsage

from prefect_batch_llm._links import LOGO_URL, docs_page
from prefect_batch_llm._unknown_args import (
    PYDANTIC_AI_HINTS,
)
from prefect_batch_llm.errors import ErrorClassifier, OutputValidationError
from prefect_batch_llm.gemini.cached import GeminiCachedStrategy
from prefect_batch_llm.gemini.credentials import GeminiCredentials
from prefect_batch_llm.gemini.strategy import GeminiStrategy
from prefect_batch_llm.pydantic_ai.errors import PydanticAIErrorClassifier, validation_feedback
from prefect_batch_llm.results import TokenUsage
from prefect_batch_llm.strategy import ExecuteResult, RetryState, StrategyBlock

_FEEDBACK_KEY = "pydantic_ai_validation_feedback"


def import_output_type(path: str) -> Any:
    """`package.module:Name` -> the object, with a message saying what to fix."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(
            f"output_type {path!r} is not an import path; write it as 'package.module:Model'."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"output_type {path!r}: cannot import module {module_name!r} ({exc}). It must be "
            "importable where the flow runs."
        ) from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(
            f"output_type {path!r}: module {module_name!r} has no attribute {attribute!r}."
        ) from None


def usage_from(usage: RunUsage) -> TokenUsage:
    """pydantic-ai's run usage as this package's token usage (input includes cached)."""
    thoughts = int(usage.details.get("thoughts_tokens", 0)) if usage.details else 0
    return TokenUsage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.input_tokens + usage.output_tokens,
        cached_input_tokens=usage.cache_read_tokens,
        thoughts_tokens=thoughts,
    )


class PydanticAIStrategy(StrategyBlock):
    """Runs a pydantic-ai `Agent` once per attempt: typed outputs, per-item token usage.

    Describe the agent with fields (savable, loadable by name in deployments), or wrap a live
    `Agent` with `PydanticAIStrategy.from_agent(agent)` (not savable). pydantic-ai's own
    retries stay off: each attempt is one model request, and the processor's classifier
    decides retries. Tokens are read even when the output fails validation, so a failed
    attempt's tokens are counted. Unknown arguments are refused with what to use instead
    (batch-llm's `PydanticAIStrategy(agent=...)` is `PydanticAIStrategy.from_agent(agent)`).

    Per-item recovery (uses the item's `RetryState`, never shared between items):

    - `retry_feedback`: after an output validation failure, the item's next attempt sends the
      validation errors along with the prompt;
    - `escalation_model`: from attempt `escalate_on_attempt` on, the item uses a stronger model.

    Example:
        ```python
        from prefect_batch_llm.pydantic_ai import PydanticAIStrategy

        pydantic_ai_strategy = PydanticAIStrategy.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "Pydantic AI Strategy"
    _logo_url = HttpUrl(LOGO_URL)
    _documentation_url = HttpUrl(docs_page("guides/pydantic-ai/"))
    _description = "Runs a pydantic-ai agent per work item, with typed outputs."
    _code_example = """
```python
from prefect_batch_llm.pydantic_ai import PydanticAIStrategy

pydantic_ai_strategy = PydanticAIStrategy.load("BLOCK_NAME")
```
"""

    error_classifier: ClassVar[ErrorClassifier | None] = PydanticAIErrorClassifier()
    #: What to use instead of arguments this block does not have (see `_unknown_args`).
    _argument_hints: ClassVar[Mapping[str, str]] = PYDANTIC_AI_HINTS

    model: str = Field(
        default="google:gemini-2.5-flash",
        description="pydantic-ai model name, e.g. google:gemini-2.5-flash.",
    )
    instructions: str | None = Field(default=None, description="The agent's instructions.")
    output_type: str | None = Field(
        default=None, description="Import path of the output type, e.g. myapp.models:Invoice."
    )
    output_mode: Literal["tool", "native"] = Field(
        default="tool",
        description="tool: a final_result tool call; native: JSON mode (needed with a cache).",
    )
    model_settings: dict[str, Any] = Field(
        default_factory=dict, description="pydantic-ai model settings, e.g. temperature."
    )
    credentials: GeminiCredentials | None = Field(
        default=None, description="Gemini key and endpoint for google: models (else environment)."
    )
    context_cache: GeminiCachedStrategy | None = Field(
        default=None, description="A Gemini context cache whose content prefixes every request."
    )
    retry_feedback: bool = Field(
        default=True, description="Send an item's validation errors with its next attempt."
    )
    escalation_model: str | None = Field(
        default=None, description="Model for an item's later attempts, e.g. google:gemini-2.5-pro."
    )
    escalate_on_attempt: int = Field(
        default=2, ge=2, description="From this attempt on, an item uses the escalation model."
    )

    _live_agent: Agent[Any, Any] | None = PrivateAttr(default=None)
    _agents: dict[str, Agent[Any, Any]] = PrivateAttr(default_factory=dict)
    _acquired: int = PrivateAttr(default=0)
    _counting: GeminiStrategy | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_cache_use(self) -> PydanticAIStrategy:
        if self.context_cache is not None:
            if self.output_mode != "native":
                raise ValueError(
                    "context_cache needs output_mode='native': with a Gemini cache, pydantic-ai "
                    "drops tools from the request, so the default final_result tool output "
                    "cannot work."
                )
            if self.instructions:
                raise ValueError(
                    "With context_cache, put the instructions in the cache "
                    "(context_cache.system_instruction): Gemini refuses a system instruction "
                    "next to cached content."
                )
        return self

    @classmethod
    def from_agent(cls, agent: Agent[Any, Any], **settings: Any) -> PydanticAIStrategy:
        """Wrap a live `Agent` (runtime only: this strategy cannot be saved as a block)."""
        strategy = cls(**settings)
        strategy._live_agent = agent
        return strategy

    def _refuse_live_agent(self) -> None:
        if self._live_agent is not None:
            raise ValueError(
                "This PydanticAIStrategy wraps a live Agent object, which cannot be saved as a "
                "block. Describe the agent with the model, instructions and output_type fields "
                "(PydanticAIStrategy(model=..., output_type='pkg.module:Model')) to save it."
            )

    async def _save(
        self,
        name: str | None = None,
        is_anonymous: bool = False,
        overwrite: bool = False,
        client: PrefectClient | None = None,
    ) -> Any:
        self._refuse_live_agent()
        return await super()._save(
            name=name, is_anonymous=is_anonymous, overwrite=overwrite, client=client
        )

    def _save_sync(
        self, name: str | None = None, is_anonymous: bool = False, overwrite: bool = False
    ) -> Any:
        self._refuse_live_agent()
        return super()._save_sync(name=name, is_anonymous=is_anonymous, overwrite=overwrite)

    # -- building agents -------------------------------------------------------------------

    def _model(self, name: str) -> Model | str:
        if self.credentials is None or not name.startswith(("google:", "google-gla:")):
            return name
        from pydantic_ai.models.google import GoogleModel
        from pydantic_ai.providers.google import GoogleProvider

        provider = GoogleProvider(client=self.credentials.acquire_client())
        self._acquired += 1
        return GoogleModel(name.split(":", 1)[1], provider=provider)

    def agent_for(self, model: str | None = None) -> Agent[Any, Any]:
        """The agent an attempt runs (built once per model name)."""
        if self._live_agent is not None and model in (None, self.model):
            return self._live_agent
        name = model or self.model
        agent = self._agents.get(name)
        if agent is None:
            output: Any = import_output_type(self.output_type) if self.output_type else str
            if self.output_mode == "native":
                output = NativeOutput(output)
            agent = self._agents[name] = Agent(
                self._model(name),
                output_type=output,
                instructions=self.instructions,
                retries={"tools": 0, "output": 0},
            )
        return agent

    # -- strategy hooks --------------------------------------------------------------------

    async def prepare(self) -> None:
        self.agent_for()
        if self.escalation_model:
            self.agent_for(self.escalation_model)
        if self.context_cache is not None:
            await self.context_cache.prepare()

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> ExecuteResult:
        model = self.model
        if self.escalation_model and attempt >= self.escalate_on_attempt:
            model = self.escalation_model
        agent = self.agent_for(model)
        feedback = state.get(_FEEDBACK_KEY) if state is not None and self.retry_feedback else None
        if feedback and isinstance(prompt, str):
            prompt = (
                f"{prompt}\n\nYour previous answer failed validation; fix these errors:\n{feedback}"
            )
        settings: dict[str, Any] = {"timeout": timeout, **self.model_settings}
        if self.context_cache is not None:
            settings["google_cached_content"] = await self.context_cache.fresh_cache_name(state)
        usage = RunUsage()
        try:
            result = await agent.run(
                prompt, usage=usage, model_settings=cast(ModelSettings, settings)
            )
        except pai.UnexpectedModelBehavior as exc:
            if isinstance(exc, pai.ContentFilterError):
                exc.token_usage = usage_from(usage)  # type: ignore[attr-defined]
                raise
            raise OutputValidationError(
                f"{type(exc).__name__}: {exc}", token_usage=usage_from(usage)
            ) from exc
        except Exception as exc:
            exc.token_usage = usage_from(usage)  # type: ignore[attr-defined]
            raise
        return result.output, usage_from(usage), {"model": model, "requests": usage.requests}

    # -- counting (the cost preview) -------------------------------------------------------

    def _counts_with_gemini(self) -> bool:
        """Whether `count_tokens()` can count what an attempt sends: a described agent on a
        Google model with credentials, whose output adds no tool definition to the request
        (text output, or `output_mode='native'`)."""
        return (
            self._live_agent is None
            and self.credentials is not None
            and self.model.startswith(("google:", "google-gla:"))
            and (self.output_type is None or self.output_mode == "native")
        )

    async def prepare_counting(self) -> None:
        if not self._counts_with_gemini():
            return
        assert self.credentials is not None
        self._counting = GeminiStrategy(
            credentials=self.credentials,
            model=self.model.split(":", 1)[1],
            system_instruction=self.instructions,
        )
        await self._counting.prepare_counting()
        if self.context_cache is not None:
            await self.context_cache.prepare_counting()

    async def count_tokens(self, prompt: Any) -> TokenUsage | None:
        """Delegated to Gemini's `countTokens` for a Google model (see `_counts_with_gemini`):
        the prompt and the instructions, plus the context cache's content read at the cached
        rate. None otherwise: a tool-mode structured output sends a tool schema that cannot be
        counted here, and other providers have no counting API wired in."""
        if self._counting is None:
            return None
        usage = await self._counting.count_tokens(prompt)
        assert usage is not None
        if self.context_cache is None:
            return usage
        cached_tokens = await self.context_cache.count_fixed_tokens()
        return TokenUsage(
            input_tokens=usage.get("input_tokens", 0) + cached_tokens,
            cached_input_tokens=cached_tokens,
        )

    async def on_error(
        self, exception: BaseException, attempt: int, state: RetryState | None = None
    ) -> None:
        if state is not None:
            feedback = validation_feedback(exception)
            if feedback:
                state.set(_FEEDBACK_KEY, feedback)
        if self.context_cache is not None:
            await self.context_cache.on_error(exception, attempt, state)

    async def cleanup(self) -> None:
        counting, self._counting = self._counting, None
        if counting is not None:
            await counting.cleanup()
        if self.context_cache is not None:
            await self.context_cache.cleanup()
        # Agents hold the shared client they were built with: drop them, release the client.
        self._agents.clear()
        while self._acquired and self.credentials is not None:
            self._acquired -= 1
            await self.credentials.release_client()

    def rate_limit_scope(self) -> str:
        endpoint = self.credentials.endpoint() if self.credentials is not None else "default"
        return f"pydantic-ai|{endpoint}|{self.model}"
