"""HTTP plumbing shared by the emulator's route modules: errors, auth, JSON bodies."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from prefect_batch_llm.testing.emulator._state import EmulatorState

VERSIONS = {"v1", "v1beta", "v1alpha"}
STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
#: google.rpc.Code of each HTTP status, for per-request errors inside a batch's output
#: (a `google.rpc.Status` carries the gRPC code, not the HTTP one).
GRPC_CODE = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 429: 8, 500: 13, 503: 14, 504: 4}


class ApiError(Exception):
    """An error the emulated API answers with: Google's envelope over HTTP, or a
    `google.rpc.Status` inside a batch job's output."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        status: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS.get(code, "UNKNOWN")
        self.details = details
        self.headers = headers

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {
            "error": {"code": self.code, "message": self.message, "status": self.status}
        }
        if self.details:
            body["error"]["details"] = self.details
        return JSONResponse(body, status_code=self.code, headers=self.headers)

    def rpc_status(self) -> dict[str, Any]:
        """The per-request error of a batch: `{"code": <gRPC code>, "message": ...}`."""
        status: dict[str, Any] = {"code": GRPC_CODE.get(self.code, 2), "message": self.message}
        if self.details:
            status["details"] = self.details
        return status


def error(
    code: int,
    message: str,
    *,
    status: str | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Google's error envelope."""
    return ApiError(code, message, status=status, details=details, headers=headers).response()


class Reply(Exception):
    """Raised inside a handler to answer with an error envelope (or any response)."""

    def __init__(self, response: Response) -> None:
        self.response = response


def check(state: EmulatorState, request: Request) -> None:
    """The API version must be known and the `x-goog-api-key` accepted."""
    if request.path_params.get("version") not in VERSIONS:
        raise Reply(error(404, f"Unknown API version {request.path_params.get('version')}"))
    key = request.headers.get("x-goog-api-key")
    if not key:
        raise Reply(error(403, "Method doesn't allow unregistered callers. Send x-goog-api-key."))
    if state.api_keys is not None and key not in state.api_keys:
        raise Reply(error(401, "API key not valid. Please pass a valid API key."))


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object (400 INVALID_ARGUMENT otherwise)."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Reply(error(400, f"Invalid JSON payload received. {exc}")) from None
    if not isinstance(body, dict):
        raise Reply(error(400, "Invalid JSON payload received. Expected an object."))
    return body


def done(state: EmulatorState, endpoint: str, model: str | None, response: Response) -> Response:
    """Count the call (endpoint, model, status) and answer `response`."""
    state.record_call(endpoint, model, response.status_code)
    return response
