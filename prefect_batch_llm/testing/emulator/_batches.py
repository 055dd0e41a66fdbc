"""Batch Mode routes: `models/{m}:batchGenerateContent` and `batches` get/list/cancel/delete.

As google-genai 3.3.0 sends them (`client.batches.create/get/list/cancel/delete`):

- `POST /{v}/models/{m}:batchGenerateContent` with `{"batch": {"displayName": ...,
  "inputConfig": {"requests": {"requests": [{"request": {...}, "metadata": {"key": ...}}]}}}}`
  (inline) or `{"inputConfig": {"fileName": "files/..."}}` (an uploaded JSONL file, one
  `{"key": ..., "request": {...}}` per line) answers the long-running operation
  `{"name": "batches/...", "metadata": {"@type": ...GenerateContentBatch, "state": ...}}`;
- `GET /{v}/batches/{id}` answers the same operation; once done, `"done": true` and the
  output in both `metadata.output` (which the SDK reads) and `response`:
  `inlinedResponses.inlinedResponses[*]` (`response` or `error`, with the request's
  `metadata`) for inline jobs, `responsesFile` (a JSONL of `{"key", "response"|"error"}`
  lines to download) for file jobs;
- `GET /{v}/batches?pageSize=&pageToken=` answers `{"operations": [...], "nextPageToken"}`;
- `POST /{v}/batches/{id}:cancel` and `DELETE /{v}/batches/{id}` answer `{}`.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from prefect_batch_llm.testing.emulator._http import Reply, check, done, error, read_json
from prefect_batch_llm.testing.emulator._jobs import BatchRequest
from prefect_batch_llm.testing.emulator._responses import pick
from prefect_batch_llm.testing.emulator._state import EmulatorState

_NOT_FOUND = "Requested entity was not found."


class BatchRoutes:
    """Batch Mode routes bound to one `EmulatorState`."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    def routes(self) -> list[Route]:
        return [
            Route("/{version}/batches", self.list, methods=["GET"]),
            Route("/{version}/batches/{batch_id}", self.batch, methods=["GET", "POST", "DELETE"]),
        ]

    # -- create ----------------------------------------------------------------------------

    async def create(self, request: Request, model: str) -> Response:
        """`models/{model}:batchGenerateContent` (the API key is already checked)."""
        endpoint = "batchGenerateContent"
        store = self.state.batches
        try:
            raw = await request.body()
            if len(raw) > store.inline_limit_bytes:
                raise Reply(
                    error(
                        400,
                        f"Request payload size exceeds the limit: {store.inline_limit_bytes} "
                        "bytes.",
                    )
                )
            body = await read_json(request)
            batch = pick(body, "batch") or {}
            config = pick(batch, "inputConfig") or {}
            display_name = pick(batch, "displayName")
            file_name = pick(config, "fileName")
            inline = pick(config, "requests")
            if (file_name is None) == (inline is None):
                raise Reply(
                    error(400, "batch.input_config must set exactly one of file_name or requests.")
                )
            if inline is not None:
                requests = self._inline(inline)
            else:
                requests = self._from_file(str(file_name))
            if not requests:
                raise Reply(error(400, "The batch has no requests."))
            fault = store.create_fault(display_name)
            if fault is not None and fault.kind == "create_error":
                with self.state.lock:
                    store.create_errors += 1
                raise Reply(error(503, fault.message or "The service is currently unavailable."))
            job = store.create(
                model,
                display_name,
                requests,
                None if file_name is None else self._file_ref(str(file_name)),
                request.headers.get("x-goog-api-key", ""),
                request.path_params.get("version", "v1beta"),
            )
            if fault is not None:  # create_lost: the job exists, its answer is lost
                with self.state.lock:
                    store.create_errors += 1
                raise Reply(error(503, fault.message or "The service is currently unavailable."))
            operation = job.operation(self.state.clock.datetime())
            return done(self.state, endpoint, model, JSONResponse(operation))
        except Reply as reply:
            return done(self.state, endpoint, model, reply.response)

    @staticmethod
    def _inline(inline: Any) -> list[BatchRequest]:
        items = pick(inline, "requests") if isinstance(inline, dict) else None
        if not isinstance(items, list):
            raise Reply(error(400, "batch.input_config.requests.requests must be a list."))
        requests: list[BatchRequest] = []
        for index, item in enumerate(items):
            body = item.get("request") if isinstance(item, dict) else None
            if not isinstance(body, dict):
                raise Reply(error(400, f"requests[{index}].request must be an object."))
            metadata = item.get("metadata")
            kept = metadata if isinstance(metadata, dict) else None
            requests.append(BatchRequest(request=body, metadata=kept))
        return requests

    @staticmethod
    def _file_ref(file_name: str) -> str:
        return file_name if file_name.startswith("files/") else f"files/{file_name}"

    def _from_file(self, file_name: str) -> list[BatchRequest]:
        name = self._file_ref(file_name)
        stored = self.state.files.get(name)
        if stored is None:
            raise Reply(error(404, f"{_NOT_FOUND} ({name})"))
        requests: list[BatchRequest] = []
        for number, line in enumerate(stored.data.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise Reply(error(400, f"{name} line {number} is not JSON: {exc}")) from None
            body = entry.get("request") if isinstance(entry, dict) else None
            if not isinstance(body, dict):
                raise Reply(error(400, f"{name} line {number} has no request object."))
            key = entry.get("key")
            requests.append(BatchRequest(request=body, key=None if key is None else str(key)))
        return requests

    # -- batches ---------------------------------------------------------------------------

    async def list(self, request: Request) -> Response:
        endpoint = "batches.list"
        try:
            check(self.state, request)
            try:
                size = int(request.query_params.get("pageSize", "10"))
                start = int(request.query_params.get("pageToken", "0") or 0)
            except ValueError:
                raise Reply(error(400, "pageSize and pageToken must be integers.")) from None
            size = max(1, min(size, 100))
            jobs = self.state.batches.list()
            now = self.state.clock.datetime()
            body: dict[str, Any] = {
                "operations": [j.operation(now) for j in jobs[start : start + size]]
            }
            if start + size < len(jobs):
                body["nextPageToken"] = str(start + size)
            return done(self.state, endpoint, None, JSONResponse(body))
        except Reply as reply:
            return done(self.state, endpoint, None, reply.response)

    async def batch(self, request: Request) -> Response:
        batch_id, _, action = request.path_params["batch_id"].partition(":")
        method = request.method
        endpoint = {"GET": "batches.get", "DELETE": "batches.delete"}.get(
            method, f"batches.{action or 'unknown'}"
        )
        store = self.state.batches
        try:
            check(self.state, request)
            if (method == "POST") != bool(action) or (action and action != "cancel"):
                raise Reply(error(404, f"The emulator does not serve {request.url.path}."))
            job = store.get(f"batches/{batch_id}")
            if job is None:
                raise Reply(error(404, _NOT_FOUND))
            model = job.model
            if method == "GET":
                fault = store.get_fault(job)
                if fault is not None:
                    with self.state.lock:
                        store.get_503 += 1
                    message = fault.message or "The service is currently unavailable."
                    raise Reply(error(503, message))
                operation = job.operation(self.state.clock.datetime())
                return done(self.state, endpoint, model, JSONResponse(operation))
            if method == "DELETE":
                store.delete(job)
                return done(self.state, endpoint, model, JSONResponse({}))
            if not store.cancel(job):
                raise Reply(
                    error(
                        400,
                        f"Batch {job.name} has already finished and cannot be cancelled.",
                        status="FAILED_PRECONDITION",
                    )
                )
            return done(self.state, endpoint, model, JSONResponse({}))
        except Reply as reply:
            return done(self.state, endpoint, None, reply.response)
