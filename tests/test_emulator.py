"""The Gemini emulator speaks the wire format the real SDKs send and understand."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import httpx2
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from prefect_batch_llm.gemini import GeminiErrorClassifier
from prefect_batch_llm.testing import Fault, GeminiEmulator, count_tokens

CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "notes" / "sdk-captures"
# Batch Mode and the Files API (probes 3 and 6) are replayed, in order, by
# tests/test_emulator_batches.py::test_captured_batch_and_file_requests_get_well_formed_answers.
UNSUPPORTED = re.compile(r"/(batches|files|upload)\b|:batchGenerateContent")


def client_for(emulator: GeminiEmulator, *, key: str = "test-key", timeout_ms: int = 10_000):
    return genai.Client(
        api_key=key,
        http_options=types.HttpOptions(
            base_url=emulator.base_url,
            api_version="v1beta",
            timeout=timeout_ms,
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )


def captured_exchanges():
    """(probe, request, captured response) in the order the SDKs sent them."""
    for capture in sorted(CAPTURES.glob("*.requests.jsonl")):
        pending = None
        for line in capture.read_text().splitlines():
            record = json.loads(line)
            if record["dir"] == "req":
                if pending is not None:
                    yield capture.stem, pending, None
                pending = record
            elif pending is not None:
                yield capture.stem, pending, record
                pending = None
        if pending is not None:
            yield capture.stem, pending, None


@pytest.mark.skipif(not CAPTURES.exists(), reason="shared/notes/sdk-captures not beside the repo")
def test_every_captured_sdk_request_gets_a_well_formed_answer():
    """Replays what google-genai 3.3.0 and pydantic-ai 2.66.0 really sent, in order."""
    replayed, skipped = 0, []
    cache_ids: dict[str, str] = {}  # captured cache id -> the id the emulator gave
    with (
        GeminiEmulator(min_cache_tokens=1) as emulator,
        httpx.Client(base_url=emulator.base_url, timeout=10) as http,
    ):
        for probe, request, captured in captured_exchanges():
            path = request["path"]
            if UNSUPPORTED.search(path):
                skipped.append(path)
                continue
            raw = json.dumps(request["body"]) if request["body"] is not None else None
            for old, new in cache_ids.items():
                path = path.replace(old, new)
                raw = raw.replace(old, new) if raw else raw
            query = {k: v[0] for k, v in (request.get("query") or {}).items()}
            response = http.request(
                request["method"],
                path,
                params=query,
                content=raw,
                headers={"x-goog-api-key": "k", "content-type": "application/json"},
            )
            replayed += 1
            where = f"{probe} {request['method']} {path}"
            assert response.status_code < 500, (where, response.text[:300])
            if path.endswith(":streamGenerateContent"):
                frames = [f for f in response.text.split("\r\n\r\n") if f.strip()]
                chunks = [json.loads(f.removeprefix("data: ")) for f in frames]
                assert "usageMetadata" in chunks[-1], where
                continue
            answer = response.json()
            if response.status_code >= 400:
                assert set(answer["error"]) >= {"code", "message", "status"}, where
            elif path.endswith(":generateContent"):
                assert answer["candidates"][0]["content"]["parts"], where
                assert answer["usageMetadata"]["promptTokenCount"] >= 1, where
            elif request["method"] == "POST" and path.endswith("/cachedContents"):
                assert answer["name"].startswith("cachedContents/"), where
                if captured and isinstance(captured.get("body"), dict):
                    old_id = captured["body"]["name"].split("/")[-1]
                    cache_ids[old_id] = answer["name"].split("/")[-1]
    assert replayed >= 100, f"only {replayed} requests replayed"
    assert skipped and all(UNSUPPORTED.search(p) for p in skipped)


async def test_real_client_round_trip_text_json_usage_and_determinism():
    with GeminiEmulator() as emulator:
        client = client_for(emulator)
        first = await client.aio.models.generate_content(
            model="gemini-2.5-flash", contents="Summarize the plot of Hamlet"
        )
        again = await client.aio.models.generate_content(
            model="gemini-2.5-flash", contents="Summarize the plot of Hamlet"
        )
        other = await client.aio.models.generate_content(
            model="gemini-2.5-pro", contents="Summarize the plot of Hamlet"
        )
        assert first.text == again.text != other.text
        usage = first.usage_metadata
        assert usage is not None and usage.prompt_token_count == count_tokens(
            "Summarize the plot of Hamlet"
        )
        assert usage.candidates_token_count == count_tokens(first.text or "")

        schema = {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "year": {"type": "integer", "minimum": 1500},
            },
            "required": ["title", "year"],
        }
        structured = await client.aio.models.generate_content(
            model="gemini-2.5-flash",
            contents="Which play?",
            config=types.GenerateContentConfig(
                response_mime_type="application/json", response_json_schema=schema
            ),
        )
        data = json.loads(structured.text or "")
        assert isinstance(data["title"], str) and data["year"] >= 1500


def test_token_rule_is_four_characters_per_token_rounded_up():
    assert [count_tokens(t) for t in ["", "a", "abcd", "abcde"]] == [0, 1, 1, 2]


@pytest.mark.parametrize(
    "headers, status",
    [({}, 403), ({"x-goog-api-key": "wrong"}, 401), ({"x-goog-api-key": "right"}, 200)],
)
def test_api_key_is_required(headers, status):
    with GeminiEmulator(api_keys={"right"}) as emulator:
        response = httpx.post(
            f"{emulator.base_url}/v1beta/models/gemini-2.5-flash:generateContent",
            json={"contents": [{"parts": [{"text": "hi"}], "role": "user"}]},
            headers=headers,
        )
    assert response.status_code == status
    if status != 200:
        assert response.json()["error"]["code"] == status


def test_snake_case_request_keys_are_accepted():
    with GeminiEmulator() as emulator:
        response = httpx.post(
            f"{emulator.base_url}/v1/models/gemini-2.5-flash:generateContent",
            json={
                "contents": [{"parts": [{"text": "hi"}], "role": "user"}],
                "system_instruction": {"parts": [{"text": "be brief"}]},
                "generation_config": {"max_output_tokens": 2, "response_mime_type": "text/plain"},
            },
            headers={"x-goog-api-key": "k"},
        )
    body = response.json()
    assert body["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert body["usageMetadata"]["candidatesTokenCount"] == 2
    assert body["usageMetadata"]["promptTokenCount"] == count_tokens("hi") + count_tokens(
        "be brief"
    )


def test_rpm_quota_answers_429_with_retry_info_and_retry_after():
    with GeminiEmulator(rpm=3) as emulator:
        client = client_for(emulator)
        for i in range(3):
            client.models.generate_content(model="gemini-2.5-flash", contents=f"q{i}")
        with pytest.raises(genai_errors.ClientError) as caught:
            client.models.generate_content(model="gemini-2.5-flash", contents="one too many")
        error = caught.value
        assert error.code == 429 and error.status == "RESOURCE_EXHAUSTED"
        delay = float(error.response.headers["retry-after"])
        assert 55 <= delay <= 60
        [retry_info] = error.details["error"]["details"]
        assert retry_info["@type"].endswith("RetryInfo") and retry_info["retryDelay"].endswith("s")
        emulator.clock.advance(61)
        client.models.generate_content(model="gemini-2.5-flash", contents="after a minute")
        assert emulator.stats()["calls"]["generateContent|gemini-2.5-flash|429"] == 1


@pytest.mark.parametrize(
    "kind, sdk_error, category",
    [
        ("429", genai_errors.ClientError, "rate_limit"),
        ("400", genai_errors.ClientError, "permanent"),
        ("500", genai_errors.ServerError, "transient"),
        ("502_html", genai_errors.ServerError, "transient"),
        ("503", genai_errors.ServerError, "transient"),
        ("504", genai_errors.ServerError, "transient"),
        ("slow", httpx2.ReadTimeout, "timeout"),
        ("drop", httpx2.RemoteProtocolError, "transient"),
        ("malformed_json", json.JSONDecodeError, "transient"),
    ],
)
async def test_faults_reach_the_real_client_and_are_classified(kind, sdk_error, category):
    fault = Fault(kind=kind, times=1, delay=3.0, retry_after=1.5)
    with GeminiEmulator(faults=[fault]) as emulator:
        client = client_for(emulator, timeout_ms=1000)
        with pytest.raises(sdk_error) as caught:
            await client.aio.models.generate_content(model="gemini-2.5-flash", contents="x")
        info = GeminiErrorClassifier().classify(caught.value)
        assert info.error_category == category
        if kind == "429":
            assert info.is_rate_limit and info.suggested_wait == 2.0  # header: ceil(1.5)
            headerless = genai_errors.ClientError(
                429,
                caught.value.details,
                None,  # RetryInfo alone: retryDelay "1.5s"
            )
            assert GeminiErrorClassifier().classify(headerless).suggested_wait == 1.5
        # the fault fired once: the next call is answered
        answer = await client.aio.models.generate_content(model="gemini-2.5-flash", contents="x")
        assert answer.text


async def test_safety_and_prompt_blocks_come_back_as_the_real_service_sends_them():
    faults = [
        Fault(kind="safety", prompt_contains="unsafe"),
        Fault(kind="prompt_blocked", prompt_contains="forbidden"),
    ]
    with GeminiEmulator(faults=faults) as emulator:
        client = client_for(emulator)
        blocked = await client.aio.models.generate_content(
            model="gemini-2.5-flash", contents="unsafe"
        )
        assert blocked.text is None and blocked.candidates
        assert str(blocked.candidates[0].finish_reason.value) == "SAFETY"  # type: ignore[union-attr]
        rejected = await client.aio.models.generate_content(
            model="gemini-2.5-flash", contents="forbidden"
        )
        assert rejected.prompt_feedback is not None and rejected.prompt_feedback.block_reason


async def test_faults_by_call_number_and_streaming():
    with GeminiEmulator(faults=[Fault(kind="503", on_calls=[2])]) as emulator:
        client = client_for(emulator)
        await client.aio.models.generate_content(model="gemini-2.5-flash", contents="one")
        with pytest.raises(genai_errors.ServerError):
            await client.aio.models.generate_content(model="gemini-2.5-flash", contents="two")
        chunks = [
            chunk
            async for chunk in await client.aio.models.generate_content_stream(
                model="gemini-2.5-flash", contents="three"
            )
        ]
        assert len(chunks) >= 2 and chunks[-1].usage_metadata is not None
        text = "".join(c.text or "" for c in chunks)
        assert text.startswith("[gemini-2.5-flash#")


async def test_cache_lifecycle_on_the_emulator_clock():
    with GeminiEmulator(min_cache_tokens=100) as emulator:
        client = client_for(emulator)
        with pytest.raises(genai_errors.ClientError, match="Cached content is too small"):
            await client.aio.caches.create(
                model="gemini-2.5-flash",
                config=types.CreateCachedContentConfig(contents=["tiny"], ttl="60s"),
            )
        context = "word " * 200  # 250 tokens
        cache = await client.aio.caches.create(
            model="gemini-2.5-flash",
            config=types.CreateCachedContentConfig(contents=[context], ttl="60s"),
        )
        answer = await client.aio.models.generate_content(
            model="gemini-2.5-flash",
            contents="question",
            config=types.GenerateContentConfig(cached_content=cache.name),
        )
        usage = answer.usage_metadata
        assert usage is not None and usage.cached_content_token_count == 250
        assert usage.prompt_token_count == 250 + count_tokens("question")
        renewed = await client.aio.caches.update(
            name=cache.name or "", config=types.UpdateCachedContentConfig(ttl="120s")
        )
        assert renewed.create_time == cache.create_time
        assert renewed.expire_time and cache.expire_time
        assert renewed.expire_time > cache.expire_time
        emulator.clock.advance(121)
        with pytest.raises(genai_errors.ClientError, match=r"Cache content \w+ is expired"):
            await client.aio.models.generate_content(
                model="gemini-2.5-flash",
                contents="question",
                config=types.GenerateContentConfig(cached_content=cache.name),
            )
        stats = emulator.stats()
        assert stats["caches"] == {
            "created": 1,
            "deleted": 0,
            "updated": 1,
            "expired": 1,
            "live": 0,
            "live_names": [],
        }
        billed = stats["billed"]
        assert billed["cached_tokens"] == 250 and billed["storage_usd"] > 0


async def test_cache_list_pages_and_delete():
    with GeminiEmulator(min_cache_tokens=1) as emulator:
        client = client_for(emulator)
        names = []
        for i in range(5):
            cache = await client.aio.caches.create(
                model="gemini-2.5-flash",
                config=types.CreateCachedContentConfig(contents=[f"doc {i}"], display_name=f"d{i}"),
            )
            names.append(cache.name)
        pager = await client.aio.caches.list(config=types.ListCachedContentsConfig(page_size=2))
        listed = [c.name async for c in pager]
        assert listed == names
        await client.aio.caches.delete(name=names[0] or "")
        assert emulator.stats()["caches"]["live"] == 4
        with pytest.raises(genai_errors.ClientError) as missing:
            await client.aio.caches.get(name=names[0] or "")
        assert missing.value.code == 404


def test_stats_over_http_match_in_process_and_reset():
    with GeminiEmulator() as emulator:
        client = client_for(emulator)  # keep a reference: Client.__del__ closes it
        client.models.generate_content(model="gemini-2.5-flash", contents="hello")
        over_http = httpx.get(f"{emulator.base_url}/_emulator/stats").json()
        in_process = emulator.stats()
        assert (
            over_http["calls"] == in_process["calls"] == {"generateContent|gemini-2.5-flash|200": 1}
        )
        assert over_http["billed"]["input_tokens"] == count_tokens("hello")
        httpx.post(f"{emulator.base_url}/_emulator/reset")
        assert emulator.stats()["calls"] == {}


def test_emulator_runs_as_a_command():
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect_batch_llm.testing.emulator",
            "--port",
            "0",
            "--latency",
            "0.01",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        url = match.group(1)
        client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=url))
        answer = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
        assert answer.text and httpx.get(f"{url}/_emulator/stats").json()["generate_calls"] == 1
    finally:
        process.terminate()
        assert process.wait(timeout=15) == 0


def test_aiohttp_is_not_installed():
    """If aiohttp were importable, google-genai would switch transports (see the notes)."""
    with pytest.raises(ImportError):
        __import__("aiohttp")


def test_clock_and_faults_can_be_driven_over_http():
    with GeminiEmulator(min_cache_tokens=1) as emulator:
        client = client_for(emulator)
        cache = client.caches.create(
            model="gemini-2.5-flash",
            config=types.CreateCachedContentConfig(contents=["some context"], ttl="60s"),
        )
        httpx.post(f"{emulator.base_url}/_emulator/clock/advance", json={"seconds": 61})
        with pytest.raises(genai_errors.ClientError, match="is expired"):
            client.models.generate_content(
                model="gemini-2.5-flash",
                contents="q",
                config=types.GenerateContentConfig(cached_content=cache.name),
            )
        httpx.post(
            f"{emulator.base_url}/_emulator/faults", json={"faults": [{"kind": "503", "times": 1}]}
        )
        with pytest.raises(genai_errors.ServerError):
            client.models.generate_content(model="gemini-2.5-flash", contents="q")
        assert client.models.generate_content(model="gemini-2.5-flash", contents="q").text
