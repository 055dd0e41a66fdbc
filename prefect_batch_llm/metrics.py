"""Prometheus metrics of one batch: scraped while it runs, written or pushed at the end.

Every batch has its own `CollectorRegistry` (never the process-wide default registry, so two
batches in one process never collide). Its one collector reads the batch's live counters
(`BatchStats`, the same ones `get_stats()` and `BatchResult.summary()` report) each time the
metrics are collected: the metrics cannot drift from the batch's own totals.

`ProcessorConfig` chooses where they go, each off by default:

- `metrics_port`: an HTTP endpoint (`/metrics`) while the batch runs, for a Prometheus scrape;
- `metrics_textfile`: a `.prom` file for node_exporter's textfile collector, rewritten
  atomically every `PUBLISH_INTERVAL_SECONDS` and at the end;
- `metrics_pushgateway`: a Pushgateway, job `prefect-batch-llm`, grouping key the flow run
  id, pushed every `PUBLISH_INTERVAL_SECONDS` and at the end.

A failure to serve, write or push is a logged warning: metrics never fail a batch. Labels
are the flow's name and run id, outcomes, error categories, token kinds and quantiles: never
a prompt, a strategy setting or a credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from prefect.context import FlowRunContext
from prometheus_client import CollectorRegistry, push_to_gateway, start_http_server
from prometheus_client.exposition import write_to_textfile
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from prefect_batch_llm._engine.runtime import BatchStats
from prefect_batch_llm.config import ProcessorConfig
from prefect_batch_llm.results import LatencyHistogram, ModelPricing

logger = logging.getLogger("prefect_batch_llm")

#: Prefix of every metric name.
PREFIX = "prefect_batch_llm"
#: The Pushgateway job name.
PUSHGATEWAY_JOB = "prefect-batch-llm"
#: Seconds between two writes of the textfile / pushes to the Pushgateway while a batch runs.
PUBLISH_INTERVAL_SECONDS = 15.0
#: Upper bounds (`le`) of the latency histogram's buckets: powers of two from 1/1024 s to
#: 8192 s, each a bucket bound of `LatencyHistogram`, so the counts are exact.
LATENCY_BUCKETS: tuple[float, ...] = tuple(2.0**power for power in range(-10, 14))
#: The latency quantiles exported as gauges.
QUANTILES = (0.5, 0.95, 0.99)


class BatchCollector:
    """Collects one batch's metrics from its live counters (see the module docstring).

    Args:
        stats: The batch's counters.
        pricing: Prices for the estimated cost (no cost metric without them).
        labels: Labels on every sample, e.g. `{"flow_name": ..., "flow_run_id": ...}`.
    """

    def __init__(
        self,
        stats: BatchStats,
        pricing: ModelPricing | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        self._stats = stats
        self._pricing = pricing
        self._labels = dict(labels or {})

    def _counter(self, name: str, doc: str, *extra: str) -> CounterMetricFamily:
        return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[*self._labels, *extra])

    def _gauge(self, name: str, doc: str, *extra: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=[*self._labels, *extra])

    def collect(self) -> Iterator[Metric]:
        stats, values = self._stats, list(self._labels.values())
        # Snapshots first: the HTTP endpoint collects from its own thread.
        results = stats.results
        errors = dict(results.errors_by_category)
        latency = stats.latency.copy()

        items = self._counter("items", "Items with a final result.", "outcome")
        items.add_metric([*values, "succeeded"], results.succeeded)
        items.add_metric([*values, "failed"], results.failed)
        yield items

        failed = self._counter(
            "item_errors", "Failed items by the error category of their last attempt.", "category"
        )
        for category, count in sorted(errors.items()):
            failed.add_metric([*values, category], count)
        yield failed

        expected = self._gauge("items_expected", "Items in the input, when known (0: unknown).")
        expected.add_metric(values, stats.total)
        yield expected

        for name, doc, value in (
            ("calls", "Provider calls (attempts that reached the strategy).", stats.calls),
            ("rate_limited_calls", "Attempts rate limited (429).", stats.rate_limit_count),
            (
                "cooldown_seconds",
                "Seconds the rate-limit scopes were paused, summed over scopes.",
                stats.cooldown_seconds,
            ),
        ):
            counter = self._counter(name, doc)
            counter.add_metric(values, value)
            yield counter

        tokens = self._counter(
            "tokens",
            "Tokens billed, failed attempts included; input includes cached_input.",
            "kind",
        )
        tokens.add_metric([*values, "input"], stats.input_tokens)
        tokens.add_metric([*values, "cached_input"], stats.cached_input_tokens)
        tokens.add_metric([*values, "output"], stats.output_tokens)
        yield tokens

        if self._pricing is not None:
            cost = self._counter("estimated_cost_usd", "Estimated cost at list prices, USD.")
            cost.add_metric(values, stats.cost(self._pricing))
            yield cost

        yield self._histogram(latency, values)
        quantiles = self._gauge(
            "call_latency_quantile_seconds",
            "Call latency quantiles (nearest rank, within 4.4%); absent before the first call.",
            "quantile",
        )
        for fraction in QUANTILES:
            seconds = latency.percentile(fraction)
            if seconds is not None:
                quantiles.add_metric([*values, str(fraction)], seconds)
        yield quantiles

    def _histogram(self, latency: LatencyHistogram, values: list[str]) -> Metric:
        histogram = HistogramMetricFamily(
            f"{PREFIX}_call_latency_seconds",
            "Latency of every provider call, failed ones included (waits not included).",
            labels=list(self._labels),
        )
        counts = latency.cumulative(list(LATENCY_BUCKETS))
        buckets = [(repr(le), count) for le, count in zip(LATENCY_BUCKETS, counts, strict=True)]
        buckets.append(("+Inf", latency.count))
        histogram.add_metric(values, buckets, latency.sum)
        return histogram


def batch_registry(
    stats: BatchStats, pricing: ModelPricing | None = None, labels: dict[str, str] | None = None
) -> CollectorRegistry:
    """A new registry holding one batch's collector (not the process-wide default registry)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(BatchCollector(stats, pricing, labels))
    return registry


class BatchMetrics:
    """Publishes one batch's metrics where `config` says: an HTTP endpoint while the batch
    runs, a textfile and a Pushgateway periodically and at the end.

    Args:
        config: The batch's settings (`metrics_port`, `metrics_textfile`,
            `metrics_pushgateway`).
        stats: The batch's counters.
        pricing: Prices for the estimated cost metric.
        flow_name: The flow's name (a label).
        flow_run_id: The flow run's id (a label; the Pushgateway grouping key).
    """

    def __init__(
        self,
        config: ProcessorConfig,
        stats: BatchStats,
        pricing: ModelPricing | None,
        *,
        flow_name: str,
        flow_run_id: str,
    ) -> None:
        self._port = config.metrics_port
        self._textfile = config.metrics_textfile
        self._gateway = config.metrics_pushgateway
        labels = {"flow_name": flow_name, "flow_run_id": flow_run_id}
        self.registry = batch_registry(stats, pricing, labels)
        # The Pushgateway adds the grouping key's labels itself: pushed metrics must not
        # carry them.
        self._grouping_key = {"flow_run_id": flow_run_id}
        self._push_registry = batch_registry(stats, pricing, {"flow_name": flow_name})
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self._port or self._textfile or self._gateway)

    async def start(self) -> None:
        """Serve the endpoint and start the periodic writes and pushes (those asked for)."""
        if not self.enabled:
            return
        if self._port:
            try:
                self._server, self._thread = start_http_server(self._port, registry=self.registry)
            except Exception as exc:
                logger.warning(
                    "Could not serve the batch metrics on port %d (metrics_port): %s: %s",
                    self._port,
                    type(exc).__name__,
                    exc,
                )
        if self._textfile or self._gateway:
            self._publisher = asyncio.create_task(self._publish_periodically())

    async def finish(self) -> None:
        """Stop the endpoint and the periodic publishing; write and push the final values."""
        if not self.enabled:
            return
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
            self._publisher = None
        await self.publish()
        if self._server is not None:
            server, thread, self._server, self._thread = self._server, self._thread, None, None
            await asyncio.to_thread(_stop_server, server, thread)

    async def publish(self) -> None:
        """Write the textfile and push to the Pushgateway once (those asked for)."""
        async with self._lock:
            if self._textfile:
                await asyncio.to_thread(self._write_textfile, self._textfile)
            if self._gateway:
                await asyncio.to_thread(self._push, self._gateway)

    async def _publish_periodically(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL_SECONDS)
            await self.publish()

    def _write_textfile(self, path: str) -> None:
        try:
            write_to_textfile(path, self.registry)  # a temporary file, then an atomic rename
        except Exception as exc:
            logger.warning(
                "Could not write the batch metrics to %s (metrics_textfile): %s: %s",
                path,
                type(exc).__name__,
                exc,
            )

    def _push(self, gateway: str) -> None:
        try:
            push_to_gateway(
                gateway,
                job=PUSHGATEWAY_JOB,
                registry=self._push_registry,
                grouping_key=self._grouping_key,
                timeout=10,
            )
        except Exception as exc:  # the URL is not logged: it could hold credentials
            logger.warning(
                "Could not push the batch metrics to the Pushgateway (metrics_pushgateway): %s: %s",
                type(exc).__name__,
                exc,
            )


def _stop_server(server: Any, thread: threading.Thread | None) -> None:
    server.shutdown()
    server.server_close()  # release the port for the next batch
    if thread is not None:
        thread.join(timeout=5)


def metrics_for_current_flow_run(
    config: ProcessorConfig, stats: BatchStats, pricing: ModelPricing | None
) -> BatchMetrics:
    """The `BatchMetrics` of a batch running in the current flow run (labelled with it)."""
    context = FlowRunContext.get()
    flow_run = context.flow_run if context is not None else None
    flow = context.flow if context is not None else None
    return BatchMetrics(
        config,
        stats,
        pricing,
        flow_name=flow.name if flow is not None else "",
        flow_run_id=str(flow_run.id) if flow_run is not None else "",
    )
