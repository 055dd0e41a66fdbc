"""pydantic-ai agents and plain async functions as strategies."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import City
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import SecretStr, ValidationError
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.usage import UsageLimits

from prefect_batch_llm import (
    CallableStrategy,
    LLMWorkItem,
    ParallelBatchProcessor,
    ProcessorConfig,
    RetryConfig,
)
from prefect_batch_llm.gemini import GeminiCachedStrategy, GeminiCredentials
from prefect_batch_llm.pydantic_ai import PydanticAIErrorClassifier, PydanticAIStrategy
from prefect_batch_llm.testing import Fault, GeminiEmulator

FAST = RetryConfig(max_attempts=3, initial_wait=0.01, max_wait=0.05)


def creds(emulator: GeminiEmulator) -> GeminiCredentials:
    return GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url, timeout_seconds=10)


async def run(strategy, prompts, **config):
    config.setdefault("retry", FAST)
    async with ParallelBatchProcessor(config=ProcessorConfig(**config)) as processor:
        for i, prompt in enumerate(prompts):
            await processor.add_work(
                LLMWorkItem(item_id=f"item-{i}", strategy=strategy, prompt=prompt)
            )
        result = await processor.process_all()
        stats = await processor.get_stats()
    return result, stats


class TestPydanticAIStrategyBlock(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return PydanticAIStrategy


async def test_typed_outputs_for_50_items_through_google_model_on_the_emulator():
    with GeminiEmulator() as emulator:
        strategy = PydanticAIStrategy(
            credentials=creds(emulator),
            output_type="helpers:City",
            instructions="Name a city and its population.",
        )
        result, _ = await run(strategy, [f"City number {i}?" for i in range(50)], max_workers=10)
        billed = emulator.stats()["billed"]
    assert result.succeeded == 50
    assert all(isinstance(r.output, City) for r in result.results)
    assert result.total_input_tokens == billed["input_tokens"]
    assert result.total_output_tokens == billed["output_tokens"]
    assert result.results[0].metadata == {"model": "google:gemini-2.5-flash", "requests": 1}


async def test_invalid_first_answer_is_recovered_with_feedback_and_both_attempts_billed():
    seen_prompts: list[str] = []

    def record(model: str, prompt: str, body: dict[str, Any]) -> None:
        seen_prompts.append(prompt)

    with GeminiEmulator(
        faults=[Fault(kind="invalid_output", prompt_contains="Paris", times=1)], response_fn=record
    ) as emulator:
        strategy = PydanticAIStrategy(credentials=creds(emulator), output_type="helpers:City")
        result, _ = await run(strategy, ["Tell me about Paris", "Tell me about Rome"])
        billed = emulator.stats()["billed"]
    paris, rome = result.results
    assert paris.success and isinstance(paris.output, City)
    assert paris.attempts == 2 and paris.retries_by_category == {"validation": 1}
    assert rome.attempts == 1
    # tokens of the failed attempt are counted too: the item reports two requests' worth
    assert paris.token_usage["input_tokens"] > 2 * rome.token_usage["input_tokens"] - 5
    assert result.total_input_tokens == billed["input_tokens"]
    retry_prompt = [p for p in seen_prompts if "Paris" in p][-1]
    assert "failed validation" in retry_prompt and "Field required" in retry_prompt
    assert not any("failed validation" in p for p in seen_prompts if "Rome" in p)


async def test_a_429_storm_is_ridden_out_without_extra_sdk_retries():
    with GeminiEmulator(faults=[Fault(kind="429", times=12, retry_after=0.2)]) as emulator:
        strategy = PydanticAIStrategy(credentials=creds(emulator), output_type="helpers:City")
        result, stats = await run(strategy, [f"q{i}" for i in range(8)], max_workers=4)
        calls = emulator.stats()["calls"]
    assert result.succeeded == 8
    assert stats["rate_limit_count"] == 12
    assert calls["generateContent|gemini-2.5-flash|429"] == 12
    assert calls["generateContent|gemini-2.5-flash|200"] == 8, "no hidden SDK retries"


async def test_escalation_to_a_stronger_model_only_for_the_item_that_failed():
    with GeminiEmulator(
        faults=[Fault(kind="invalid_output", prompt_contains="hard", times=1)]
    ) as emulator:
        strategy = PydanticAIStrategy(
            credentials=creds(emulator),
            output_type="helpers:City",
            escalation_model="google:gemini-2.5-pro",
        )
        result, _ = await run(strategy, ["easy one", "hard one", "easy two"], max_workers=3)
        calls = emulator.stats()["calls"]
    models = {r.item_id: r.metadata["model"] for r in result.results}
    assert models == {
        "item-0": "google:gemini-2.5-flash",
        "item-1": "google:gemini-2.5-pro",
        "item-2": "google:gemini-2.5-flash",
    }
    assert calls["generateContent|gemini-2.5-pro|200"] == 1


async def test_native_output_with_a_shared_gemini_context_cache():
    with GeminiEmulator() as emulator:
        cache = GeminiCachedStrategy(
            credentials=creds(emulator),
            system_instruction="Answer with a city.",
            cached_documents=["Atlas of cities. " * 300],
        )
        strategy = PydanticAIStrategy(
            credentials=creds(emulator),
            output_type="helpers:City",
            output_mode="native",
            context_cache=cache,
        )
        result, _ = await run(strategy, [f"q{i}" for i in range(10)], max_workers=5)
        stats = emulator.stats()
    assert result.succeeded == 10 and all(isinstance(r.output, City) for r in result.results)
    assert stats["caches"]["created"] == 1
    assert result.total_cached_tokens == stats["billed"]["cached_tokens"] > 0
    assert result.cache_hit_rate() > 90


def test_cache_with_tool_output_or_instructions_is_refused_with_the_reason():
    cache = GeminiCachedStrategy(cached_documents=["x"])
    with pytest.raises(ValidationError, match="output_mode='native'"):
        PydanticAIStrategy(context_cache=cache)
    with pytest.raises(ValidationError, match="put the instructions in the cache"):
        PydanticAIStrategy(context_cache=cache, output_mode="native", instructions="Be brief.")


async def test_a_live_agent_runs_but_cannot_be_saved():
    agent = Agent(
        TestModel(custom_output_args={"name": "Lyon", "population": 500_000}), output_type=City
    )
    strategy = PydanticAIStrategy.from_agent(agent)
    result, _ = await run(strategy, ["q"])
    assert result.results[0].output == City(name="Lyon", population=500_000)
    with pytest.raises(ValueError, match="live Agent object, which cannot be saved"):
        await strategy.save("live-agent", overwrite=True)
    saved = PydanticAIStrategy(model="google:gemini-2.5-flash", output_type="helpers:City")
    await saved.save("described-agent", overwrite=True)
    assert (await PydanticAIStrategy.aload("described-agent")).output_type == "helpers:City"


async def test_unknown_output_type_path_fails_prepare_with_a_fix():
    strategy = PydanticAIStrategy(output_type="helpers:NoSuchModel")
    result, _ = await run(strategy, ["q"])
    [item] = result.results
    assert item.error_category == "prepare_failed"
    assert "has no attribute 'NoSuchModel'" in (item.error or "")


async def test_classifier_on_errors_raised_by_the_real_google_model():
    faults = [
        Fault(kind="503", prompt_contains="busy"),
        Fault(kind="400", prompt_contains="bad"),
        Fault(kind="safety", prompt_contains="unsafe"),
        Fault(kind="429", prompt_contains="quota", retry_after=3, retry_after_header=False),
    ]
    classifier = PydanticAIErrorClassifier()
    with GeminiEmulator(api_keys={"k", "good"}, faults=faults) as emulator:
        agent = PydanticAIStrategy(credentials=creds(emulator)).agent_for()
        expected = {
            "busy": ("transient", None),
            "bad": ("permanent", None),
            "unsafe": ("content_filter", None),
            "quota": ("rate_limit", 3.0),
        }
        for prompt, (category, wait) in expected.items():
            with pytest.raises(Exception) as caught:
                await agent.run(prompt)
            info = classifier.classify(caught.value)
            assert (info.error_category, info.suggested_wait) == (category, wait), prompt
        wrong_key = GeminiCredentials(api_key=SecretStr("nope"), base_url=emulator.base_url)
        with pytest.raises(Exception) as caught:
            await PydanticAIStrategy(credentials=wrong_key).agent_for().run("hi")
        info = classifier.classify(caught.value)
        assert info.error_category == "permanent" and "API key" in (info.message or "")


async def test_classifier_on_validation_and_usage_limit_errors():
    def always_text(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(
            parts=[ToolCallPart(tool_name=info.output_tools[0].name, args={"name": "x"})]
        )

    agent = Agent(FunctionModel(always_text), output_type=City, retries={"output": 0})
    with pytest.raises(Exception) as invalid:
        await agent.run("q")
    assert PydanticAIErrorClassifier().classify(invalid.value).error_category == "validation"

    chatty = Agent(FunctionModel(lambda m, i: ModelResponse(parts=[TextPart("word " * 50)])))
    with pytest.raises(Exception) as limited:
        await chatty.run("q", usage_limits=UsageLimits(output_tokens_limit=5))
    info = PydanticAIErrorClassifier().classify(limited.value)
    assert info.error_category == "permanent" and not info.is_retryable


async def test_callable_strategy_wraps_an_async_function():
    calls: list[tuple[str, int]] = []
    errors: list[str] = []

    async def ask(prompt: str, *, attempt: int, timeout: float, state: Any):
        calls.append((prompt, attempt))
        if prompt == "flaky" and attempt == 1:
            raise ConnectionResetError("reset by peer")
        return prompt.upper(), {"input_tokens": 3, "output_tokens": 2}, {"via": "callable"}

    async def note(exception: BaseException, attempt: int, state: Any) -> None:
        errors.append(type(exception).__name__)

    result, _ = await run(CallableStrategy(ask, on_error=note), ["hello", "flaky"])
    assert [r.output for r in result.results] == ["HELLO", "FLAKY"]
    assert result.results[0].metadata == {"via": "callable"}
    assert errors == ["ConnectionResetError"]
    assert result.total_input_tokens == 6, "the failed attempt raised before billing anything"


async def test_callable_strategy_rejects_sync_functions_and_bad_usage():
    def not_async(prompt, **_):
        return "x", {}

    with pytest.raises(TypeError, match="needs an async function"):
        CallableStrategy(not_async)

    async def bad_usage(prompt, **_):
        return "x", {"prompt_tokens": 5}

    result, _ = await run(CallableStrategy(bad_usage), ["q"])
    [item] = result.results
    assert item.error_category == "permanent" and "unknown token usage key 'prompt_tokens'" in (
        item.error or ""
    )
