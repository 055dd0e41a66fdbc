"""The Files API routes: resumable upload, get, list, delete and download.

As google-genai 3.3.0 uses them (`client.files.upload/get/list/delete/download`):

- `POST /upload/{v}/files` with `X-Goog-Upload-Protocol: resumable` and
  `X-Goog-Upload-Command: start` (body `{"file": {...}}`, snake or camel case) answers an
  empty body with `X-Goog-Upload-URL` and `X-Goog-Upload-Status: active`;
- the client then POSTs the bytes to that URL (`/upload/{v}/files?upload_id=...`, no API key:
  the upload id authorizes) in chunks, `X-Goog-Upload-Command: upload` and, for the last one,
  `upload, finalize`, each with `X-Goog-Upload-Offset`; the finalize answers `{"file": File}`
  with `X-Goog-Upload-Status: final`;
- `GET /{v}/files/{id}:download?alt=media` (the SDK's path; `/download/{v}/files/...` too)
  answers the bytes of a generated file, such as a batch job's output.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from prefect_batch_llm.testing.emulator._http import Reply, check, done, error, read_json
from prefect_batch_llm.testing.emulator._jobs import UploadSession
from prefect_batch_llm.testing.emulator._responses import pick
from prefect_batch_llm.testing.emulator._state import EmulatorState

#: The hosted service uploads in chunks of a multiple of this size.
CHUNK_GRANULARITY = 8 * 1024 * 1024
_NAME = re.compile(r"files/[a-z0-9][a-z0-9-]{0,39}")


def _not_found(file_id: str) -> Reply:
    """The hosted Files API answers 403 for a file that does not exist (or is not yours)."""
    message = f"You do not have permission to access the File {file_id} or it may not exist."
    return Reply(error(403, message))


class FileRoutes:
    """Files API routes bound to one `EmulatorState`."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    def routes(self) -> list[Route]:
        return [
            Route("/upload/{version}/files", self.upload, methods=["POST"]),
            Route("/{version}/files", self.list, methods=["GET"]),
            Route("/{version}/files/{file_id}", self.file, methods=["GET", "DELETE"]),
            Route("/download/{version}/files/{file_id}", self.download, methods=["GET"]),
        ]

    # -- upload ----------------------------------------------------------------------------

    async def upload(self, request: Request) -> Response:
        if "upload_id" in request.query_params:
            return await self._chunk(request, request.query_params["upload_id"])
        try:
            check(self.state, request)
            protocol = request.headers.get("x-goog-upload-protocol", "")
            command = request.headers.get("x-goog-upload-command", "")
            if protocol.lower() != "resumable" or command.strip().lower() != "start":
                raise Reply(
                    error(
                        400,
                        "The emulator supports resumable uploads only: send "
                        "X-Goog-Upload-Protocol: resumable and X-Goog-Upload-Command: start.",
                    )
                )
            raw = await request.body()
            body = await read_json(request) if raw.strip() else {}
            spec = pick(body, "file") or {}
            name = spec.get("name")
            if name is not None:
                name = name if str(name).startswith("files/") else f"files/{name}"
                if not _NAME.fullmatch(name):
                    raise Reply(error(400, f"Invalid file name {name!r}."))
                if self.state.files.get(name) is not None:
                    raise Reply(error(409, f"File {name} already exists."))
            mime_type = request.headers.get("x-goog-upload-header-content-type") or pick(
                spec, "mimeType"
            )
            if not mime_type:
                raise Reply(error(400, "Upload has no mime type."))
            declared = request.headers.get("x-goog-upload-header-content-length") or pick(
                spec, "sizeBytes"
            )
            session = self.state.files.start_upload(
                name,
                pick(spec, "displayName"),
                str(mime_type),
                int(declared) if declared is not None else None,
            )
            base = str(request.base_url).rstrip("/")
            version = request.path_params["version"]
            url = f"{base}/upload/{version}/files?upload_id={session.upload_id}"
            headers = {
                "X-Goog-Upload-URL": f"{url}&upload_protocol=resumable",
                "X-Goog-Upload-Status": "active",
                "X-Goog-Upload-Chunk-Granularity": str(CHUNK_GRANULARITY),
            }
            return done(self.state, "files.upload", None, Response(b"", headers=headers))
        except Reply as reply:
            return done(self.state, "files.upload", None, reply.response)

    async def _chunk(self, request: Request, upload_id: str) -> Response:
        files = self.state.files
        with files.lock:
            session = files.sessions.get(upload_id)
        if session is None:
            return self._upload_failed(404, f"No upload session {upload_id}.")
        commands = {
            c.strip().lower() for c in request.headers.get("x-goog-upload-command", "").split(",")
        }
        if "cancel" in commands:
            with files.lock:
                files.sessions.pop(upload_id, None)
            return Response(b"", headers={"X-Goog-Upload-Status": "cancelled"})
        if "query" in commands:
            return self._progress(session)
        offset_header = request.headers.get("x-goog-upload-offset")
        data = await request.body()
        with files.lock:
            offset = len(session.received) if offset_header is None else int(offset_header)
            if offset != len(session.received):
                return self._upload_failed(
                    400, f"Invalid upload offset {offset}: {len(session.received)} bytes received."
                )
            session.received.extend(data)
        if "finalize" not in commands:
            return done(self.state, "files.upload", None, self._progress(session))
        if session.declared_size is not None and session.declared_size != len(session.received):
            return self._upload_failed(
                400,
                f"Upload size {len(session.received)} does not match the declared "
                f"X-Goog-Upload-Header-Content-Length {session.declared_size}.",
            )
        stored = files.finish_upload(session)
        version = request.path_params["version"]
        resource = stored.resource(str(request.base_url).rstrip("/"), version)
        response = JSONResponse({"file": resource}, headers={"X-Goog-Upload-Status": "final"})
        return done(self.state, "files.upload", None, response)

    @staticmethod
    def _progress(session: UploadSession) -> Response:
        headers = {
            "X-Goog-Upload-Status": "active",
            "X-Goog-Upload-Size-Received": str(len(session.received)),
        }
        return Response(b"", headers=headers)

    def _upload_failed(self, code: int, message: str) -> Response:
        # "final": the SDK stops uploading and raises the error instead of retrying.
        response = error(code, message, headers={"X-Goog-Upload-Status": "final"})
        return done(self.state, "files.upload", None, response)

    # -- files -----------------------------------------------------------------------------

    async def list(self, request: Request) -> Response:
        try:
            check(self.state, request)
            try:
                size = int(request.query_params.get("pageSize", "10"))
                start = int(request.query_params.get("pageToken", "0") or 0)
            except ValueError:
                raise Reply(error(400, "pageSize and pageToken must be integers.")) from None
            size = max(1, min(size, 100))
            stored = self.state.files.list()
            base = str(request.base_url).rstrip("/")
            version = request.path_params["version"]
            page = stored[start : start + size]
            body: dict[str, Any] = {}
            if page:
                body["files"] = [f.resource(base, version) for f in page]
            if start + size < len(stored):
                body["nextPageToken"] = str(start + size)
            return done(self.state, "files.list", None, JSONResponse(body))
        except Reply as reply:
            return done(self.state, "files.list", None, reply.response)

    async def file(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if request.method == "GET" and file_id.endswith(":download"):
            return await self.download(request)
        endpoint = "files.get" if request.method == "GET" else "files.delete"
        try:
            check(self.state, request)
            name = f"files/{file_id}"
            if request.method == "DELETE":
                if not self.state.files.delete(name):
                    raise _not_found(file_id)
                return done(self.state, endpoint, None, JSONResponse({}))
            stored = self.state.files.get(name)
            if stored is None:
                raise _not_found(file_id)
            base = str(request.base_url).rstrip("/")
            resource = stored.resource(base, request.path_params["version"])
            return done(self.state, endpoint, None, JSONResponse(resource))
        except Reply as reply:
            return done(self.state, endpoint, None, reply.response)

    async def download(self, request: Request) -> Response:
        try:
            check(self.state, request)
            file_id = request.path_params["file_id"].removesuffix(":download")
            stored = self.state.files.get(f"files/{file_id}")
            if stored is None:
                raise _not_found(file_id)
            if stored.source != "GENERATED":
                raise Reply(error(400, "Only generated files can be downloaded."))
            with self.state.lock:
                self.state.files.downloads += 1
            response = Response(stored.data, media_type=stored.mime_type)
            return done(self.state, "files.download", None, response)
        except Reply as reply:
            return done(self.state, "files.download", None, reply.response)
