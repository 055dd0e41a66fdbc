"""Gemini Batch Mode for a Gemini strategy's items: jobs of `models/M:batchGenerateContent`.

Each request is built by the strategy exactly as its online call (`call_arguments()`: the
prompt, the generation settings, the shared context cache's name) and converted to the wire
format by google-genai's own converter, so a batch request and an online call cannot
differ. Requests go inline in the job while they fit `batch_inline_max_bytes`, otherwise in
a JSONL file uploaded through the Files API (a resumable upload). Answers come back by key
(the item id) and are parsed by the strategy's `parse_response()`; a request's error status
becomes the `APIError` an online call would have raised, so the classifier judges both alike.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from google.genai import batches as genai_batches
from google.genai import errors as genai_errors
from google.genai import models as genai_models
from google.genai import types

from prefect_batch_llm.batch_mode import BatchJobs, JobState, JobStatus, Outcome

if TYPE_CHECKING:
    from prefect_batch_llm.gemini.strategy import GeminiStrategy

logger = logging.getLogger("prefect_batch_llm")

#: google.rpc status codes of a request's error, as the HTTP status of the same online error.
_RPC_TO_HTTP = {
    1: 499,
    2: 500,
    3: 400,
    4: 504,
    5: 404,
    6: 409,
    7: 403,
    8: 429,
    9: 400,
    10: 409,
    11: 400,
    12: 501,
    13: 500,
    14: 503,
    15: 500,
    16: 401,
}


def api_error_of(status: dict[str, Any]) -> genai_errors.APIError:
    """A request's error status (`{"code": 13, "message": ...}`) as the error an online call
    with the same status raises."""
    raw = status.get("code")
    code = raw if isinstance(raw, int) else 500
    http = code if 100 <= code < 600 else _RPC_TO_HTTP.get(code, 500)
    body = {"error": {"code": http, "message": str(status.get("message") or ""), "status": ""}}
    if 400 <= http < 500:
        return genai_errors.ClientError(http, body)
    return genai_errors.ServerError(http, body)


def _state_of(job: types.BatchJob) -> JobState:
    raw = job.state.value if job.state is not None else ""
    try:
        return JobState(raw.removeprefix("JOB_STATE_"))
    except ValueError:
        return JobState.PENDING  # unspecified: not done yet


def _status_of(job: types.BatchJob) -> JobStatus:
    return JobStatus(
        name=job.name or "",
        state=_state_of(job),
        display_name=job.display_name,
        create_time=job.create_time,
        error=job.error.message if job.error is not None else None,
    )


class GeminiBatchJobs(BatchJobs):
    """Batch Mode jobs of one `GeminiStrategy` (or `GeminiCachedStrategy`)."""

    def __init__(self, strategy: GeminiStrategy) -> None:
        self.strategy = strategy

    async def _wire_requests(
        self, requests: Sequence[tuple[str, Any]]
    ) -> list[types.InlinedRequest]:
        built = []
        for key, prompt in requests:
            contents, config = await self.strategy.call_arguments(prompt)
            built.append(
                types.InlinedRequest(contents=contents, config=config, metadata={"key": key})
            )
        return built

    async def submit(self, requests: Sequence[tuple[str, Any]], display_name: str) -> str:
        strategy = self.strategy
        client = strategy.client()
        inlined = await self._wire_requests(requests)
        # google-genai's own conversion: the bytes a job of these requests sends.
        api_client = client._api_client
        lines = [genai_batches._InlinedRequest_to_mldev(api_client, r) for r in inlined]
        size = sum(len(json.dumps(line)) for line in lines)
        config = types.CreateBatchJobConfig(display_name=display_name)
        if size <= strategy.batch_inline_max_bytes:
            job = await client.aio.batches.create(model=strategy.model, src=inlined, config=config)
            logger.info("Batch job %s: %d requests inline (%d bytes)", job.name, len(lines), size)
        else:
            data = "".join(
                json.dumps({"key": line["metadata"]["key"], "request": line["request"]}) + "\n"
                for line in lines
            ).encode()
            uploaded = await client.aio.files.upload(
                file=io.BytesIO(data),
                config=types.UploadFileConfig(
                    mime_type="application/jsonl", display_name=display_name
                ),
            )
            job = await client.aio.batches.create(
                model=strategy.model, src=uploaded.name or "", config=config
            )
            logger.info(
                "Batch job %s: %d requests in file %s (%d bytes, above the inline limit of %d)",
                job.name,
                len(lines),
                uploaded.name,
                len(data),
                strategy.batch_inline_max_bytes,
            )
        if not job.name:
            raise genai_errors.ServerError(500, {"error": {"message": "job without a name"}})
        return job.name

    async def find(self, display_name: str) -> list[JobStatus]:
        pager = await self.strategy.client().aio.batches.list(
            config=types.ListBatchJobsConfig(page_size=100)
        )
        found = [_status_of(job) async for job in pager if job.display_name == display_name]
        return sorted(
            found, key=lambda s: s.create_time.timestamp() if s.create_time else 0.0, reverse=True
        )

    async def status(self, name: str) -> JobStatus:
        return _status_of(await self.strategy.client().aio.batches.get(name=name))

    async def outcomes(self, name: str) -> dict[str, Outcome]:
        client = self.strategy.client()
        job = await client.aio.batches.get(name=name)
        dest = job.dest
        found: dict[str, Outcome] = {}
        if dest is None:
            return found
        if dest.inlined_responses:
            for answer in dest.inlined_responses:
                key = (answer.metadata or {}).get("key")
                if key is not None:
                    error = answer.error.model_dump() if answer.error is not None else None
                    found[key] = self._outcome(answer.response, error)
        elif dest.file_name:
            raw = await client.aio.files.download(file=dest.file_name)
            for text in raw.decode("utf-8").splitlines():
                if not text.strip():
                    continue
                line = json.loads(text)
                response = None
                if isinstance(line.get("response"), dict):
                    response = types.GenerateContentResponse._from_response(
                        response=genai_models._GenerateContentResponse_from_mldev(line["response"]),
                        kwargs={},
                    )
                found[str(line.get("key"))] = self._outcome(response, line.get("error"))
        return found

    def _outcome(
        self, response: types.GenerateContentResponse | None, error: dict[str, Any] | None
    ) -> Outcome:
        if error is not None or response is None:
            return api_error_of(error or {"code": 13, "message": "no response"})
        try:
            return self.strategy.parse_response(response)
        except Exception as exc:  # blocked, empty, invalid JSON: carries the billed tokens
            return exc

    async def cancel(self, name: str) -> None:
        await self.strategy.client().aio.batches.cancel(name=name)

    async def keep_alive(self) -> None:
        """A cached strategy's cache is renewed when it expires within its renewal buffer,
        so the requests that name it can read it however long the job waits."""
        renew = getattr(self.strategy, "fresh_cache_name", None)
        if renew is not None:
            await renew()
