"""Provider Batch Mode: the contract between a strategy and the engine's job runner.

A strategy whose `batch_jobs()` returns a `BatchJobs` runs its items as provider batch
jobs (half price, hours of turnaround) instead of one online call per attempt. The engine
owns everything around the jobs: which items go in a job, the durable job record that lets
a re-run resume polling instead of paying for a second job, polling, cancelling the job
when the flow run is cancelled, and turning each request's outcome into the item's attempt,
accounted and judged by the classifier exactly as an online call is. A `BatchJobs` only
speaks the provider's API.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from prefect_batch_llm.errors import TransientError
from prefect_batch_llm.strategy import ExecuteResult

#: What a request of a job came to: `execute()`'s return value, or the error to classify
#: (carrying the tokens the provider billed for it, if any).
Outcome = ExecuteResult | Exception


class JobState(StrEnum):
    """A provider batch job's state (Gemini's `JOB_STATE_*` without the prefix)."""

    QUEUED = "QUEUED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"
    PARTIALLY_SUCCEEDED = "PARTIALLY_SUCCEEDED"

    @property
    def done(self) -> bool:
        """Whether the job will not change any more."""
        return self not in (JobState.QUEUED, JobState.PENDING, JobState.RUNNING)


@dataclass(frozen=True)
class JobStatus:
    """What one poll of a job found.

    Attributes:
        name: The provider's job name, e.g. `batches/123`.
        state: Its state.
        display_name: The name the job was created with.
        create_time: When the provider created it.
        error: The job's own error (a failed job), if any.
    """

    name: str
    state: JobState
    display_name: str | None = None
    create_time: datetime | None = None
    error: str | None = None


class BatchJobs(ABC):
    """One strategy's provider Batch Mode: submit, find, poll, read and cancel jobs.

    Implementations make no decision (the engine retries, accounts and resumes) and never
    put a credential in a request, a name or an error.
    """

    #: Items per job at most; the engine splits larger batches into several jobs.
    max_requests_per_job: int = 50_000

    @abstractmethod
    async def submit(self, requests: Sequence[tuple[str, Any]], display_name: str) -> str:
        """Create one job of `(key, prompt)` requests named `display_name`; its job name.

        Creating a job is not idempotent at the provider: the engine calls `find()` first
        and after a failed `submit()`, so that a lost answer does not become a second job.
        """

    @abstractmethod
    async def find(self, display_name: str) -> list[JobStatus]:
        """The provider's jobs created with `display_name`, newest first."""

    @abstractmethod
    async def status(self, name: str) -> JobStatus:
        """The job's current state."""

    @abstractmethod
    async def outcomes(self, name: str) -> dict[str, Outcome]:
        """Each answered request's outcome by key (a done job; missing keys are omitted)."""

    @abstractmethod
    async def cancel(self, name: str) -> None:
        """Ask the provider to cancel the job (no error if it is already done)."""

    async def keep_alive(self) -> None:  # noqa: B027 (an optional hook)
        """Called between polls: keep what the requests use alive (e.g. renew a context
        cache the requests name, so it outlives a job that runs for hours)."""


class BatchJobError(TransientError):
    """A request got no answer from its job (failed, expired, cancelled or missing): the
    item is retried as the retry policy allows (online, or in the next job)."""


__all__ = [
    "BatchJobError",
    "BatchJobs",
    "JobState",
    "JobStatus",
    "Outcome",
]
