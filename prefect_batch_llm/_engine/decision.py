"""The retry decision: a pure function of one failed attempt and what the item has used.

Nothing here sleeps, reads a clock or touches state: `decide()` is given the classifier's
verdict, the budgets the item has used, the retry settings, the current time, the item's
deadline and a random source, and returns whether to retry, how long to wait and why.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from prefect_batch_llm.config import RetryConfig
from prefect_batch_llm.errors import ErrorCategory, ErrorInfo

#: Cache-expired retries per item: the strategy renews the cache, the attempt is repeated.
CACHE_EXPIRED_RETRIES = 2


@dataclass(frozen=True)
class Used:
    """What an item has used so far: the number of the attempt that just failed (1-based)
    and the retries taken on the two budgets that do not use up attempts."""

    attempt: int = 1
    rate_limit_retries: int = 0
    cache_retries: int = 0


@dataclass(frozen=True)
class Decision:
    """What to do after a failed attempt.

    Attributes:
        retry: Whether the item gets another attempt.
        wait: Seconds before that attempt starts (0 when not retried).
        budget: Which budget the retry uses: `attempt`, `rate_limit` or `cache`; `None`
            when not retried.
        cooldown: Seconds every worker of the strategy's rate-limit scope pauses (a rate
            limit pauses the scope whether or not this item retries).
        reason: One line for the item's log, e.g. `attempt 2/3, waiting 2.1 s`.
    """

    retry: bool
    wait: float = 0.0
    budget: str | None = None
    cooldown: float = 0.0
    reason: str = ""

    def used_after(self, used: Used) -> Used:
        """The budgets used once this decision is taken."""
        if self.budget == "attempt":
            return Used(used.attempt + 1, used.rate_limit_retries, used.cache_retries)
        if self.budget == "rate_limit":
            return Used(used.attempt, used.rate_limit_retries + 1, used.cache_retries)
        if self.budget == "cache":
            return Used(used.attempt, used.rate_limit_retries, used.cache_retries + 1)
        return used


def decide(
    info: ErrorInfo,
    used: Used,
    retry: RetryConfig,
    *,
    now: float,
    deadline: float | None,
    rng: random.Random | None = None,
) -> Decision:
    """Retry or not, and how long to wait, after one failed attempt.

    - rate limit: its own budget (`max_rate_limit_retries`), waits at least the provider's
      Retry-After and the backoff of the rate-limit retry number, and pauses the scope;
    - cache expired: its own budget (`CACHE_EXPIRED_RETRIES`), no wait;
    - any other retryable category: up to `max_attempts`, exponential backoff (none for
      `validation`), at least the provider's suggested wait;
    - not retryable: final.

    A retry whose wait would end at or after the item's `deadline` is not taken: the item's
    total time budget bounds every wait.
    """
    category = str(info.error_category)
    cooldown = 0.0
    if info.is_rate_limit:
        allowed = retry.max_rate_limit_retries
        number = used.rate_limit_retries + 1
        cooldown = max(info.suggested_wait or 0.0, retry.backoff(number, rng))
        if used.rate_limit_retries >= allowed:
            return Decision(False, cooldown=cooldown, reason=f"rate limit budget used ({allowed})")
        decision = Decision(
            True, cooldown, "rate_limit", cooldown, f"rate limit {number}/{allowed}"
        )
    elif category == ErrorCategory.CACHE_EXPIRED and info.is_retryable:
        if used.cache_retries >= CACHE_EXPIRED_RETRIES:
            return Decision(False, reason=f"cache recovery budget used ({CACHE_EXPIRED_RETRIES})")
        number = used.cache_retries + 1
        reason = f"cache renewed {number}/{CACHE_EXPIRED_RETRIES}"
        decision = Decision(True, 0.0, "cache", reason=reason)
    elif not info.is_retryable:
        return Decision(False, reason=f"{category} is not retried")
    elif used.attempt >= retry.max_attempts:
        return Decision(False, reason=f"attempts used ({used.attempt}/{retry.max_attempts})")
    else:
        wait = 0.0 if category == ErrorCategory.VALIDATION else retry.backoff(used.attempt, rng)
        wait = max(wait, info.suggested_wait or 0.0)
        decision = Decision(
            True, wait, "attempt", reason=f"attempt {used.attempt + 1}/{retry.max_attempts}"
        )
    if deadline is not None and now + decision.wait >= deadline:
        return Decision(
            False,
            cooldown=cooldown,
            reason=f"the item's total_timeout_per_item ends before a {decision.wait:.1f} s wait",
        )
    return decision
