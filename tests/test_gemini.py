"""GeminiStrategy and GeminiCredentials through the processor, the real SDK and the emulator."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import SecretStr

from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig, RetryConfig
from prefect_batch_llm.gemini import (
    GeminiCachedStrategy,
    GeminiCredentials,
    GeminiErrorClassifier,
    GeminiStrategy,
)
from prefect_batch_llm.testing import Fault, GeminiEmulator, count_tokens

FAST = RetryConfig(max_attempts=3, initial_wait=0.05, max_wait=0.2)


@pytest.fixture
def emulator():
    with GeminiEmulator() as running:
        yield running


def credentials(emulator: GeminiEmulator, key: str = "test-key") -> GeminiCredentials:
    return GeminiCredentials(api_key=SecretStr(key), base_url=emulator.base_url, timeout_seconds=10)


async def run(strategy, prompts, **config):
    config.setdefault("retry", FAST)
    async with ParallelBatchProcessor(config=ProcessorConfig(**config)) as processor:
        for i, prompt in enumerate(prompts):
            await processor.add_work(
                LLMWorkItem(item_id=f"item-{i}", strategy=strategy, prompt=prompt)
            )
        return await processor.process_all()


class TestGeminiCredentialsBlock(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return GeminiCredentials


class TestGeminiStrategyBlock(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return GeminiStrategy


class TestGeminiCachedStrategyBlock(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return GeminiCachedStrategy


async def test_batch_through_the_real_client_reports_the_tokens_the_server_billed(emulator):
    strategy = GeminiStrategy(credentials=credentials(emulator), system_instruction="Be brief.")
    prompts = [f"Summarize document number {i}" for i in range(20)]
    result = await run(strategy, prompts, max_workers=8)
    assert result.succeeded == 20
    billed = emulator.stats()["billed"]
    assert result.total_input_tokens == billed["input_tokens"]
    assert result.total_output_tokens == billed["output_tokens"]
    first = result.results[0]
    assert first.output.startswith("[gemini-2.5-flash#")
    assert first.token_usage["input_tokens"] == count_tokens(prompts[0]) + count_tokens("Be brief.")
    assert first.metadata["finish_reason"] == "STOP"
    assert first.metadata["model_version"] == "gemini-2.5-flash"
    assert {r["category"] for r in first.metadata["safety_ratings"]} >= {
        "HARM_CATEGORY_HATE_SPEECH"
    }


async def test_json_schema_output_is_parsed(emulator):
    schema = {
        "type": "object",
        "properties": {
            "sentiment": {"type": "string", "enum": ["positive", "negative"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["sentiment", "score"],
    }
    strategy = GeminiStrategy(credentials=credentials(emulator), response_json_schema=schema)
    result = await run(strategy, ["I loved it", "I hated it"])
    for item in result.results:
        assert item.output["sentiment"] in {"positive", "negative"}
        assert 0 <= item.output["score"] <= 1


async def test_safety_block_fails_at_once_as_content_filter_with_billed_tokens(emulator):
    emulator.add_fault(Fault(kind="safety", prompt_contains="unsafe"))
    strategy = GeminiStrategy(credentials=credentials(emulator))
    result = await run(strategy, ["unsafe request", "fine request"])
    blocked, fine = result.results
    assert not blocked.success and blocked.error_category == "content_filter"
    assert "SAFETY" in (blocked.error or "") and blocked.attempts == 1
    assert blocked.token_usage["input_tokens"] == count_tokens("unsafe request")
    assert fine.success


async def test_429_with_retry_info_only_is_waited_and_succeeds(emulator):
    # No Retry-After header here: only the RetryInfo detail carries the 2 s delay.
    emulator.add_fault(Fault(kind="429", times=1, retry_after=2.0, retry_after_header=False))
    strategy = GeminiStrategy(credentials=credentials(emulator))
    result = await run(strategy, ["please"], retry=RetryConfig(max_attempts=1, initial_wait=0.01))
    [item] = result.results
    assert item.success and item.retries_by_category == {"rate_limit": 1}
    assert item.duration >= 2.0
    assert emulator.stats()["calls"]["generateContent|gemini-2.5-flash|429"] == 1


async def test_401_fails_fast_with_the_key_hint_and_no_retries(caplog):
    secret = "sk-live-SECRET-0123456789"
    with GeminiEmulator(api_keys={"the-right-key"}) as emulator:
        strategy = GeminiStrategy(credentials=credentials(emulator, key=secret))
        with caplog.at_level(logging.DEBUG):
            result = await run(strategy, ["hello", "world"])
        stats = emulator.stats()
    for item in result.results:
        assert not item.success and item.error_category == "permanent"
        assert "check your API key" in (item.error or "") and item.attempts == 1
    assert stats["calls"] == {"generateContent|gemini-2.5-flash|401": 2}
    # the key never leaks: not in results, logs, block repr or serialised block
    assert secret not in repr(result) and secret not in str(result.summary())
    assert secret not in caplog.text
    assert secret not in repr(strategy) and secret not in strategy.model_dump_json()


async def test_transient_server_errors_back_off_and_recover(emulator):
    emulator.add_fault(Fault(kind="503", times=1, prompt_contains="flaky"))
    emulator.add_fault(Fault(kind="502_html", times=1, prompt_contains="flaky"))
    result = await run(GeminiStrategy(credentials=credentials(emulator)), ["flaky one", "steady"])
    flaky, steady = result.results
    assert flaky.success and flaky.attempts == 3 and flaky.retries_by_category == {"transient": 2}
    assert steady.attempts == 1


async def test_slow_answer_times_out_then_recovers(emulator):
    emulator.add_fault(Fault(kind="slow", times=1, delay=5.0))
    result = await run(
        GeminiStrategy(credentials=credentials(emulator)), ["x"], timeout_per_item=0.5
    )
    [item] = result.results
    assert item.success and item.retries_by_category == {"timeout": 1}


async def test_saved_strategy_with_nested_credentials_round_trips(emulator):
    creds = credentials(emulator, key="saved-key")
    await creds.save("emulator-credentials", overwrite=True)
    await GeminiStrategy(credentials=creds, model="gemini-2.5-pro", temperature=0.2).save(
        "pro-strategy", overwrite=True
    )
    loaded = await GeminiStrategy.aload("pro-strategy")
    assert loaded.credentials.api_key is not None
    assert loaded.credentials.api_key.get_secret_value() == "saved-key"
    assert loaded.model == "gemini-2.5-pro" and loaded.temperature == 0.2
    result = await run(loaded, ["hi"])
    assert result.results[0].output.startswith("[gemini-2.5-pro#")


def test_credentials_read_the_environment_and_explain_a_missing_key(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="GEMINI_API_KEY"):
        GeminiCredentials().resolved_api_key()
    monkeypatch.setenv("GOOGLE_API_KEY", "from-google-env")
    assert GeminiCredentials().resolved_api_key() == "from-google-env"
    monkeypatch.setenv("GEMINI_API_KEY", "from-gemini-env")
    assert GeminiCredentials().resolved_api_key() == "from-gemini-env"
    assert GeminiCredentials(api_key=SecretStr("explicit")).resolved_api_key() == "explicit"


async def test_one_client_per_credentials_per_event_loop(emulator):
    creds = credentials(emulator)
    same = credentials(emulator)
    assert creds.get_client() is creds.get_client() is same.get_client()
    assert credentials(emulator, key="other").get_client() is not creds.get_client()
    on_another_loop = await asyncio.to_thread(lambda: asyncio.run(_client_of(creds)))
    assert on_another_loop is not creds.get_client()
    await creds.aclose()


async def _client_of(creds: GeminiCredentials):
    return creds.get_client()


def test_classifier_matches_codes_structurally_not_by_digits_in_messages():
    from google.genai import errors as genai_errors

    not_a_429 = genai_errors.ClientError(
        400, {"error": {"code": 400, "message": "prompt has 4290 tokens", "status": "X"}}
    )
    assert GeminiErrorClassifier().classify(not_a_429).error_category == "permanent"
    expired = genai_errors.ClientError(
        400,
        {
            "error": {
                "code": 400,
                "message": "Cache content 5025785736947826688 is expired.",
                "status": "INVALID_ARGUMENT",
            }
        },
    )
    info = GeminiErrorClassifier().classify(expired)
    assert info.is_retryable and info.error_category == "cache_expired"


async def test_the_shared_client_is_closed_after_the_last_strategy_cleans_up(emulator):
    creds = credentials(emulator)
    flash = GeminiStrategy(credentials=creds)
    pro = GeminiStrategy(credentials=creds, model="gemini-2.5-pro")
    async with ParallelBatchProcessor() as processor:
        for i, strategy in enumerate([flash, pro, flash]):
            await processor.add_work(LLMWorkItem(item_id=str(i), strategy=strategy, prompt="hi"))
        await processor.process_all()
        shared = flash.client()
        assert pro.client() is shared, "one client per credentials, shared by both strategies"
        assert creds.get_client() is shared
    assert creds.get_client() is not shared, "closed and dropped when the batch ended"
