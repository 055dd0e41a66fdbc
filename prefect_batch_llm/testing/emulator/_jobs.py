"""The emulator's Files API and Batch Mode state: stored files, upload sessions, batch jobs.

Composed into `EmulatorState` (`state.files`, `state.batches`) and guarded by its lock. Jobs
move through their states on the emulator's clock, lazily: whenever the state is read
(`advance()`), every job whose time has come is completed, failed or expired. The answers
to a job's requests come from `BatchStore.runner`, which the HTTP layer sets to the same
generation code `generateContent` uses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field

from prefect_batch_llm.testing.emulator._clock import EmulatorClock, rfc3339

#: Files live 48 hours, like the hosted Files API.
FILE_TTL = timedelta(hours=48)
#: A batch job not done 48 hours after creation expires.
BATCH_EXPIRY = timedelta(hours=48)
#: The hosted API's limit on a request body, which bounds inline batches (20 MB).
INLINE_LIMIT_BYTES = 20 * 1024 * 1024

_BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"

JobState = Literal[
    "queued",
    "pending",
    "running",
    "succeeded",
    "partially_succeeded",
    "failed",
    "cancelled",
    "expired",
]
TERMINAL: frozenset[str] = frozenset(
    {"succeeded", "partially_succeeded", "failed", "cancelled", "expired"}
)
#: The state on the wire. The Gemini Developer API's BatchState has no QUEUED and no
#: PARTIALLY_SUCCEEDED; for those two scripted states the emulator sends the SDK's JobState
#: spelling, which google-genai's `t_job_state` passes through unchanged.
WIRE_STATE: dict[str, str] = {
    "queued": "JOB_STATE_QUEUED",
    "pending": "BATCH_STATE_PENDING",
    "running": "BATCH_STATE_RUNNING",
    "succeeded": "BATCH_STATE_SUCCEEDED",
    "partially_succeeded": "JOB_STATE_PARTIALLY_SUCCEEDED",
    "failed": "BATCH_STATE_FAILED",
    "cancelled": "BATCH_STATE_CANCELLED",
    "expired": "BATCH_STATE_EXPIRED",
}

BatchFaultKind = Literal[
    "fail",
    "expire",
    "partially_succeeded",
    "missing",
    "get_503",
    "create_error",
    "create_lost",
]


class BatchFault(BaseModel):
    """A scripted failure of a Batch Mode job.

    Per-request failures inside a job are [`Fault`][prefect_batch_llm.testing.Fault]s (with
    `tier="batch"` to keep them off online calls).

    Kinds:

    - `fail`: the job ends `BATCH_STATE_FAILED` when it would have finished (no output, nothing
      billed).
    - `expire`: the job never finishes and ends `BATCH_STATE_EXPIRED` 48 hours (emulated) after
      creation.
    - `partially_succeeded`: the job ends `JOB_STATE_PARTIALLY_SUCCEEDED`; the requests whose
      key is in `keys` (every second request if None) answer a per-request 500 INTERNAL error,
      the others are answered and billed.
    - `missing`: the job succeeds but the requests whose key is in `keys` (the last request
      if None) are absent from its output (and not billed).
    - `get_503`: `batches.get` of a matching job answers 503 UNAVAILABLE (each firing is one
      such answer; `times` of them).
    - `create_error`: `batchGenerateContent` answers 503 UNAVAILABLE and creates nothing.
    - `create_lost`: the job is created (and runs and bills) but the create call answers 503
      UNAVAILABLE, as when a response is lost: creating a job is not idempotent.

    A fault applies to jobs whose display name contains `display_name_contains` (every job if
    None) and, if `on_jobs` is given, only to those job numbers (1-based, in creation order).
    It fires at most `times` times (unlimited if None); job kinds fire once per job.
    """

    kind: BatchFaultKind = Field(description="What happens to the job.")
    display_name_contains: str | None = Field(None, description="Only jobs named so.")
    on_jobs: list[int] | None = Field(None, description="Only these job numbers (1-based).")
    keys: list[str] | None = Field(None, description="Request keys for partial/missing.")
    times: int | None = Field(None, ge=1, description="Fire at most this many times.")
    message: str | None = Field(None, description="The error message, instead of the default.")
    fired: int = Field(0, description="How many times the fault has fired so far.")

    def matches(self, number: int, display_name: str | None) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if self.display_name_contains is not None and (
            display_name is None or self.display_name_contains not in display_name
        ):
            return False
        return self.on_jobs is None or number in self.on_jobs


# -- files ----------------------------------------------------------------------------------


@dataclass
class StoredFile:
    name: str  # files/<id>
    display_name: str | None
    mime_type: str
    data: bytes
    create_time: datetime
    expire_time: datetime
    source: Literal["UPLOADED", "GENERATED"]

    def resource(self, base_url: str, version: str) -> dict[str, Any]:
        """The `File` resource (`uri` and `downloadUri` on `base_url`)."""
        digest = hashlib.sha256(self.data).hexdigest()
        body: dict[str, Any] = {
            "name": self.name,
            "mimeType": self.mime_type,
            "sizeBytes": str(len(self.data)),
            "createTime": rfc3339(self.create_time),
            "updateTime": rfc3339(self.create_time),
            "expirationTime": rfc3339(self.expire_time),
            "sha256Hash": base64.b64encode(digest.encode()).decode(),
            "uri": f"{base_url}/{version}/{self.name}",
            "state": "ACTIVE",
            "source": self.source,
        }
        if self.display_name is not None:
            body["displayName"] = self.display_name
        if self.source == "GENERATED":
            body["downloadUri"] = f"{base_url}/download/{version}/{self.name}:download?alt=media"
        return body


@dataclass
class UploadSession:
    upload_id: str
    name: str
    display_name: str | None
    mime_type: str
    declared_size: int | None
    received: bytearray = field(default_factory=bytearray)


class FileStore:
    """Uploaded and generated files, and resumable upload sessions."""

    def __init__(self, clock: EmulatorClock, lock: threading.RLock) -> None:
        self.clock = clock
        self.lock = lock
        self.files: dict[str, StoredFile] = {}
        self.sessions: dict[str, UploadSession] = {}
        self.reset_counters()

    def reset_counters(self) -> None:
        with self.lock:
            self.uploaded = self.generated = self.deleted = self.expired = 0
            self.downloads = self.bytes_uploaded = 0

    def sweep(self) -> None:
        with self.lock:
            now = self.clock.datetime()
            for name, stored in list(self.files.items()):
                if stored.expire_time <= now:
                    del self.files[name]
                    self.expired += 1

    def start_upload(
        self, name: str | None, display_name: str | None, mime_type: str, size: int | None
    ) -> UploadSession:
        with self.lock:
            file_id = uuid.uuid4().hex[:12]
            session = UploadSession(
                upload_id=uuid.uuid4().hex,
                name=name or f"files/{file_id}",
                display_name=display_name,
                mime_type=mime_type,
                declared_size=size,
            )
            self.sessions[session.upload_id] = session
            return session

    def finish_upload(self, session: UploadSession) -> StoredFile:
        with self.lock:
            self.sessions.pop(session.upload_id, None)
            stored = self.add(
                session.name, session.display_name, session.mime_type, bytes(session.received)
            )
            self.uploaded += 1
            self.bytes_uploaded += len(stored.data)
            return stored

    def add(
        self,
        name: str,
        display_name: str | None,
        mime_type: str,
        data: bytes,
        source: Literal["UPLOADED", "GENERATED"] = "UPLOADED",
    ) -> StoredFile:
        with self.lock:
            now = self.clock.datetime()
            stored = StoredFile(name, display_name, mime_type, data, now, now + FILE_TTL, source)
            self.files[name] = stored
            if source == "GENERATED":
                self.generated += 1
            return stored

    def get(self, name: str) -> StoredFile | None:
        self.sweep()
        with self.lock:
            return self.files.get(name)

    def list(self) -> list[StoredFile]:
        self.sweep()
        with self.lock:
            return sorted(self.files.values(), key=lambda f: (f.create_time, f.name), reverse=True)

    def delete(self, name: str) -> bool:
        self.sweep()
        with self.lock:
            if self.files.pop(name, None) is None:
                return False
            self.deleted += 1
            return True

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "uploaded": self.uploaded,
                "generated": self.generated,
                "deleted": self.deleted,
                "expired": self.expired,
                "downloads": self.downloads,
                "bytes_uploaded": self.bytes_uploaded,
                "live": len(self.files),
                "live_names": sorted(self.files),
            }


# -- batch jobs -----------------------------------------------------------------------------


@dataclass
class BatchRequest:
    """One request of a job: its key (file lines) or metadata (inline), and the request."""

    request: dict[str, Any]
    key: str | None = None
    metadata: dict[str, Any] | None = None

    @property
    def label(self) -> str | None:
        """The request's key, from a file line or the inline metadata."""
        if self.key is not None:
            return self.key
        value = (self.metadata or {}).get("key")
        return None if value is None else str(value)


#: ("response", GenerateContentResponse JSON) or ("error", google.rpc.Status JSON).
BatchAnswer = tuple[Literal["response", "error"], dict[str, Any]]
#: `runner(job, index, finished_at)`: the answer to `job.requests[index]`.
BatchRunner = Callable[["BatchJob", int, datetime], BatchAnswer]


@dataclass
class BatchJob:
    name: str  # batches/<id>
    number: int
    model: str  # models/<m>
    display_name: str | None
    requests: list[BatchRequest]
    input_file: str | None  # files/<id> for file jobs, None for inline jobs
    api_key: str
    version: str
    create_time: datetime
    pending_from: datetime
    running_from: datetime
    done_at: datetime
    expire_at: datetime
    outcome: BatchFaultKind | None = None
    fault_keys: list[str] | None = None
    fault_message: str | None = None
    state: JobState | None = None  # set once terminal
    end_time: datetime | None = None
    succeeded: int = 0
    failed: int = 0
    missing: int = 0
    answers: list[dict[str, Any]] | None = None  # inlinedResponses entries
    output_file: str | None = None
    deleted: bool = False

    def state_at(self, now: datetime) -> JobState:
        if self.state is not None:
            return self.state
        if now < self.pending_from:
            return "queued"
        if now < self.running_from:
            return "pending"
        return "running"

    def update_time(self, now: datetime) -> datetime:
        if self.end_time is not None:
            return self.end_time
        moments = [self.create_time, self.pending_from, self.running_from]
        return max(m for m in moments if m <= now)

    def operation(self, now: datetime) -> dict[str, Any]:
        """The long-running operation the API answers for this job."""
        state = self.state_at(now)
        stats: dict[str, Any] = {"requestCount": str(len(self.requests))}
        if state in ("succeeded", "partially_succeeded"):
            if self.succeeded:
                stats["successfulRequestCount"] = str(self.succeeded)
            if self.failed:
                stats["failedRequestCount"] = str(self.failed)
        else:
            stats["pendingRequestCount"] = str(len(self.requests))
        metadata: dict[str, Any] = {"@type": _BATCH_TYPE, "model": self.model}
        if self.display_name is not None:
            metadata["displayName"] = self.display_name
        output: dict[str, Any] | None = None
        if self.output_file is not None:
            output = {"responsesFile": self.output_file}
        elif self.answers is not None:
            output = {"inlinedResponses": {"inlinedResponses": self.answers}}
        if output is not None:
            metadata["output"] = output
        metadata["createTime"] = rfc3339(self.create_time)
        if self.end_time is not None:
            metadata["endTime"] = rfc3339(self.end_time)
        metadata["updateTime"] = rfc3339(self.update_time(now))
        metadata["batchStats"] = stats
        metadata["state"] = WIRE_STATE[state]
        metadata["name"] = self.name
        body: dict[str, Any] = {"name": self.name, "metadata": metadata}
        if state in TERMINAL:
            body["done"] = True
        if output is not None:
            body["response"] = {"@type": _OUTPUT_TYPE, **output}
        if state == "failed":
            body["error"] = {"code": 13, "message": self.fault_message or "Batch job failed."}
        return body


class BatchStore:
    """Batch Mode jobs on the emulator's clock, with their scripted faults and counters."""

    def __init__(self, clock: EmulatorClock, lock: threading.RLock, files: FileStore) -> None:
        self.clock = clock
        self.lock = lock
        self.files = files
        self.queued_seconds = 0.0
        self.pending_seconds = 1.0
        self.running_seconds = 2.0
        self.expire_after = BATCH_EXPIRY
        self.inline_limit_bytes = INLINE_LIMIT_BYTES
        self.faults: list[BatchFault] = []
        self.jobs: dict[str, BatchJob] = {}
        self.runner: BatchRunner | None = None
        self._numbers = 0
        self._advancing = False
        self.reset_counters()

    def reset_counters(self) -> None:
        with self.lock:
            self.created = self.deleted = self.cancelled = self.expired = 0
            self.succeeded = self.partially_succeeded = self.failed = 0
            self.requests = self.requests_succeeded = self.requests_failed = 0
            self.requests_missing = self.get_503 = self.create_errors = 0

    # -- faults -------------------------------------------------------------------------

    def _fault(self, kinds: set[str], number: int, display_name: str | None) -> BatchFault | None:
        with self.lock:
            for fault in self.faults:
                if fault.kind in kinds and fault.matches(number, display_name):
                    fault.fired += 1
                    return fault
        return None

    def create_fault(self, display_name: str | None) -> BatchFault | None:
        """A `create_error`/`create_lost` fault for the next job, if one matches."""
        return self._fault({"create_error", "create_lost"}, self._numbers + 1, display_name)

    def get_fault(self, job: BatchJob) -> BatchFault | None:
        return self._fault({"get_503"}, job.number, job.display_name)

    # -- lifecycle ------------------------------------------------------------------------

    def create(
        self,
        model: str,
        display_name: str | None,
        requests: list[BatchRequest],
        input_file: str | None,
        api_key: str,
        version: str,
    ) -> BatchJob:
        self.advance()
        with self.lock:
            self._numbers += 1
            now = self.clock.datetime()
            pending_from = now + timedelta(seconds=self.queued_seconds)
            running_from = pending_from + timedelta(seconds=self.pending_seconds)
            job = BatchJob(
                name=f"batches/{uuid.uuid4().hex[:24]}",
                number=self._numbers,
                model=model if model.startswith("models/") else f"models/{model}",
                display_name=display_name,
                requests=requests,
                input_file=input_file,
                api_key=api_key,
                version=version,
                create_time=now,
                pending_from=pending_from,
                running_from=running_from,
                done_at=running_from + timedelta(seconds=self.running_seconds),
                expire_at=now + self.expire_after,
            )
            kinds = {"fail", "expire", "partially_succeeded", "missing"}
            fault = self._fault(kinds, job.number, display_name)
            if fault is not None:
                job.outcome = fault.kind
                job.fault_keys = fault.keys
                job.fault_message = fault.message
            self.jobs[job.name] = job
            self.created += 1
            self.requests += len(requests)
            return job

    def advance(self) -> None:
        """Finish, fail or expire every job whose time has come."""
        with self.lock:
            if self._advancing:
                return
            self._advancing = True
            try:
                now = self.clock.datetime()
                due = [j for j in self.jobs.values() if j.state is None]
                for job in sorted(due, key=lambda j: (j.done_at, j.number)):
                    never_done = job.outcome == "expire" or job.done_at >= job.expire_at
                    if never_done and now >= job.expire_at:
                        job.state, job.end_time = "expired", job.expire_at
                        self.expired += 1
                    elif not never_done and now >= job.done_at:
                        self._finish(job)
            finally:
                self._advancing = False

    def _finish(self, job: BatchJob) -> None:
        job.end_time = job.done_at
        if job.outcome == "fail":
            job.state = "failed"
            self.failed += 1
            return
        labels = [r.label for r in job.requests]
        failing: set[int] = set()
        missing: set[int] = set()
        if job.outcome == "partially_succeeded":
            failing = (
                {i for i, label in enumerate(labels) if label in job.fault_keys}
                if job.fault_keys is not None
                else set(range(1, len(labels), 2))
            )
        elif job.outcome == "missing":
            missing = (
                {i for i, label in enumerate(labels) if label in job.fault_keys}
                if job.fault_keys is not None
                else {len(labels) - 1}
            )
        entries: list[dict[str, Any]] = []
        lines: list[str] = []
        for index, request in enumerate(job.requests):
            if index in missing:
                job.missing += 1
                continue
            answer: BatchAnswer
            if index in failing:
                message = job.fault_message or "An internal error has occurred. Please retry."
                answer = ("error", {"code": 13, "message": message})
            elif self.runner is None:
                answer = ("error", {"code": 12, "message": "The emulator cannot run batches."})
            else:
                answer = self.runner(job, index, job.done_at)
            kind, payload = answer
            if kind == "response":
                job.succeeded += 1
            else:
                job.failed += 1
            if job.input_file is None:
                entry: dict[str, Any] = {kind: payload}
                if request.metadata is not None:
                    entry["metadata"] = request.metadata
                entries.append(entry)
            else:
                line: dict[str, Any] = {} if request.key is None else {"key": request.key}
                line[kind] = payload
                lines.append(json.dumps(line))
        if job.input_file is None:
            job.answers = entries
        else:
            output = f"files/batch-{job.name.removeprefix('batches/')}"
            data = "".join(f"{line}\n" for line in lines).encode()
            self.files.add(output, None, "application/jsonl", data, source="GENERATED")
            job.output_file = output
        if job.outcome == "partially_succeeded":
            job.state = "partially_succeeded"
            self.partially_succeeded += 1
        else:
            job.state = "succeeded"
            self.succeeded += 1
        self.requests_succeeded += job.succeeded
        self.requests_failed += job.failed
        self.requests_missing += job.missing

    def get(self, name: str) -> BatchJob | None:
        self.advance()
        with self.lock:
            job = self.jobs.get(name)
            return None if job is None or job.deleted else job

    def list(self) -> list[BatchJob]:
        """Live jobs, newest first."""
        self.advance()
        with self.lock:
            live = [j for j in self.jobs.values() if not j.deleted]
            return sorted(live, key=lambda j: j.number, reverse=True)

    def cancel(self, job: BatchJob) -> bool:
        """Cancel a job that has not finished (False if it already has)."""
        self.advance()
        with self.lock:
            if job.state is not None:
                return False
            job.state, job.end_time = "cancelled", self.clock.datetime()
            self.cancelled += 1
            return True

    def delete(self, job: BatchJob) -> None:
        """Forget the job (an unfinished job still runs and bills, as on the hosted API)."""
        with self.lock:
            job.deleted = True
            self.deleted += 1

    def stats(self) -> dict[str, Any]:
        with self.lock:
            in_progress = sum(1 for j in self.jobs.values() if j.state is None)
            return {
                "created": self.created,
                "succeeded": self.succeeded,
                "partially_succeeded": self.partially_succeeded,
                "failed": self.failed,
                "cancelled": self.cancelled,
                "expired": self.expired,
                "deleted": self.deleted,
                "in_progress": in_progress,
                "requests": self.requests,
                "requests_succeeded": self.requests_succeeded,
                "requests_failed": self.requests_failed,
                "requests_missing": self.requests_missing,
                "get_503": self.get_503,
                "create_errors": self.create_errors,
            }
