"""Processor settings. Pydantic models, so they validate and work as flow parameters."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RetryConfig(BaseModel):
    """How failed attempts are retried.

    `max_attempts` bounds calls for transient, timeout and validation errors. Rate limits
    have their own budget, `max_rate_limit_retries`, and never use up attempts.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(3, ge=1, description="Attempts per item (1 = no retries).")
    initial_wait: float = Field(1.0, ge=0, description="Backoff before the 2nd attempt, seconds.")
    max_wait: float = Field(60.0, ge=0, description="Upper bound of any backoff, seconds.")
    exponential_base: float = Field(2.0, ge=1, description="Backoff growth per attempt.")
    jitter: bool = Field(True, description="Randomise backoffs (full jitter over the upper half).")
    max_rate_limit_retries: int = Field(
        10, ge=0, description="Retries after rate limits, on top of max_attempts."
    )

    @model_validator(mode="after")
    def _waits_ordered(self) -> RetryConfig:
        if self.max_wait < self.initial_wait:
            raise ValueError(
                f"max_wait ({self.max_wait}) is smaller than initial_wait ({self.initial_wait}); "
                "raise max_wait or lower initial_wait."
            )
        return self

    def backoff(self, failed_attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after attempt number `failed_attempt` (1-based) failed."""
        wait = min(self.max_wait, self.initial_wait * self.exponential_base ** (failed_attempt - 1))
        if self.jitter and wait > 0:
            wait = (rng or random).uniform(wait / 2, wait)
        return wait


class ProcessorConfig(BaseModel):
    """Settings of a `ParallelBatchProcessor`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_workers: int = Field(5, ge=1, le=4096, description="Items in flight at once.")
    timeout_per_item: float = Field(
        120.0, gt=0, description="Seconds one attempt may take before it is a timeout."
    )
    retry: RetryConfig = Field(default_factory=RetryConfig)
    total_timeout_per_item: float | None = Field(
        None, gt=0, description="Seconds an item may take over all attempts and waits."
    )
    batch_timeout: float | None = Field(
        None, gt=0, description="Seconds `process_all()` may take; unfinished items then fail."
    )
    max_requests_per_minute: float | None = Field(
        None, gt=0, description="Pace call starts to this rate (per rate-limit scope)."
    )
    dry_run: bool = Field(
        False, description="Call each strategy's `dry_run()` instead of the LLM; no tokens billed."
    )
    items_per_task: int | None = Field(
        None,
        ge=1,
        description="Large-batch mode: run items in chunk tasks of this many items instead of "
        "one task per item (same retries, accounting and per-item results).",
    )
    cache_results: bool = Field(
        False,
        description="Persist each item's output and skip items already done by an earlier run "
        "(key: item id, prompt, context, strategy configuration).",
    )
    refresh_cache: bool = Field(
        False, description="With cache_results: recompute every item and overwrite its result."
    )
    result_ttl_seconds: float | None = Field(
        None,
        gt=0,
        description="With cache_results: how long a stored result may be reused, in seconds "
        "(empty: no expiry).",
    )
    max_failed_fraction: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Largest fraction of items (0.0 to 1.0) that may fail before the batch "
        "counts as failed. A batch in which every item failed always counts as failed.",
    )
    # -- provider Batch Mode (docs/guides/half-price.md) --
    batch_poll_interval_seconds: float = Field(
        30.0,
        gt=0,
        description="Batch Mode: seconds between the first polls of a job (growing 1.5x per "
        "poll up to batch_poll_max_interval_seconds).",
    )
    batch_poll_max_interval_seconds: float = Field(
        600.0, gt=0, description="Batch Mode: the longest wait between two polls of a job."
    )
    batch_retry: Literal["online", "batch"] = Field(
        "online",
        description="Batch Mode: retry failed or unanswered requests online (now, at the "
        "standard price) or in another batch job (half price, hours later; up to "
        "retry.max_attempts jobs, then online).",
    )
    # -- budget cap (docs/guides/cost.md) --
    max_cost_usd: float | None = Field(
        None,
        gt=0,
        description="Budget cap in US dollars: no new item starts once the spend so far, the "
        "projected cost of the items in flight and of the next item would exceed it; items "
        "not started fail with category budget_exceeded (needs the processor's pricing).",
    )
    expected_cost_per_item_usd: float | None = Field(
        None,
        ge=0,
        description="With max_cost_usd: the cost of one item to assume until the first item "
        "finishes (e.g. a cost preview's cost_per_item_usd). Empty: items start one at a time "
        "until the first finishes, then the mean cost of finished items is used.",
    )
    # -- one quota across processes (docs/guides/scale-out.md) --
    global_limit_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]){0,90}$",
        description="Share the provider quota with every process using this name: Prefect "
        "global concurrency limits <name>-rpm and <name>-tpm (letters, digits, . _ -).",
    )
    global_requests_per_minute: int | None = Field(
        None, gt=0, description="With global_limit_name: requests per minute, all processes."
    )
    global_tokens_per_minute: int | None = Field(
        None,
        gt=0,
        description="With global_limit_name: tokens (input + output) per minute, all processes.",
    )
    global_tokens_per_call: int | None = Field(
        None,
        gt=0,
        description="With global_tokens_per_minute: tokens to charge each call before it runs "
        "(empty: the mean of this process's finished calls; a quarter of the prompt's "
        "characters until one finishes).",
    )
    global_burst_seconds: float = Field(
        2.0,
        gt=0,
        le=30,
        description="Seconds of quota the global limits may spend at once (their capacity); "
        "the steady rate is the quota minus this burst, so no minute exceeds the quota.",
    )
    global_limit_create: bool = Field(
        True,
        description="Create or resize the global concurrency limits to match these settings "
        "(off: use existing limits as they are; a missing one fails the calls).",
    )
    keep_results: bool = Field(
        True, description="Keep every result in BatchResult.results (off: totals only)."
    )
    report_artifacts: bool = Field(
        True, description="Inside a flow run: progress, table and report artifacts in the UI."
    )
    artifact_key: str | None = Field(
        None,
        pattern=r"^[a-z0-9-]+$",
        description="Key prefix of the artifacts (lowercase letters, digits, dashes).",
    )
    progress_bar: bool | None = Field(
        None, description="Show a terminal progress bar (default: when stderr is a terminal)."
    )
    # Prometheus metrics of the batch (prefect_batch_llm.metrics); every one is off by default.
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve the batch's Prometheus metrics at http://<host>:<port>/metrics "
        "while it runs (for a Prometheus scrape).",
    )
    metrics_textfile: str | None = Field(
        None,
        pattern=r"\.prom$",
        description="Write the batch's Prometheus metrics to this .prom file (node_exporter's "
        "textfile collector directory), every 15 seconds and at the end.",
    )
    metrics_pushgateway: str | None = Field(
        None,
        description="Push the batch's Prometheus metrics to this Pushgateway "
        "(e.g. http://pushgateway:9091; job prefect-batch-llm, grouped by flow_run_id), every "
        "15 seconds and at the end.",
    )
    report_failed_first: bool = Field(
        False, description="List failed items first in the results artifact (else input order)."
    )
    quiet_item_logs: bool = Field(
        False,
        description="Keep the run's logs to batch-level lines, retries and failures: drop the "
        "item task runs' INFO lines (one 'Finished in state Completed()' per item).",
    )

    @model_validator(mode="after")
    def _large_batch_mode_consistent(self) -> ProcessorConfig:
        if self.items_per_task is not None and self.cache_results:
            raise ValueError(
                "cache_results needs one task per item (it persists each item's task result); "
                "it cannot be combined with items_per_task. Drop one of the two."
            )
        return self

    @model_validator(mode="after")
    def _global_limits_consistent(self) -> ProcessorConfig:
        rates = self.global_requests_per_minute or self.global_tokens_per_minute
        if self.global_limit_name is None and rates:
            raise ValueError(
                "global_requests_per_minute / global_tokens_per_minute need global_limit_name "
                "(the name every process sharing the quota uses, e.g. 'gemini-prod')."
            )
        if self.global_limit_name is not None and not rates:
            raise ValueError(
                f"global_limit_name {self.global_limit_name!r} needs "
                "global_requests_per_minute and/or global_tokens_per_minute."
            )
        if self.global_tokens_per_call is not None and not self.global_tokens_per_minute:
            raise ValueError("global_tokens_per_call needs global_tokens_per_minute.")
        return self

    @model_validator(mode="after")
    def _timeouts_consistent(self) -> ProcessorConfig:
        total = self.total_timeout_per_item
        if total is not None and total < self.timeout_per_item:
            raise ValueError(
                f"total_timeout_per_item ({total}) is shorter than timeout_per_item "
                f"({self.timeout_per_item}): no attempt could use its full time. Raise "
                "total_timeout_per_item or lower timeout_per_item."
            )
        return self
