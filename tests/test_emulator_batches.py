"""The emulator's Batch Mode, Files API and Flex tier, driven by the real google-genai client."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from prefect_batch_llm.gemini.pricing import gemini_prices
from prefect_batch_llm.testing import BatchFault, Fault, GeminiEmulator, count_tokens

CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "notes" / "sdk-captures"
MODEL = "gemini-2.5-flash"
HOUR = 3600.0
HIGH_DEMAND = (
    "This model is currently experiencing high demand. Spikes in demand are usually "
    "temporary. Please try again later."
)


def client_for(emulator: GeminiEmulator) -> genai.Client:
    return genai.Client(
        api_key="test-key",
        http_options=types.HttpOptions(
            base_url=emulator.base_url,
            api_version="v1beta",
            timeout=10_000,
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )


def inline(prompts: dict[str, str], **config: Any) -> list[types.InlinedRequest]:
    """Inline requests keyed by item id (the key rides in `metadata.key`)."""
    return [
        types.InlinedRequest(
            contents=[types.Content(role="user", parts=[types.Part(text=text)])],
            metadata={"key": key},
            config=types.GenerateContentConfig(**config) if config else None,
        )
        for key, text in prompts.items()
    ]


def jsonl(prompts: dict[str, str], **request: Any) -> bytes:
    lines = [
        {"key": key, "request": {"contents": [{"role": "user", "parts": [{"text": text}]}]}}
        for key, text in prompts.items()
    ]
    for line in lines:
        line["request"].update(request)
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def by_key(job: types.BatchJob) -> dict[str, types.InlinedResponse]:
    assert job.dest is not None and job.dest.inlined_responses is not None
    return {str((r.metadata or {})["key"]): r for r in job.dest.inlined_responses}


def usage_totals(responses: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(uncached prompt, cached, output) tokens over GenerateContentResponse JSON bodies."""
    prompt = cached = output = 0
    for body in responses:
        usage = body["usageMetadata"]
        cached_here = usage.get("cachedContentTokenCount", 0)
        prompt += usage["promptTokenCount"] - cached_here
        cached += cached_here
        output += usage.get("candidatesTokenCount", 0) + usage.get("thoughtsTokenCount", 0)
    return prompt, cached, output


# -- inline and file jobs, end to end -----------------------------------------------------


def test_inline_job_takes_hours_instantly_and_answers_by_key_at_the_batch_rate():
    prompts = {f"item-{i}": f"Summarize document number {i} in one line" for i in range(6)}
    with GeminiEmulator(batch_pending_seconds=HOUR, batch_running_seconds=5 * HOUR) as emulator:
        client = client_for(emulator)
        online = {
            key: client.models.generate_content(model=MODEL, contents=text).text
            for key, text in prompts.items()
        }
        standard_before = emulator.stats()["billed"]

        job = client.batches.create(
            model=MODEL, src=inline(prompts), config={"display_name": "nightly"}
        )
        assert job.name and job.name.startswith("batches/")
        assert job.state == types.JobState.JOB_STATE_PENDING
        assert job.display_name == "nightly" and job.model == f"models/{MODEL}"
        assert client.batches.get(name=job.name).state == types.JobState.JOB_STATE_PENDING

        assert emulator.stats()["batches"]["in_progress"] == 1
        emulator.clock.advance(HOUR)
        running = client.batches.get(name=job.name)
        assert running.state == types.JobState.JOB_STATE_RUNNING and running.dest is None

        emulator.clock.advance(5 * HOUR)
        finished = client.batches.get(name=job.name)
        assert finished.state == types.JobState.JOB_STATE_SUCCEEDED
        assert finished.end_time is not None and finished.create_time is not None
        assert (finished.end_time - finished.create_time).total_seconds() == pytest.approx(6 * HOUR)
        results = by_key(finished)
        assert set(results) == set(prompts)
        # The same generation logic as generateContent: identical outputs.
        assert {k: r.response.text for k, r in results.items() if r.response} == online

        stats = emulator.stats()
        assert stats["batches"]["created"] == 1 and stats["batches"]["succeeded"] == 1
        assert stats["batches"]["requests"] == stats["batches"]["requests_succeeded"] == 6
        assert stats["billed"] == standard_before, "batch tokens are not billed as online"
        prompt = output = 0
        for r in results.values():
            assert r.response is not None and r.response.usage_metadata is not None
            prompt += r.response.usage_metadata.prompt_token_count or 0
            output += r.response.usage_metadata.candidates_token_count or 0
        batch = stats["billed_by_path"]["batch"]
        assert (batch["input_tokens"], batch["cached_tokens"], batch["output_tokens"]) == (
            prompt,
            0,
            output,
        )
        price_in, price_out, _, _ = gemini_prices(MODEL)
        full_price = (prompt * price_in + output * price_out) / 1e6
        assert batch["total_usd"] == pytest.approx(full_price / 2, rel=1e-6)
        assert stats["billed_by_path"]["standard"]["total_usd"] == stats["billed"]["total_usd"]


def test_batch_requests_naming_a_live_cache_bill_cached_tokens_and_an_expired_one_errors():
    context = "The handbook. " * 40
    with GeminiEmulator(min_cache_tokens=10, batch_running_seconds=HOUR) as emulator:
        client = client_for(emulator)
        cache = client.caches.create(
            model=MODEL,
            config=types.CreateCachedContentConfig(contents=[context], ttl="7200s"),
        )
        cache_tokens = count_tokens(context)
        prompts = {f"q{i}": f"Question {i} about the handbook?" for i in range(4)}
        job = client.batches.create(
            model=MODEL, src=inline(prompts, cached_content=cache.name), config={}
        )
        short = client.caches.create(
            model=MODEL, config=types.CreateCachedContentConfig(contents=[context], ttl="600s")
        )
        doomed = client.batches.create(
            model=MODEL, src=inline({"late": "Too late?"}, cached_content=short.name)
        )
        emulator.clock.advance(2 * HOUR)

        results = by_key(client.batches.get(name=job.name))
        for key, text in prompts.items():
            usage = results[key].response.usage_metadata  # type: ignore[union-attr]
            assert usage is not None and usage.cached_content_token_count == cache_tokens
            assert usage.prompt_token_count == cache_tokens + count_tokens(text)
        batch = emulator.stats()["billed_by_path"]["batch"]
        assert batch["cached_tokens"] == 4 * cache_tokens
        assert batch["input_tokens"] == sum(count_tokens(t) for t in prompts.values())
        # Batch Mode bills cached tokens at 2.5 Flash's standard cached price ("priced the
        # same as for non-batch API traffic"); the table's batch path says so.
        _, _, price_cached, _ = gemini_prices(MODEL, path="batch")
        assert price_cached == gemini_prices(MODEL)[2]
        assert batch["cached_usd"] == pytest.approx(4 * cache_tokens * price_cached / 1e6)

        # The short cache expired 10 minutes in, before the job finished an hour in.
        late = by_key(client.batches.get(name=doomed.name))["late"]
        assert late.response is None and late.error is not None
        assert late.error.code == 3 and "is expired" in (late.error.message or "")
        assert emulator.stats()["batches"]["requests_failed"] == 1


async def test_file_job_upload_create_poll_download_with_the_async_client():
    prompts = {f"row-{i}": f"Classify row {i}" for i in range(5)}
    data = jsonl(prompts, generationConfig={"temperature": 0.2})
    with GeminiEmulator(batch_pending_seconds=60, batch_running_seconds=3 * HOUR) as emulator:
        client = client_for(emulator).aio
        uploaded = await client.files.upload(
            file=io.BytesIO(data),
            config=types.UploadFileConfig(mime_type="application/jsonl", display_name="rows"),
        )
        assert uploaded.name and re.fullmatch(r"files/[a-z0-9]+", uploaded.name)
        assert uploaded.size_bytes == len(data) and uploaded.state == types.FileState.ACTIVE
        assert uploaded.mime_type == "application/jsonl" and uploaded.display_name == "rows"
        assert uploaded.source == types.FileSource.UPLOADED and uploaded.expiration_time
        assert (await client.files.get(name=uploaded.name)).size_bytes == len(data)

        job = await client.batches.create(model=MODEL, src=uploaded.name)
        states = [job.state]
        for _ in range(5):
            emulator.clock.advance(HOUR)
            job = await client.batches.get(name=job.name or "")
            states.append(job.state)
        pending, running = types.JobState.JOB_STATE_PENDING, types.JobState.JOB_STATE_RUNNING
        succeeded = types.JobState.JOB_STATE_SUCCEEDED
        assert states == [pending, running, running, running, succeeded, succeeded]
        assert job.dest is not None and job.dest.file_name
        output = await client.files.get(name=job.dest.file_name)
        assert output.source == types.FileSource.GENERATED and output.download_uri
        raw = await client.files.download(file=output)
        lines = [json.loads(line) for line in raw.decode().splitlines()]
        assert [line["key"] for line in lines] == list(prompts), "same order as the input"
        for line in lines:
            text = line["response"]["candidates"][0]["content"]["parts"][0]["text"]
            assert prompts[line["key"]] in text
        prompt, cached, output_tokens = usage_totals([line["response"] for line in lines])
        batch = emulator.stats()["billed_by_path"]["batch"]
        assert (batch["input_tokens"], batch["cached_tokens"], batch["output_tokens"]) == (
            prompt,
            cached,
            output_tokens,
        )
        await client.files.delete(name=uploaded.name)
        with pytest.raises(genai_errors.ClientError) as gone:
            await client.files.get(name=uploaded.name)
        assert gone.value.code == 403  # the hosted Files API's answer for a missing file
        files = emulator.stats()["files"]
        assert (files["uploaded"], files["generated"], files["deleted"]) == (1, 1, 1)
        assert files["downloads"] == 1 and files["bytes_uploaded"] == len(data)
        listed = [f.name async for f in await client.files.list(config={"page_size": 1})]
        assert listed == [job.dest.file_name]


def test_uploads_in_several_chunks_and_rejects_a_wrong_offset(monkeypatch):
    from google.genai import _api_client

    monkeypatch.setattr(_api_client, "CHUNK_SIZE", 100)
    data = jsonl({f"k{i}": f"prompt {i}" for i in range(10)})
    assert len(data) > 300
    with GeminiEmulator() as emulator:
        client = client_for(emulator)
        uploaded = client.files.upload(
            file=io.BytesIO(data), config={"mime_type": "application/jsonl"}
        )
        assert uploaded.size_bytes == len(data)
        chunks = math.ceil(len(data) / 100)
        assert emulator.stats()["calls_by_endpoint"]["files.upload"] == 1 + chunks

        start = httpx.post(
            f"{emulator.base_url}/upload/v1beta/files",
            headers={
                "x-goog-api-key": "k",
                "X-Goog-Upload-Protocol": "resumable",
                "X-Goog-Upload-Command": "start",
                "X-Goog-Upload-Header-Content-Length": "4",
                "X-Goog-Upload-Header-Content-Type": "text/plain",
            },
            json={"file": {"display_name": "x"}},
        )
        url = start.headers["x-goog-upload-url"]
        assert "upload_id=" in url and start.headers["x-goog-upload-status"] == "active"
        wrong = httpx.post(
            url,
            headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "2"},
            content=b"abcd",
        )
        assert wrong.status_code == 400 and wrong.headers["x-goog-upload-status"] == "final"


def test_a_payload_above_the_inline_limit_needs_the_file_path():
    prompts = {f"doc-{i}": f"Document {i}: " + "lorem ipsum " * 30 for i in range(8)}
    with GeminiEmulator() as emulator:
        emulator.configure_batches(inline_limit_bytes=2_000, running_seconds=0)
        client = client_for(emulator)
        with pytest.raises(genai_errors.ClientError) as too_big:
            client.batches.create(model=MODEL, src=inline(prompts))
        assert too_big.value.code == 400
        assert "Request payload size exceeds the limit: 2000 bytes" in str(too_big.value)
        assert emulator.stats()["batches"]["created"] == 0

        uploaded = client.files.upload(
            file=io.BytesIO(jsonl(prompts)), config={"mime_type": "application/jsonl"}
        )
        job = client.batches.create(model=MODEL, src=uploaded.name)
        emulator.clock.advance(5)
        done = client.batches.get(name=job.name or "")
        assert done.state == types.JobState.JOB_STATE_SUCCEEDED
        raw = client.files.download(file=done.dest.file_name)  # type: ignore[union-attr]
        assert {json.loads(line)["key"] for line in raw.decode().splitlines()} == set(prompts)


# -- job states and faults ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "advance", "state"),
    [
        ({"batch_queued_seconds": 60}, 0, "JOB_STATE_QUEUED"),
        ({"batch_queued_seconds": 60, "batch_pending_seconds": 60}, 90, "JOB_STATE_PENDING"),
        ({"batch_running_seconds": 60}, 30, "JOB_STATE_RUNNING"),
        ({}, 5, "JOB_STATE_SUCCEEDED"),
        ({"batch_faults": [BatchFault(kind="fail", message="boom")]}, 5, "JOB_STATE_FAILED"),
        ({"batch_faults": [BatchFault(kind="expire")]}, 47 * HOUR, "JOB_STATE_RUNNING"),
        ({"batch_faults": [BatchFault(kind="expire")]}, 48 * HOUR, "JOB_STATE_EXPIRED"),
        ({"batch_running_seconds": 50 * HOUR}, 48 * HOUR, "JOB_STATE_EXPIRED"),
        (
            {"batch_faults": [BatchFault(kind="partially_succeeded", keys=["b"])]},
            5,
            "JOB_STATE_PARTIALLY_SUCCEEDED",
        ),
        ({}, "cancel", "JOB_STATE_CANCELLED"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_every_job_state_is_reachable(setup, advance, state):
    with GeminiEmulator(**setup) as emulator:
        client = client_for(emulator)
        job = client.batches.create(model=MODEL, src=inline({"a": "first", "b": "second"}))
        assert job.name
        if advance == "cancel":
            client.batches.cancel(name=job.name)
        else:
            emulator.clock.advance(advance)
        seen = client.batches.get(name=job.name)
        assert seen.state == types.JobState(state)
        terminal = state not in ("JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_RUNNING")
        raw = httpx.get(
            f"{emulator.base_url}/v1beta/{job.name}", headers={"x-goog-api-key": "k"}
        ).json()
        assert raw.get("done", False) is terminal
        counters = emulator.stats()["batches"]
        name = state.removeprefix("JOB_STATE_").lower()
        if name in counters:
            assert counters[name] == 1
        if state == "JOB_STATE_FAILED":
            assert seen.dest is None and raw["error"]["message"] == "boom"
            assert emulator.stats()["billed_by_path"]["batch"]["input_tokens"] == 0
        if state == "JOB_STATE_EXPIRED":
            assert seen.dest is None
            assert (seen.end_time - seen.create_time).total_seconds() == pytest.approx(48 * HOUR)  # type: ignore[operator]
        if state == "JOB_STATE_PARTIALLY_SUCCEEDED":
            results = by_key(seen)
            assert results["a"].response is not None and results["a"].error is None
            assert results["b"].response is None and results["b"].error is not None
            assert results["b"].error.code == 13
            assert raw["metadata"]["batchStats"] == {
                "requestCount": "2",
                "successfulRequestCount": "1",
                "failedRequestCount": "1",
            }


def test_per_request_faults_errors_safety_and_missing_keep_the_job_succeeded():
    prompts = {"ok": "a fine prompt", "bad": "a bad prompt", "risky": "a risky prompt", "gone": "x"}
    faults = [
        Fault(kind="500", prompt_contains="bad", tier="batch"),
        Fault(kind="safety", prompt_contains="risky", tier="batch"),
        Fault(kind="503", tier="standard"),  # online calls only
        Fault(kind="drop", tier="batch"),  # a transport fault never hits a batch request
    ]
    with GeminiEmulator(
        faults=faults, batch_faults=[BatchFault(kind="missing", keys=["gone"])]
    ) as emulator:
        client = client_for(emulator)
        job = client.batches.create(model=MODEL, src=inline(prompts))
        emulator.clock.advance(5)
        done = client.batches.get(name=job.name or "")
        assert done.state == types.JobState.JOB_STATE_SUCCEEDED
        results = by_key(done)
        assert set(results) == {"ok", "bad", "risky"}, "'gone' is missing from the output"
        assert results["ok"].response is not None and results["ok"].response.text
        assert results["bad"].error is not None and results["bad"].error.code == 13
        blocked = results["risky"].response
        assert blocked is not None and blocked.candidates
        assert blocked.candidates[0].finish_reason == types.FinishReason.SAFETY
        counters = emulator.stats()["batches"]
        assert (counters["requests_succeeded"], counters["requests_failed"]) == (2, 1)
        assert counters["requests_missing"] == 1
        batch = emulator.stats()["billed_by_path"]["batch"]
        # "ok" is billed in full, "risky" for its prompt only; "bad" and "gone" not at all.
        assert batch["input_tokens"] == count_tokens("a fine prompt") + count_tokens(
            "a risky prompt"
        )
        with pytest.raises(genai_errors.ServerError):
            client.models.generate_content(model=MODEL, contents="online")


def test_batches_get_answers_503_n_times_then_the_job():
    with GeminiEmulator(batch_faults=[BatchFault(kind="get_503", times=2)]) as emulator:
        client = client_for(emulator)
        job = client.batches.create(model=MODEL, src=inline({"a": "x"}))
        for _ in range(2):
            with pytest.raises(genai_errors.ServerError) as unavailable:
                client.batches.get(name=job.name or "")
            assert unavailable.value.code == 503 and unavailable.value.status == "UNAVAILABLE"
        emulator.clock.advance(5)
        assert client.batches.get(name=job.name or "").state == types.JobState.JOB_STATE_SUCCEEDED
        assert emulator.stats()["batches"]["get_503"] == 2


def test_a_lost_create_answer_still_creates_and_bills_the_job():
    faults = [
        BatchFault(kind="create_error", on_jobs=[1], times=1),
        BatchFault(kind="create_lost", display_name_contains="lost"),
    ]
    with GeminiEmulator(batch_faults=faults) as emulator:
        client = client_for(emulator)
        with pytest.raises(genai_errors.ServerError):
            client.batches.create(model=MODEL, src=inline({"a": "x"}), config={"display_name": "e"})
        assert emulator.stats()["batches"]["created"] == 0
        with pytest.raises(genai_errors.ServerError):
            client.batches.create(
                model=MODEL, src=inline({"a": "x"}), config={"display_name": "lost-1"}
            )
        assert emulator.stats()["batches"]["created"] == 1
        (job,) = list(client.batches.list())
        assert job.display_name == "lost-1"
        emulator.clock.advance(5)
        assert client.batches.get(name=job.name or "").state == types.JobState.JOB_STATE_SUCCEEDED
        assert emulator.stats()["billed_by_path"]["batch"]["input_tokens"] == count_tokens("x")


async def test_cancel_delete_and_list_paging():
    with GeminiEmulator(batch_running_seconds=HOUR) as emulator:
        client = client_for(emulator).aio
        names = []
        for i in range(5):
            job = await client.batches.create(
                model=MODEL, src=inline({"k": f"p{i}"}), config={"display_name": f"job-{i}"}
            )
            names.append(job.name)
        await client.batches.cancel(name=names[0] or "")
        cancelled = await client.batches.get(name=names[0] or "")
        assert cancelled.state == types.JobState.JOB_STATE_CANCELLED and cancelled.end_time
        emulator.clock.advance(2 * HOUR)
        assert (await client.batches.get(name=names[0] or "")).dest is None
        with pytest.raises(genai_errors.ClientError) as finished:
            await client.batches.cancel(name=names[1] or "")
        assert finished.value.code == 400 and finished.value.status == "FAILED_PRECONDITION"

        pager = await client.batches.list(config={"page_size": 2})
        assert len(pager.page) == 2
        listed = [j.name async for j in pager]
        assert listed == list(reversed(names)), "newest first, over three pages"
        raw = httpx.get(
            f"{emulator.base_url}/v1beta/batches",
            params={"pageSize": 2, "pageToken": "4"},
            headers={"x-goog-api-key": "k"},
        ).json()
        assert [o["name"] for o in raw["operations"]] == [names[0]]
        assert "nextPageToken" not in raw

        await client.batches.delete(name=names[2] or "")
        with pytest.raises(genai_errors.ClientError) as gone:
            await client.batches.get(name=names[2] or "")
        assert gone.value.code == 404
        assert len([j async for j in await client.batches.list()]) == 4
        counters = emulator.stats()["batches"]
        assert (counters["created"], counters["cancelled"], counters["deleted"]) == (5, 1, 1)
        assert counters["succeeded"] == 4 and counters["requests"] == 5


# -- the Flex tier ------------------------------------------------------------------------


def test_flex_is_billed_on_its_own_path_and_shed_while_standard_succeeds():
    seen: list[dict[str, Any]] = []

    def spy(model: str, prompt: str, body: dict[str, Any]) -> None:
        seen.append(body)

    flex = types.GenerateContentConfig(service_tier="flex")
    with GeminiEmulator(response_fn=spy) as emulator:
        client = client_for(emulator)
        answer = client.models.generate_content(model=MODEL, contents="cheap please", config=flex)
        assert seen[-1]["serviceTier"] == "flex", "google-genai sends it at the top of the body"
        assert answer.sdk_http_response and answer.sdk_http_response.headers
        assert answer.sdk_http_response.headers["x-gemini-service-tier"] == "flex"
        standard = client.models.generate_content(model=MODEL, contents="cheap please")
        assert standard.text == answer.text

        stats = emulator.stats()
        usage = answer.usage_metadata
        assert usage is not None
        flex_billed = stats["billed_by_path"]["flex"]
        assert flex_billed["input_tokens"] == usage.prompt_token_count
        assert flex_billed["output_tokens"] == usage.candidates_token_count
        assert flex_billed["total_usd"] * 2 == pytest.approx(stats["billed"]["total_usd"])
        assert stats["billed"]["input_tokens"] == usage.prompt_token_count, "standard apart"
        assert stats["flex_calls"] == 1

        emulator.add_fault(Fault(kind="flex_shed", times=2))
        for _ in range(2):
            with pytest.raises(genai_errors.ServerError) as shed:
                client.models.generate_content(model=MODEL, contents="cheap please", config=flex)
            assert shed.value.code == 503 and shed.value.status == "UNAVAILABLE"
            assert shed.value.message == HIGH_DEMAND
            assert client.models.generate_content(model=MODEL, contents="cheap please").text
        assert client.models.generate_content(model=MODEL, contents="now", config=flex).text
        stats = emulator.stats()
        assert (stats["flex_calls"], stats["flex_shed"]) == (4, 2)
        flex_tokens = count_tokens("cheap please") + count_tokens("now")
        assert stats["billed_by_path"]["flex"]["input_tokens"] == flex_tokens


def test_flex_tier_in_rest_spelling_and_faults_by_tier():
    with GeminiEmulator(faults=[Fault(kind="429", tier="flex", times=1)]) as emulator:
        with httpx.Client(base_url=emulator.base_url, headers={"x-goog-api-key": "k"}) as http:
            body = {"contents": [{"parts": [{"text": "hi"}]}], "service_tier": "FLEX"}
            url = f"/v1beta/models/{MODEL}:generateContent"
            assert http.post(url, json={"contents": body["contents"]}).status_code == 200
            assert http.post(url, json=body).status_code == 429
            answered = http.post(url, json=body)
            assert answered.headers["x-gemini-service-tier"] == "flex"
        assert emulator.stats()["billed_by_path"]["flex"]["input_tokens"] == count_tokens("hi")


# -- control over HTTP, the command, counters -----------------------------------------------


def test_jobs_clock_and_batch_faults_are_driven_over_http():
    with GeminiEmulator() as emulator:
        base = emulator.base_url
        config = httpx.post(
            f"{base}/_emulator/batches/config",
            json={"pending_seconds": 600, "running_seconds": 7200, "inline_limit_bytes": 10_000},
        ).json()
        assert config["pending_seconds"] == 600 and config["inline_limit_bytes"] == 10_000
        counts = httpx.post(
            f"{base}/_emulator/faults",
            json={"batch_faults": [{"kind": "get_503", "times": 1}, {"kind": "fail"}]},
        ).json()
        assert counts == {"faults": 0, "batch_faults": 2}
        client = client_for(emulator)
        job = client.batches.create(model=MODEL, src=inline({"a": "x"}))
        with pytest.raises(genai_errors.ServerError):
            client.batches.get(name=job.name or "")
        httpx.post(f"{base}/_emulator/clock/advance", json={"seconds": 600})
        assert client.batches.get(name=job.name or "").state == types.JobState.JOB_STATE_RUNNING
        httpx.post(f"{base}/_emulator/clock/advance", json={"seconds": 7200})
        assert client.batches.get(name=job.name or "").state == types.JobState.JOB_STATE_FAILED
        over_http = httpx.get(f"{base}/_emulator/stats").json()
        assert over_http["batches"]["created"] == 1 and over_http["batches"]["failed"] == 1
        assert over_http["batches"]["get_503"] == 1
        assert set(over_http["billed_by_path"]) == {"standard", "flex", "batch"}
        httpx.post(f"{base}/_emulator/reset")
        assert emulator.stats()["batches"]["created"] == 0
        assert client.batches.get(name=job.name or "").name == job.name, "jobs survive a reset"


def test_the_command_takes_batch_settings_and_batch_faults(tmp_path):
    scripted = tmp_path / "faults.json"
    scripted.write_text(json.dumps({"faults": [], "batch_faults": [{"kind": "expire"}]}))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect_batch_llm.testing.emulator",
            "--port",
            "0",
            "--batch-pending-seconds",
            "30",
            "--batch-running-seconds",
            "90",
            "--faults",
            str(scripted),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", process.stdout.readline())
        assert match
        url = match.group(1)
        config = httpx.get(f"{url}/_emulator/batches/config").json()
        assert (config["pending_seconds"], config["running_seconds"]) == (30, 90)
        client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=url))
        job = client.batches.create(model=MODEL, src=inline({"a": "x"}))
        httpx.post(f"{url}/_emulator/clock/advance", json={"seconds": 48 * HOUR})
        assert client.batches.get(name=job.name or "").state == types.JobState.JOB_STATE_EXPIRED
    finally:
        process.terminate()
        assert process.wait(timeout=15) == 0


# -- the captured SDK traffic ---------------------------------------------------------------


def _captured(probe: str) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    pairs: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    for line in (CAPTURES / f"{probe}.requests.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["dir"] == "req":
            pairs.append((record, None))
        elif pairs and pairs[-1][1] is None:
            pairs[-1] = (pairs[-1][0], record)
    return pairs


def _chunk_body(captured: Any) -> bytes:
    """The bytes of a captured upload chunk. The captures cut string bodies at 200
    characters, so only whole JSONL lines are kept (one rebuilt from the key if none is)."""
    text = captured if isinstance(captured, str) else json.dumps(captured) + "\n"
    whole = [line for line in text.split("\n")[:-1] if line.strip()] if "\n" in text else []
    if not whole and text.endswith("}"):
        whole = [text]
    if not whole:
        key = re.search(r'"key":\s*"([^"]+)"', text)
        line = {
            "key": key.group(1) if key else "k",
            "request": {"contents": [{"parts": [{"text": "x"}]}]},
        }
        whole = [json.dumps(line)]
    return "".join(f"{line}\n" for line in whole).encode()


@pytest.mark.skipif(not CAPTURES.exists(), reason="shared/notes/sdk-captures not beside the repo")
def test_captured_batch_and_file_requests_get_well_formed_answers():
    """Replays probe3 (google-genai Batch Mode, uploads, downloads) and probe6 (pydantic-ai's
    batch requests) in order, mapping the captured ids to the ones the emulator gives."""
    ids: dict[str, str] = {}  # captured batch/file id -> the emulator's
    states: dict[str, list[str]] = {}  # captured batch name -> [captured, replayed] states
    uploads: dict[str, str] = {}  # captured upload path -> the emulator's upload URL
    replayed = 0
    with (
        GeminiEmulator(
            min_cache_tokens=1, batch_pending_seconds=10, batch_running_seconds=20
        ) as emulator,
        httpx.Client(base_url=emulator.base_url, timeout=10) as http,
    ):
        for probe in ("probe3", "probe6"):
            exchanges = _captured(probe)
            for index, (request, captured) in enumerate(exchanges):
                path = request["path"]
                for old, new in ids.items():
                    path = path.replace(old, new)
                headers = {
                    k: v
                    for k, v in request["headers"].items()
                    if k.lower().startswith("x-goog") and "redacted" not in v
                }
                query = {k: v[0] for k, v in (request.get("query") or {}).items()}
                content: bytes | None = None
                if request["path"] == "/upload/v1beta/files":
                    chunk = _chunk_body(exchanges[index + 1][0]["body"])
                    headers["X-Goog-Upload-Header-Content-Length"] = str(len(chunk))
                    content = json.dumps(request["body"]).encode()
                elif request["path"].startswith("/resumable/"):
                    content = _chunk_body(request["body"])
                    url = uploads[request["path"]]
                    response = http.post(url, headers=headers, content=content)
                elif request["body"] is not None:
                    raw = json.dumps(request["body"])
                    for old, new in ids.items():
                        raw = raw.replace(old, new)
                    content = raw.encode()
                if not request["path"].startswith("/resumable/"):
                    if request["method"] == "GET" and "/batches/" in path:
                        emulator.clock.advance(15)  # the captured jobs' pace
                    headers["x-goog-api-key"] = "k"
                    headers["content-type"] = "application/json"
                    response = http.request(
                        request["method"], path, params=query, content=content, headers=headers
                    )
                replayed += 1
                where = f"{probe} {request['method']} {request['path']}"
                assert response.status_code == 200, (where, response.text[:300])
                if request["path"] == "/upload/v1beta/files":
                    assert response.headers["x-goog-upload-status"] == "active", where
                    old_url = (captured or {})["headers"]["X-Goog-Upload-URL"]
                    uploads[httpx.URL(old_url).path] = response.headers["x-goog-upload-url"]
                    continue
                if path.endswith(":streamGenerateContent"):
                    assert response.text.startswith("data: "), where
                    continue
                if path.endswith(":download"):
                    lines = [json.loads(x) for x in response.text.splitlines()]
                    assert lines and all("key" in x and "response" in x for x in lines), where
                    continue
                answer = response.json()
                old = (captured or {}).get("body")
                if request["path"].startswith("/resumable/"):
                    assert response.headers["x-goog-upload-status"] == "final", where
                    assert answer["file"]["state"] == "ACTIVE", where
                    ids[old["file"]["name"].removeprefix("files/")] = answer["file"][
                        "name"
                    ].removeprefix("files/")
                elif isinstance(old, dict) and "metadata" in old:
                    assert answer["name"].startswith("batches/"), where
                    assert answer["metadata"]["@type"].endswith("GenerateContentBatch"), where
                    ids.setdefault(
                        old["name"].removeprefix("batches/"),
                        answer["name"].removeprefix("batches/"),
                    )
                    pair = states.setdefault(old["name"], [])
                    pair.append(f"{old['metadata']['state']}={answer['metadata']['state']}")
                    captured_out = old["metadata"].get("output", {}).get("responsesFile")
                    if captured_out:
                        mine = answer["metadata"]["output"]["responsesFile"]
                        ids[captured_out.removeprefix("files/")] = mine.removeprefix("files/")
                elif isinstance(old, dict) and "operations" in old:
                    assert {o["name"] for o in answer["operations"]} >= {
                        "batches/" + ids[o["name"].removeprefix("batches/")]
                        for o in old["operations"]
                    }, where
    assert replayed >= 30, replayed
    assert len(states) == 6
    for name, pairs in states.items():
        for pair in pairs:
            captured_state, replayed_state = pair.split("=")
            assert captured_state == replayed_state, (name, pairs)
