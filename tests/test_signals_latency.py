"""Pure parts of the operations signals: latency percentiles and rate-limit storms.

No Prefect here: `LatencyHistogram` and `RateLimiter` are plain objects, driven with chosen
latencies and a fake clock.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from fractions import Fraction

import pytest

from prefect_batch_llm._engine.rate_limit import CooldownEnded, CooldownStarted, RateLimiter
from prefect_batch_llm.results import BatchResult, LatencyHistogram, WorkItemResult

#: The documented precision: 2**(1/16) - 1, for latencies between 61 µs and 2.3 hours.
PRECISION = 2 ** (1 / 16) - 1


def nearest_rank(values: list[float], fraction: float) -> float:
    """The exact nearest-rank percentile (rank ceil(fraction * n), 1-based)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(Fraction(str(fraction)) * len(ordered)))
    return ordered[rank - 1]


def histogram_of(values: list[float]) -> LatencyHistogram:
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    return histogram


rng = random.Random(7)
WITHIN_RANGE = [
    ("one call", [0.25]),
    ("every call alike", [0.1] * 100),
    ("10 ms to 1 s in 10 ms steps", [i / 100 for i in range(1, 101)]),
    ("seven calls", [0.9, 0.1, 0.5, 0.3, 2.5, 0.7, 0.2]),
    ("bimodal: fast hits, slow misses", [0.05] * 90 + [3.0] * 10),
    ("a slow tail", [0.2] * 985 + [30.0] * 15),
    ("log-normal, 10 000 calls", [rng.lognormvariate(-1.0, 0.8) for _ in range(10_000)]),
    ("timeouts at 120 s among 1 s calls", [1.0] * 97 + [120.0] * 3),
]


@pytest.mark.parametrize("fraction", [0.5, 0.95, 0.99])
@pytest.mark.parametrize(("case", "values"), WITHIN_RANGE, ids=[c for c, _ in WITHIN_RANGE])
def test_percentiles_are_within_the_documented_precision(case, values, fraction):
    estimate = histogram_of(values).percentile(fraction)
    exact = nearest_rank(values, fraction)
    assert estimate is not None
    assert abs(estimate - exact) <= PRECISION * exact + 1e-12, (case, fraction, estimate, exact)


EXACT = [
    # (values, fraction, expected): the lowest and highest rank are the observed min and max.
    ([0.25], 0.5, 0.25),
    ([0.25], 0.99, 0.25),
    ([0.1] * 100, 0.95, 0.1),
    ([0.3, 0.1, 0.2], 0.99, 0.3),  # rank ceil(2.97) = 3: the maximum
    ([0.3, 0.1, 0.2], 0.3, 0.1),  # rank ceil(0.9) = 1: the minimum
    ([i / 100 for i in range(1, 101)], 1.0, 1.0),
]


@pytest.mark.parametrize(("values", "fraction", "expected"), EXACT)
def test_lowest_and_highest_ranks_are_exact(values, fraction, expected):
    assert histogram_of(values).percentile(fraction) == expected


def test_no_call_gives_no_percentile():
    assert LatencyHistogram().percentile(0.5) is None
    with pytest.raises(ValueError, match="fraction"):
        LatencyHistogram().percentile(0)


OUT_OF_RANGE = [
    # Below 61 µs the latencies share one bucket: reported as at most 2**-14 s.
    ([0.000001] * 10 + [0.5], 0.5, 0.000001, 2.0**-14),
    # Above 2**13 s (2.3 h) they share one bucket: reported between 2**13 s and the maximum.
    ([10_000.0, 20_000.0, 30_000.0, 40_000.0], 0.5, 2.0**13, 40_000.0),
]


@pytest.mark.parametrize(("values", "fraction", "low", "high"), OUT_OF_RANGE)
def test_out_of_range_latencies_are_bounded_as_documented(values, fraction, low, high):
    estimate = histogram_of(values).percentile(fraction)
    assert estimate is not None and low <= estimate <= high


def footprint(histogram: LatencyHistogram) -> int:
    """Bytes held by the histogram: its slots, its bucket list and the counts in it."""
    held = [histogram._counts, histogram.count, histogram.sum, histogram.minimum]
    return (
        sys.getsizeof(histogram)
        + sum(sys.getsizeof(part) for part in held)
        + sum(sys.getsizeof(count) for count in histogram._counts)
    )


def test_memory_does_not_grow_with_the_number_of_calls():
    histogram = LatencyHistogram()
    histogram.record(0.1)
    one_call = footprint(histogram)
    for i in range(300_000):
        histogram.record(0.001 + (i % 5000) * 0.0007)
    assert histogram.count == 300_001
    assert footprint(histogram) == one_call < 8192, "218 counters, whatever the calls"
    assert len(histogram._counts) == LatencyHistogram.BUCKETS == 218


def test_the_prometheus_buckets_are_exact_counts():
    values = [0.0001, 0.001, 0.3, 0.5, 0.50001, 1.0, 7.0, 20_000.0]
    histogram = histogram_of(values)
    bounds = [2.0**-10, 0.5, 1.0, 8.0, 2.0**13]
    assert histogram.cumulative(bounds) == [sum(v <= bound for v in values) for bound in bounds]


def test_summary_reports_attempts_over_the_items_that_made_calls():
    results = [
        WorkItemResult(item_id="a", success=True, attempts=1),
        WorkItemResult(item_id="b", success=True, attempts=3),
        WorkItemResult(
            item_id="c", success=False, error="x", error_category="permanent", attempts=2
        ),
        WorkItemResult(item_id="resumed", success=True, attempts=0),  # no call in this run
    ]
    summary = BatchResult(results=results).summary()
    assert summary["attempts_mean"] == 2.0 and summary["attempts_max"] == 3
    assert summary["latency_p50_seconds"] is None  # no call timed
    empty = BatchResult(results=[]).summary()
    assert empty["attempts_mean"] is None and empty["attempts_max"] == 0
    assert empty["calls"] == 0 and empty["rate_limited_calls"] == 0
    assert empty["cooldown_seconds"] == 0.0


# -- rate-limit storms ---------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: FakeClock) -> tuple[RateLimiter, list]:
    seen: list = []
    return RateLimiter(clock=clock, scope="gemini|x|m", observer=seen.append), seen


def test_one_storm_is_one_started_and_one_ended_whatever_its_429s():
    clock = FakeClock()
    gate, seen = limiter(clock)
    gate.start_cooldown(2.0, retry_after=2.0)  # the storm starts: pause until 102
    clock.now = 100.5
    gate.start_cooldown(1.0)  # inside the pause, ends earlier: counted, not extended
    clock.now = 101.0
    gate.start_cooldown(3.0, retry_after=3.0)  # extends the pause to 104
    assert seen == [CooldownStarted("gemini|x|m", 2.0, 2.0, 1)]
    gate.call_succeeded(passed_gate_at=99.0)  # a call from before the storm: not a resume
    clock.now = 104.5
    gate.call_succeeded(passed_gate_at=103.9)  # passed before the extension ended: neither
    assert len(seen) == 1
    gate.call_succeeded(passed_gate_at=104.0)  # passed after the pause: the storm is over
    assert seen[1] == CooldownEnded("gemini|x|m", 4.0, 3, resumed=True)
    gate.call_succeeded(passed_gate_at=105.0)
    assert len(seen) == 2 and gate.paused_seconds == 4.0


def test_429s_after_the_pause_but_before_a_success_extend_the_same_storm():
    clock = FakeClock()
    gate, seen = limiter(clock)
    gate.start_cooldown(1.0)
    clock.now = 101.5  # the pause is over, the first resumed call is rate limited again
    gate.start_cooldown(1.0)
    clock.now = 103.0
    gate.call_succeeded(passed_gate_at=102.5)
    assert [type(event) for event in seen] == [CooldownStarted, CooldownEnded]
    assert seen[1].paused_seconds == 2.5 and seen[1].rate_limited_calls == 2


def test_each_storm_is_counted_and_paused_seconds_add_up():
    clock = FakeClock()
    gate, seen = limiter(clock)
    for start in (100.0, 110.0):
        clock.now = start
        gate.start_cooldown(2.0)
        clock.now = start + 3
        gate.call_succeeded(passed_gate_at=start + 2.5)
    assert [e.cooldowns for e in seen if isinstance(e, CooldownStarted)] == [1, 2]
    assert gate.cooldowns == 2 and gate.paused_seconds == 4.0


def test_a_storm_open_when_the_batch_ends_ends_then_with_the_pause_so_far():
    clock = FakeClock()
    gate, seen = limiter(clock)
    gate.start_cooldown(30.0, retry_after=30.0)
    clock.now = 105.0
    assert gate.paused_seconds == 5.0  # live, while it lasts
    gate.close()
    assert seen[-1] == CooldownEnded("gemini|x|m", 5.0, 1, resumed=False)
    gate.close()
    assert len(seen) == 2, "closing twice emits nothing more"


def test_an_observer_that_raises_never_fails_the_call(caplog):
    def broken(event):
        raise RuntimeError("events are down")

    gate = RateLimiter(clock=FakeClock(), observer=broken)
    gate.start_cooldown(1.0)
    gate.close()
    assert "events are down" in caplog.text


async def test_acquire_waits_out_the_pause_and_returns_when_it_passed():
    gate = RateLimiter(slow_start_spacing=0.0)
    gate.start_cooldown(0.2)
    started = time.monotonic()
    passed = await asyncio.wait_for(gate.acquire(), 5)
    assert passed >= started + 0.19 and not gate.cooling_down
