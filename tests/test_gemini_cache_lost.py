"""A Gemini context cache lost mid-run is re-created once; in-process users share deletion.

Through the real google-genai client and the emulator: the cache is deleted on the server
through the API, or the emulator restarts and forgets every cache, while 8 workers run. The
items that were in flight get a 404 "CachedContent not found", are classified `cache_expired`
and succeed on a repeat that does not use up an attempt (`max_attempts=1` proves it where no
connection breaks), and exactly one new cache is created however many workers saw the error.
With `delete_cache_on_cleanup=True`, the last user of a cache in the process deletes it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from prefect import flow
from pydantic import SecretStr

from prefect_batch_llm import (
    ErrorCategory,
    LLMWorkItem,
    ParallelBatchProcessor,
    ProcessorConfig,
    RetryConfig,
)
from prefect_batch_llm.gemini import GeminiCachedStrategy, GeminiCredentials, GeminiErrorClassifier
from prefect_batch_llm.testing import Fault, GeminiEmulator

CONTEXT = "The handbook. " * 400  # above the emulator's 1,024-token minimum
ONE_ATTEMPT = RetryConfig(max_attempts=1)


def cached_strategy(base_url: str, **overrides: Any) -> GeminiCachedStrategy:
    settings: dict[str, Any] = {
        "credentials": GeminiCredentials(api_key=SecretStr("k"), base_url=base_url),
        "system_instruction": "You answer from the handbook.",
        "cached_documents": [CONTEXT],
    }
    return GeminiCachedStrategy(**(settings | overrides))


async def run(strategy: GeminiCachedStrategy, n: int, *, workers: int = 8, **config: Any):
    config.setdefault("retry", ONE_ATTEMPT)
    async with ParallelBatchProcessor(config=ProcessorConfig(max_workers=workers, **config)) as p:
        for i in range(n):
            await p.add_work(
                LLMWorkItem(item_id=f"q{i}", strategy=strategy, prompt=f"Question {i}?")
            )
        return await p.process_all()


def other_client(base_url: str) -> genai.Client:
    """Someone else's client: a human in a console, or another run's cleanup."""
    return genai.Client(
        api_key="k",
        http_options=types.HttpOptions(
            base_url=base_url, retry_options=types.HttpRetryOptions(attempts=1)
        ),
    )


async def when_calls_reach(emulator: GeminiEmulator, calls: int) -> None:
    while emulator.state.generate_calls < calls:
        await asyncio.sleep(0.002)


def recovered(result) -> list[Any]:
    return [r for r in result.results if r.retries_by_category.get("cache_expired")]


async def test_cache_deleted_through_the_api_mid_run_is_recreated_once_and_no_item_fails():
    with GeminiEmulator(latency=0.005) as emulator:
        strategy = cached_strategy(emulator.base_url)
        deleter = other_client(emulator.base_url)

        async def delete_partway() -> str:
            await when_calls_reach(emulator, 80)
            (name,) = emulator.stats()["caches"]["live_names"]
            await deleter.aio.caches.delete(name=name)
            return name

        deletion = asyncio.create_task(delete_partway())
        result = await run(strategy, 240)
        deleted = await deletion
        await deleter.aio.aclose()
        stats = emulator.stats()

    failures = [(r.item_id, r.error_category, r.error) for r in result.results if not r.success]
    assert result.succeeded == 240, failures[:3]
    assert stats["caches"]["created"] == 2, "exactly one new cache, however many workers saw it"
    assert stats["calls_by_endpoint"]["cachedContents.create"] == 2
    assert strategy.cache_name not in (None, deleted)
    lost = stats["calls"].get("generateContent|gemini-2.5-flash|404", 0)
    assert 1 <= len(recovered(result)) <= 8, "only the items in flight when it was deleted"
    assert lost == len(recovered(result)), "each 404 was repeated once, without an attempt"


async def test_cache_lost_in_an_emulator_restart_is_recreated_once_and_no_item_fails():
    """The emulator is stopped and a new one starts on the same port: every cache is gone.
    Calls during the restart fail to connect (transient, a few attempts allowed); the
    calls after it name the lost cache and get 404s."""
    first = GeminiEmulator(latency=0.005).start()
    port = int(first.base_url.rsplit(":", 1)[1])
    second: GeminiEmulator | None = None
    try:
        strategy = cached_strategy(first.base_url)

        async def restart_partway() -> GeminiEmulator:
            await when_calls_reach(first, 80)
            await asyncio.to_thread(first.stop)
            return await asyncio.to_thread(GeminiEmulator(port=port, latency=0.005).start)

        restart = asyncio.create_task(restart_partway())
        retry = RetryConfig(max_attempts=8, initial_wait=0.2, max_wait=0.5)
        result = await run(strategy, 240, retry=retry)
        second = await restart
        stats = second.stats()
    finally:
        first.stop()
        if second is not None:
            second.stop()

    failures = [(r.item_id, r.error_category, r.error) for r in result.results if not r.success]
    assert result.succeeded == 240, failures[:3]
    assert stats["caches"]["created"] == 1, "the restarted server got exactly one new cache"
    assert stats["caches"]["live"] == 1
    assert 1 <= len(recovered(result)) <= 8
    assert stats["calls"].get("generateContent|gemini-2.5-flash|404", 0) == len(recovered(result))


async def test_classifier_takes_the_lost_cache_404_and_the_hosted_403_for_an_expired_cache():
    """The real client's errors for a request naming a deleted cache, and the hosted API's
    403 wording for the same case; a 403 for a bad key stays permanent with its key hint."""
    classifier = GeminiErrorClassifier()
    with GeminiEmulator(faults=[Fault(kind="403", prompt_contains="suspended")]) as emulator:
        strategy = cached_strategy(emulator.base_url)
        await strategy.prepare()
        name = strategy.cache_name or ""
        client = strategy.client()
        with pytest.raises(genai_errors.ClientError) as bad_key:
            await client.aio.models.generate_content(
                model=strategy.model,
                contents="Am I suspended?",
                config=types.GenerateContentConfig(cached_content=name),
            )
        await client.aio.caches.delete(name=name)
        with pytest.raises(genai_errors.ClientError) as lost:
            await client.aio.models.generate_content(
                model=strategy.model,
                contents="Question?",
                config=types.GenerateContentConfig(cached_content=name),
            )
        await strategy.cleanup()

    assert lost.value.code == 404
    assert classifier.classify(lost.value).error_category == ErrorCategory.CACHE_EXPIRED

    hosted = genai_errors.ClientError(
        403,
        {
            "error": {
                "code": 403,
                "message": "CachedContent not found (or permission denied)",
                "status": "PERMISSION_DENIED",
            }
        },
    )
    assert classifier.classify(hosted).error_category == ErrorCategory.CACHE_EXPIRED

    assert bad_key.value.code == 403
    info = classifier.classify(bad_key.value)
    assert info.error_category == ErrorCategory.PERMANENT
    assert "check your API key" in (info.message or "")


async def test_a_403_about_cached_content_on_a_request_without_a_cache_is_not_a_lost_cache():
    """Whether the request used a cache is read from the request the SDK kept."""
    import httpx2

    request = httpx2.Request(
        "POST",
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent",
        content=b'{"contents": [{"parts": [{"text": "hi"}], "role": "user"}]}',
    )
    response = httpx2.Response(403, request=request)
    body = {
        "error": {
            "code": 403,
            "message": "Permission denied on cached content",
            "status": "PERMISSION_DENIED",
        }
    }
    info = GeminiErrorClassifier().classify(genai_errors.ClientError(403, body, response))
    assert info.error_category == ErrorCategory.PERMANENT


# -- delete_cache_on_cleanup and other users in the same process ---------------------------


async def side_by_side(
    emulator: GeminiEmulator, first: tuple[GeminiCachedStrategy, int, int], *later: Any
) -> list[Any]:
    """Batches run at the same time by one flow, as a pipeline's flow would run them. The
    later ones start once the first has its cache (two prepares at the very same moment
    would both create one and converge, which is another test's subject)."""

    async def after_first_cache(strategy: GeminiCachedStrategy, n: int, workers: int) -> Any:
        while not emulator.state.caches:
            await asyncio.sleep(0.005)
        return await run(strategy, n, workers=workers)

    @flow(name="side-by-side-batches")
    async def pipeline() -> list[Any]:
        strategy, n, workers = first
        return list(
            await asyncio.gather(
                run(strategy, n, workers=workers), *(after_first_cache(*b) for b in later)
            )
        )

    return await pipeline()


async def test_one_off_batch_does_not_delete_a_cache_another_live_batch_still_uses(caplog):
    with GeminiEmulator(latency=0.01) as emulator:
        short = cached_strategy(emulator.base_url, delete_cache_on_cleanup=True)
        long = cached_strategy(emulator.base_url)  # same content: the same cache
        with caplog.at_level(logging.INFO, logger="prefect_batch_llm"):
            long_result, short_result = await side_by_side(emulator, (long, 160, 4), (short, 10, 2))
        stats = emulator.stats()

    assert short_result.succeeded == 10
    assert long_result.succeeded == 160
    assert short.cache_name is not None and long.cache_name is None, "long deleted it, last"
    assert not recovered(long_result), "the other batch never lost its cache"
    assert stats["caches"]["created"] == 1
    assert "Not deleting Gemini cache" in caplog.text, "the batches did overlap"
    # The last user carries out the deletion the one-off batch asked for.
    assert stats["calls_by_endpoint"]["cachedContents.delete"] == 1
    assert stats["caches"]["live"] == 0


async def test_two_one_off_batches_sharing_a_cache_delete_it_once_when_both_are_done(caplog):
    with GeminiEmulator(latency=0.01) as emulator:
        a = cached_strategy(emulator.base_url, delete_cache_on_cleanup=True)
        b = cached_strategy(emulator.base_url, delete_cache_on_cleanup=True)
        with caplog.at_level(logging.INFO, logger="prefect_batch_llm"):
            results = await side_by_side(emulator, (b, 80, 4), (a, 10, 2))
        stats = emulator.stats()

    assert [r.succeeded for r in results] == [80, 10]
    assert not recovered(results[0])
    assert stats["caches"]["created"] == 1
    assert stats["calls_by_endpoint"]["cachedContents.delete"] == 1
    assert stats["caches"]["live"] == 0
    assert "Not deleting Gemini cache" in caplog.text, "the batches did overlap"


async def test_one_instance_in_two_concurrent_processors_deletes_after_the_second_finishes(
    caplog,
):
    with GeminiEmulator(latency=0.01) as emulator:
        shared = cached_strategy(emulator.base_url, delete_cache_on_cleanup=True)
        with caplog.at_level(logging.INFO, logger="prefect_batch_llm"):
            results = await side_by_side(emulator, (shared, 80, 4), (shared, 10, 2))
        stats = emulator.stats()

    assert [r.succeeded for r in results] == [80, 10]
    assert not recovered(results[0])
    assert stats["caches"]["created"] == 1
    assert stats["calls_by_endpoint"]["cachedContents.delete"] == 1
    assert stats["caches"]["live"] == 0
    assert "Not deleting Gemini cache" in caplog.text, "the batches did overlap"
