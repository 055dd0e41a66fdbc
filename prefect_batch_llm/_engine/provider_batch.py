"""Provider batch jobs for the items of one strategy: durable, resumable, cancellable.

`ProviderBatch` turns items into jobs and each request's outcome into the item's attempt,
taken by `ItemRun.attempt()` exactly as an online call's result is (accounted on the
`batch` price path, judged by the classifier and `decide()`). What it adds is the job's life:

- **One job, however often the flow runs.** A job is named after a manifest: the SHA-256 of
  the strategy's answer fingerprint, the round and every request's id, prompt and context.
  Its name is recorded in a Prefect variable (`batch_llm_job_<manifest>`) right after it is
  created, before any poll; a re-run of the same items (after a crash, a SIGKILL, a lost
  worker) finds the record, or the job by its display name if the record was lost, and polls
  that job instead of paying for a second one. A failed, expired or cancelled job, or one
  older than `result_ttl_seconds`, is not reused.
- **Polling** is one `batch-job` task run per job (its logs show each state change), with
  intervals growing from `batch_poll_interval_seconds` to `batch_poll_max_interval_seconds`.
- **Cancelling** the flow run (or a batch timeout) cancels the provider job.
- **Retries**: a request that failed, or got no answer (failed, expired or cancelled job,
  missing key), is judged like a failed call; with `batch_retry="batch"` the retryable ones
  go in the next job, up to `max_attempts` jobs; the rest continue online in their task run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.results import get_result_store
from prefect.states import Completed, State
from prefect.variables import Variable

from prefect_batch_llm._engine.attempts import ItemAttemptFailed, ItemRun, _run_logger
from prefect_batch_llm._engine.runtime import BatchRuntime
from prefect_batch_llm._engine.tasks import item_task_for, resume_key
from prefect_batch_llm.batch_mode import BatchJobError, BatchJobs, JobState, JobStatus, Outcome
from prefect_batch_llm.errors import describe
from prefect_batch_llm.strategy import LLMCallStrategy

logger = logging.getLogger("prefect_batch_llm")

#: Job states whose job a re-run does not reuse: it submits a new one.
_NOT_REUSED = frozenset({JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})
#: Tries to create a job when the provider answers with an error (and no job exists).
_SUBMIT_TRIES = 3
#: Consecutive failed polls after which a job is given up (and cancelled).
_POLL_ERRORS = 10


def manifest_of(fingerprint: str, round_number: int, runs: Sequence[ItemRun]) -> str:
    """The job's identity: strategy fingerprint, round and every request (id, prompt, context)."""
    payload = json.dumps(
        [
            fingerprint,
            round_number,
            [[r.item.item_id, r.item.prompt, r.item.context] for r in runs],
        ],
        default=repr,
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class JobWaiter:
    """Polls one job until it is done (the body of its `batch-job` task run)."""

    def __init__(self, jobs: BatchJobs, name: str, runtime: BatchRuntime) -> None:
        self.jobs, self.name, self.config = jobs, name, runtime.config

    async def wait(self) -> JobStatus:
        log = _run_logger()
        interval = self.config.batch_poll_interval_seconds
        started, seen, errors = time.monotonic(), None, 0
        while True:
            try:
                status = await self.jobs.status(self.name)
            except Exception as exc:
                errors += 1
                log.warning(
                    "Polling %s failed (%d in a row): %s; polling again in %.0f s",
                    self.name,
                    errors,
                    describe(exc),
                    interval,
                )
                if errors >= _POLL_ERRORS:
                    await _cancel_quietly(self.jobs, self.name)
                    return JobStatus(
                        self.name,
                        JobState.FAILED,
                        error=f"the job could not be read {errors} times in a row "
                        f"({describe(exc)}); it was cancelled",
                    )
            else:
                errors = 0
                if status.state != seen:
                    seen = status.state
                    log.info(
                        "Batch job %s: %s after %.0f s", self.name, seen, time.monotonic() - started
                    )
                if status.state.done:
                    return status
            try:
                await self.jobs.keep_alive()
            except Exception as exc:
                log.warning("Keeping the job's resources alive failed: %s", describe(exc))
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, self.config.batch_poll_max_interval_seconds)


async def _wait_for_job(label: str, waiter: JobWaiter) -> State[Any]:
    status = await waiter.wait()
    message = f"{status.state} · job {status.name}"
    if status.error:
        message += f" · {status.error}"
    return Completed(data=status, message=message)


batch_job = task(
    name="batch-job",
    task_run_name="{label}",
    cache_policy=NO_CACHE,
    persist_result=False,
)(_wait_for_job)


async def _cancel_quietly(jobs: BatchJobs, name: str) -> None:
    try:
        await jobs.cancel(name)
        logger.warning("Cancelled batch job %s", name)
    except Exception as exc:
        logger.error("Could not cancel batch job %s: %s", name, describe(exc))


class ProviderBatch:
    """The batch jobs of one strategy's items, until each item is settled or goes online."""

    def __init__(
        self,
        runtime: BatchRuntime,
        strategy: LLMCallStrategy[Any],
        jobs: BatchJobs,
        runs: list[ItemRun],
    ) -> None:
        self.runtime, self.strategy, self.jobs, self.runs = runtime, strategy, jobs, runs
        self.config = runtime.config

    async def run(self) -> None:
        """Give every item its jobs' outcomes as attempts; settle those that are over."""
        try:
            await self.runtime.lifecycle.ensure_prepared(self.strategy)
        except Exception:
            return  # each item's own attempt reports the prepare failure
        pending = [run for run in self.runs if not await self._completed_before(run)]
        if len(pending) < len(self.runs):
            logger.info(
                "%d item(s) completed by an earlier run are not sent again",
                len(self.runs) - len(pending),
            )
        rounds = self.config.retry.max_attempts if self.config.batch_retry == "batch" else 1
        for number in range(1, rounds + 1):
            if not pending:
                break
            outcomes = await self._round(pending, number)
            again: list[ItemRun] = []
            for run in pending:
                run.answered(outcomes[run.item.item_id])
                try:
                    await run.attempt()
                except ItemAttemptFailed as failure:
                    if failure.retry:
                        if number < rounds:
                            again.append(run)
                        continue  # not settled: its task run retries it online
                run.settled = True
            pending = again

    async def _completed_before(self, run: ItemRun) -> bool:
        """Whether an earlier run's result for this item is stored (resume: not sent again)."""
        config = self.config
        if not config.cache_results or config.refresh_cache:
            return False
        store = await get_result_store().aupdate_for_task(item_task_for(config))
        key = resume_key(None, {"run": run})  # type: ignore[arg-type]
        try:
            return await store.aexists(key)
        except Exception:
            return False

    # -- one round: its jobs, submitted or found, polled, read -----------------------------

    async def _round(self, runs: list[ItemRun], number: int) -> dict[str, Outcome]:
        size = max(1, self.jobs.max_requests_per_job)
        groups = [runs[start : start + size] for start in range(0, len(runs), size)]
        names: list[str | Exception] = []
        for group in groups:
            names.append(await self._job_for(group, number))
        try:
            statuses = await asyncio.gather(
                *(self._wait(name) for name in names if isinstance(name, str))
            )
        except BaseException:
            # Cancelled (the flow run, a batch timeout): the provider must not go on working
            # (and billing) for a run that is gone.
            for name in names:
                if isinstance(name, str):
                    await asyncio.shield(_cancel_quietly(self.jobs, name))
            raise
        done = iter(statuses)
        outcomes: dict[str, Outcome] = {}
        for group, name in zip(groups, names, strict=True):
            if isinstance(name, Exception):
                for run in group:
                    outcomes[run.item.item_id] = name
                continue
            status = next(done)
            answered = await self._outcomes(status)
            for run in group:
                key = run.item.item_id
                outcomes[key] = answered.get(key) or BatchJobError(_no_answer(status))
        return outcomes

    async def _outcomes(self, status: JobStatus) -> dict[str, Outcome]:
        if status.state in (JobState.FAILED, JobState.EXPIRED):
            return {}
        try:
            return await self.jobs.outcomes(status.name)
        except Exception as exc:
            logger.error("Could not read the results of %s: %s", status.name, describe(exc))
            return {}

    async def _wait(self, name: str) -> JobStatus:
        waiter = JobWaiter(self.jobs, name, self.runtime)
        state: State[Any] = await batch_job(name, waiter, return_state=True)  # type: ignore[misc]
        if state.is_completed():
            result: JobStatus = await state.aresult()
            return result
        return JobStatus(name, JobState.FAILED, error=f"polling ended in state {state.name}")

    # -- finding or creating a job ---------------------------------------------------------

    async def _job_for(self, runs: list[ItemRun], number: int) -> str | Exception:
        """The job of these requests: recorded, found by name, or created now (recorded at
        once). An exception when it could not be created: the requests' outcome."""
        fingerprint = self.runtime.fingerprint_for(self.strategy)
        manifest = manifest_of(fingerprint, number, runs)
        display_name, record = f"batch-llm-{manifest}", f"batch_llm_job_{manifest}"
        reused = await self._reusable(record, display_name)
        if reused is not None:
            logger.warning(
                "Resuming batch job %s (%s) of an earlier run of these %d items: no new job",
                reused.name,
                reused.state,
                len(runs),
            )
            await self._record(record, reused.name, display_name, len(runs))
            return reused.name
        requests = [(run.item.item_id, run.item.prompt) for run in runs]
        error: Exception | None = None
        for attempt in range(1, _SUBMIT_TRIES + 1):
            try:
                name = await self.jobs.submit(requests, display_name)
            except Exception as exc:
                error = exc
                # The job may exist though the answer was lost: never create it twice.
                found = await self._found(display_name)
                if found is not None:
                    name = found.name
                else:
                    logger.warning(
                        "Creating the batch job failed (try %d of %d): %s",
                        attempt,
                        _SUBMIT_TRIES,
                        describe(exc),
                    )
                    await asyncio.sleep(min(2.0**attempt, 30.0))
                    continue
            await self._record(record, name, display_name, len(runs))
            logger.info("Created batch job %s for %d item(s)", name, len(runs))
            return name
        return BatchJobError(
            f"the batch job could not be created: {describe(error) if error else 'unknown'}"
        )

    async def _reusable(self, record: str, display_name: str) -> JobStatus | None:
        if self.config.refresh_cache:
            return None
        try:
            saved = await Variable.aget(record, default=None)  # type: ignore[func-returns-value]
        except Exception as exc:
            logger.warning("Could not read the job record %s: %s", record, describe(exc))
            saved = None
        if isinstance(saved, dict) and isinstance(saved.get("job"), str):
            try:
                status = await self.jobs.status(saved["job"])
            except Exception:
                status = None
            if status is not None and self._usable(status):
                return status
        return await self._found(display_name)

    async def _found(self, display_name: str) -> JobStatus | None:
        try:
            jobs = await self.jobs.find(display_name)
        except Exception as exc:
            logger.warning("Could not list batch jobs: %s", describe(exc))
            return None
        usable = [job for job in jobs if self._usable(job)]
        return usable[0] if usable else None

    def _usable(self, status: JobStatus) -> bool:
        if status.state in _NOT_REUSED:
            return False
        ttl = self.config.result_ttl_seconds
        if ttl is None or status.create_time is None:
            return True
        age = (datetime.now(UTC) - status.create_time).total_seconds()
        return age <= ttl

    async def _record(self, record: str, name: str, display_name: str, requests: int) -> None:
        value = {
            "job": name,
            "display_name": display_name,
            "requests": requests,
            "recorded": datetime.now(UTC).isoformat(),
        }
        try:
            await Variable.aset(record, value, overwrite=True)
        except Exception as exc:  # the display name still finds the job on a re-run
            logger.warning("Could not record batch job %s: %s", name, describe(exc))


def _no_answer(status: JobStatus) -> str:
    reason = {
        JobState.EXPIRED: "expired before answering this request (jobs expire after 48 h)",
        JobState.FAILED: "failed",
        JobState.CANCELLED: "was cancelled before answering this request",
    }.get(status.state, "finished without an answer for this request")
    error = f": {status.error}" if status.error else ""
    return f"batch job {status.name} {reason}{error}"
