"""GeminiCachedStrategy: one shared context cache, found, reused, renewed and recovered."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig, RetryConfig
from prefect_batch_llm.gemini import GeminiCachedStrategy, GeminiCredentials
from prefect_batch_llm.testing import GeminiEmulator, count_tokens

CONTEXT = "The handbook. " * 400  # 1,400 tokens: above the 1,024-token minimum
CONTEXT_TOKENS = count_tokens(CONTEXT) + count_tokens("You answer from the handbook.")


def cached_strategy(emulator: GeminiEmulator, **overrides: Any) -> GeminiCachedStrategy:
    settings: dict[str, Any] = {
        "credentials": GeminiCredentials(api_key=SecretStr("k"), base_url=emulator.base_url),
        "system_instruction": "You answer from the handbook.",
        "cached_documents": [CONTEXT],
        "cache_tags": {"team": "support"},
    }
    return GeminiCachedStrategy(**(settings | overrides))


async def run(strategy, n: int, workers: int = 8, **config):
    config.setdefault("retry", RetryConfig(max_attempts=3, initial_wait=0.01, max_wait=0.05))
    async with ParallelBatchProcessor(config=ProcessorConfig(max_workers=workers, **config)) as p:
        for i in range(n):
            await p.add_work(
                LLMWorkItem(item_id=f"q{i}", strategy=strategy, prompt=f"Question {i}?")
            )
        return await p.process_all()


async def test_shared_strategy_over_100_items_and_8_workers_creates_exactly_one_cache():
    with GeminiEmulator() as emulator:
        strategy = cached_strategy(emulator)
        result = await run(strategy, 100)
        stats = emulator.stats()
    assert result.succeeded == 100
    assert stats["caches"]["created"] == 1 and stats["caches"]["live"] == 1
    assert stats["calls_by_endpoint"]["cachedContents.list"] == 2  # prepare: find, then converge
    assert result.total_cached_tokens == 100 * CONTEXT_TOKENS == stats["billed"]["cached_tokens"]
    assert (
        result.total_input_tokens
        == stats["billed"]["cached_tokens"] + stats["billed"]["input_tokens"]
    )
    billed = stats["billed"]
    assert result.cache_hit_rate() == pytest.approx(
        100.0 * billed["cached_tokens"] / (billed["cached_tokens"] + billed["input_tokens"])
    )
    assert result.cache_hit_rate() > 99


async def test_a_second_run_within_ttl_reuses_the_cache_and_changed_content_does_not():
    with GeminiEmulator() as emulator:
        first = cached_strategy(emulator)
        await run(first, 5)
        second = cached_strategy(emulator)  # a later flow run: a fresh instance, same config
        await run(second, 5)
        assert second.cache_name == first.cache_name
        assert emulator.stats()["caches"]["created"] == 1

        edited = cached_strategy(emulator, cached_documents=[CONTEXT + "A new chapter."])
        await run(edited, 5)
        other_team = cached_strategy(emulator, cache_tags={"team": "sales"})
        await run(other_team, 5)
        names = {first.cache_name, edited.cache_name, other_team.cache_name}
        assert len(names) == 3, "a stale prompt or another team's cache must never be reused"
        assert emulator.stats()["caches"]["created"] == 3


async def test_remaining_life_comes_from_expire_time_not_create_time(caplog):
    with GeminiEmulator() as emulator:
        first = cached_strategy(emulator, cache_ttl_seconds=3600)
        await run(first, 1)
        emulator.clock.advance(3000)  # 10 minutes left...
        await first.client().aio.caches.update(
            name=first.cache_name or "", config={"ttl": "3600s"}
        )  # ...renewed: 60 left
        later = cached_strategy(emulator, cache_ttl_seconds=3600)
        later._clock = emulator.clock.now
        with caplog.at_level(logging.INFO, logger="prefect_batch_llm"):
            await run(later, 1)
        stats = emulator.stats()
    assert later.cache_name == first.cache_name
    assert stats["caches"]["updated"] == 1, "a cache aged 50 min but renewed is not renewed again"
    assert "expires in 3600s" in caplog.text or "expires in 3599s" in caplog.text


async def test_cache_expiring_mid_run_is_renewed_once_without_failed_items():
    emulator = GeminiEmulator()

    def jump_near_expiry(model: str, prompt: str, body: dict[str, Any]) -> None:
        if prompt == "Question 40?":
            emulator.clock.advance(3400)  # 200 s left: inside the 300 s renewal buffer
        return None

    emulator.response_fn = jump_near_expiry
    with emulator:
        strategy = cached_strategy(emulator, cache_ttl_seconds=3600)
        strategy._clock = emulator.clock.now  # the client's clock agrees with the server's
        result = await run(strategy, 100, workers=1)
        stats = emulator.stats()
    assert result.succeeded == 100
    assert stats["caches"]["updated"] == 1 and stats["caches"]["created"] == 1
    assert stats["calls_by_endpoint"]["cachedContents.update"] == 1


async def test_expired_cache_400_is_recovered_without_consuming_attempts():
    emulator = GeminiEmulator()

    def expire_the_cache(model: str, prompt: str, body: dict[str, Any]) -> None:
        if prompt == "Question 30?":
            emulator.clock.advance(7200)  # the server expires it; the client does not know
        return None

    emulator.response_fn = expire_the_cache
    with emulator:
        strategy = cached_strategy(emulator)
        result = await run(strategy, 60, workers=4, retry=RetryConfig(max_attempts=1))
        stats = emulator.stats()
    assert result.succeeded == 60, [r.error for r in result.results if not r.success]
    recovered = [r for r in result.results if r.retries_by_category.get("cache_expired")]
    assert 1 <= len(recovered) <= 4, "only the items in flight when it expired"
    assert stats["calls"]["generateContent|gemini-2.5-flash|400"] == len(recovered)
    assert stats["caches"]["created"] == 2, "re-created once, however many workers saw it"


async def test_two_flows_preparing_at_once_converge_on_one_cache():
    with GeminiEmulator(latency=0.05) as emulator:
        a, b = cached_strategy(emulator), cached_strategy(emulator)
        await asyncio.gather(a.prepare(), b.prepare())
        stats = emulator.stats()
    assert a.cache_name == b.cache_name
    assert stats["caches"]["live"] == 1
    assert stats["caches"]["created"] - stats["caches"]["deleted"] == 1


async def test_content_below_minimum_fails_clearly_or_falls_back_when_asked(caplog):
    with GeminiEmulator() as emulator:
        small = cached_strategy(emulator, cached_documents=["short"])
        result = await run(small, 3)
        assert all(r.error_category == "prepare_failed" for r in result.results)
        assert "fallback_to_uncached=True" in (result.results[0].error or "")

        fallback = cached_strategy(emulator, cached_documents=["short"], fallback_to_uncached=True)
        with caplog.at_level(logging.WARNING, logger="prefect_batch_llm"):
            result = await run(fallback, 3)
        assert result.succeeded == 3 and result.total_cached_tokens == 0
        assert "below the minimum cache size" in caplog.text
        assert emulator.stats()["caches"]["created"] == 0


def test_renewal_buffer_must_be_shorter_than_the_ttl():
    with pytest.raises(ValidationError, match=r"cache_renewal_buffer_seconds \(600\) must be less"):
        GeminiCachedStrategy(cache_ttl_seconds=600, cache_renewal_buffer_seconds=600)
    with pytest.raises(ValidationError, match="displayName"):
        GeminiCachedStrategy(cache_tags={f"tag{i}": "x" * 20 for i in range(10)})


async def test_cleanup_keeps_the_cache_and_delete_cache_deletes_it_once():
    with GeminiEmulator() as emulator:
        keep = cached_strategy(emulator)
        await run(keep, 3)
        assert emulator.stats()["caches"]["live"] == 1, "cleanup() keeps the cache for reuse"
        await asyncio.gather(*(keep.delete_cache() for _ in range(5)))
        stats = emulator.stats()
        assert stats["caches"]["live"] == 0
        assert stats["calls_by_endpoint"]["cachedContents.delete"] == 1

        one_off = cached_strategy(emulator, delete_cache_on_cleanup=True)
        await run(one_off, 3)
        assert emulator.stats()["caches"]["live"] == 0


async def test_cached_documents_from_files(tmp_path):
    path = tmp_path / "handbook.txt"
    path.write_text(CONTEXT)
    with GeminiEmulator() as emulator:
        strategy = cached_strategy(emulator, cached_documents=[], cached_document_paths=[str(path)])
        result = await run(strategy, 2)
        assert result.total_cached_tokens == 2 * CONTEXT_TOKENS
        missing = cached_strategy(
            emulator, cached_documents=[], cached_document_paths=[str(tmp_path / "nope.txt")]
        )
        result = await run(missing, 1)
        assert result.results[0].error_category == "prepare_failed"
        assert "Cannot read cached document" in (result.results[0].error or "")
