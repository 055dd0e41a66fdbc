"""Strategies as Prefect blocks: savable, loadable by name, registrable from the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pydantic
import pytest
from prefect import get_client
from prefect.settings import PREFECT_API_URL
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import Field, PrivateAttr

from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, StrategyBlock
from prefect_batch_llm.testing import MockFailure, MockStrategy


class Translate(StrategyBlock):
    """A user-defined savable strategy."""

    _block_type_name = "Test Translate Strategy"

    language: str = Field("fr", description="Target language.")
    _calls: int = PrivateAttr(default=0)

    async def execute(self, prompt, attempt, timeout, state=None):
        self._calls += 1
        return f"[{self.language}] {prompt}", {"input_tokens": 3, "output_tokens": 3}


class TestMockStrategyBlock(BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return MockStrategy


async def test_user_strategy_block_round_trips_and_runs():
    await Translate(language="de").save("translate-de", overwrite=True)
    loaded = await Translate.aload("translate-de")
    assert loaded.language == "de" and loaded._calls == 0
    async with ParallelBatchProcessor() as processor:
        await processor.add_work(LLMWorkItem(item_id="1", strategy=loaded, prompt="hello"))
        result = await processor.process_all()
    assert result.results[0].output == "[de] hello" and loaded._calls == 1


async def test_mock_strategy_saves_its_failure_script_not_its_counters():
    mock = MockStrategy(latency=0.01, failures=[MockFailure(kind="rate_limit", retry_after=0.1)])
    mock._call_count = 99
    await mock.save("mock-with-429", overwrite=True)
    loaded = await MockStrategy.aload("mock-with-429")
    assert loaded.failures == mock.failures and loaded.latency == 0.01
    assert loaded.call_count == 0, "runtime state lives in private attributes, never saved"


async def test_loading_a_missing_block_says_what_to_do():
    with pytest.raises(ValueError, match="Unable to find block document named nope"):
        await MockStrategy.aload("nope")


def test_prefect_block_register_cli_registers_every_strategy_block():
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    out = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "prefect_batch_llm"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("Gemini Credentials", "Gemini Strategy", "Gemini Cached Strategy"):
        assert name in out.stdout
    assert "Pydantic AI Strategy" in out.stdout
    # The test kit's MockStrategy is not a block type users are offered.
    assert "Mock LLM Strategy" not in out.stdout
    assert "LLM Strategy\n" not in out.stdout


async def test_registered_block_type_is_visible_through_the_api():
    await MockStrategy.aregister_type_and_schema()
    async with get_client() as client:
        block_type = await client.read_block_type_by_slug("mock-llm-strategy")
    assert block_type.documentation_url and "testing" in str(block_type.documentation_url)
    assert block_type.code_example and 'MockStrategy.load("BLOCK_NAME")' in block_type.code_example


def test_every_strategy_block_refuses_unknown_arguments_with_the_closest_field():
    with pytest.raises(pydantic.ValidationError) as raised:
        MockStrategy(lattency=0.1)
    assert "lattency" in str(raised.value) and "latency" in str(raised.value).replace(
        "lattency", ""
    )


async def test_create_blocks_stores_no_absolute_path_and_a_relative_one_reads_from_cwd(
    tmp_path, monkeypatch
):
    from pathlib import Path

    from prefect.blocks.core import Block

    from prefect_batch_llm.errors import PermanentError
    from prefect_batch_llm.gemini import GeminiCachedStrategy

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "blocks"))
    from create_blocks import create_blocks

    await asyncio.to_thread(create_blocks, "http://127.0.0.1:9")  # a sync script
    async with get_client() as client:
        document = await client.read_block_document_by_name("handbook-qa", "gemini-cached-strategy")
    assert document.data["cached_document_paths"] == ["flows/data/handbook.txt"]
    assert str(root) not in repr(document.data), "no machine-specific path in the block"

    block = await Block.aload("gemini-cached-strategy/handbook-qa")
    assert isinstance(block, GeminiCachedStrategy)
    monkeypatch.chdir(root)
    assert block._load_documents()[0].startswith(
        (root / "flows/data/handbook.txt").read_text()[:40]
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PermanentError, match=rf"relative to '{tmp_path}'.*working directory"):
        block._load_documents()
