"""Prometheus metrics of a batch, parsed back from where an operator reads them: the HTTP
endpoint while the batch runs, the node_exporter textfile, and a real Pushgateway."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from prefect_batch_llm import (
    LLMWorkItem,
    ParallelBatchProcessor,
    ProcessorConfig,
    RetryConfig,
)
from prefect_batch_llm.gemini import GeminiCredentials, GeminiStrategy
from prefect_batch_llm.gemini.pricing import gemini_pricing
from prefect_batch_llm.testing import Fault, GeminiEmulator, MockFailure, MockStrategy

FAST = RetryConfig(initial_wait=0.01, max_wait=0.05)
SECRET = "test-key-SECRET-0123456789"
LABEL_NAMES = {"flow_name", "flow_run_id", "outcome", "category", "kind", "quantile", "le"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


@pytest.fixture(scope="module")
def pushgateway():
    """A real Prometheus Pushgateway on a free local port (Debian: prometheus-pushgateway)."""
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        pytest.skip(
            "No Pushgateway binary: install Debian's prometheus-pushgateway (CI does) to run "
            "the push test."
        )
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                fetch(f"{url}/-/ready")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the Pushgateway did not start")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


class Samples:
    """Samples of a Prometheus text exposition, looked up by name and labels."""

    def __init__(self, text: str, **only: str) -> None:
        self.text = text
        self.samples = [
            sample
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.startswith("prefect_batch_llm_")
            and all(sample.labels.get(k) == v for k, v in only.items())
        ]

    def get(self, name: str, **labels: str) -> float:
        found = [
            s.value
            for s in self.samples
            if s.name == f"prefect_batch_llm_{name}"
            and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) == 1, (name, labels, found)
        return float(found[0])

    def names(self) -> set[str]:
        return {s.name for s in self.samples}

    def label_names(self) -> set[str]:
        return {key for s in self.samples for key in s.labels}


def assert_is_the_batch(samples: Samples, batch: Any, pricing: Any = None) -> None:
    """Every metric equals the batch's own totals."""
    summary = batch.summary(pricing)
    assert samples.get("items_total", outcome="succeeded") == batch.succeeded
    assert samples.get("items_total", outcome="failed") == batch.failed
    for category, count in batch.errors_by_category().items():
        assert samples.get("item_errors_total", category=category) == count
    assert samples.get("calls_total") == summary["calls"]
    assert samples.get("rate_limited_calls_total") == summary["rate_limited_calls"]
    assert samples.get("cooldown_seconds_total") == pytest.approx(
        summary["cooldown_seconds"], abs=1e-3
    )
    assert samples.get("tokens_total", kind="input") == batch.total_input_tokens
    assert samples.get("tokens_total", kind="cached_input") == batch.total_cached_tokens
    assert samples.get("tokens_total", kind="output") == batch.total_output_tokens
    if pricing is not None:
        assert samples.get("estimated_cost_usd_total") == pytest.approx(
            batch.estimated_cost(pricing), rel=1e-9
        )
    assert samples.get("call_latency_seconds_count") == summary["calls"]
    assert samples.get("call_latency_seconds_bucket", le="+Inf") == summary["calls"]
    for quantile, key in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")):
        assert samples.get("call_latency_quantile_seconds", quantile=quantile) == pytest.approx(
            summary[f"latency_{key}_seconds"], abs=1e-6
        )
    assert samples.label_names() <= LABEL_NAMES | {"job", "instance"}, "no other label"


async def test_scraped_written_and_pushed_metrics_equal_the_batch_and_the_emulator(
    tmp_path, pushgateway
):
    items, port, textfile = 12, free_port(), tmp_path / "batch.prom"
    pricing = gemini_pricing("gemini-2.5-flash")
    scraped: list[str] = []

    with GeminiEmulator() as emulator:
        emulator.add_fault(Fault(kind="429", times=3, retry_after=0.3))
        emulator.add_fault(Fault(kind="400", prompt_contains="refuse"))
        strategy = GeminiStrategy(
            credentials=GeminiCredentials(api_key=SecretStr(SECRET), base_url=emulator.base_url)
        )
        delivered: list[Any] = []

        async def on_result(result):
            delivered.append(result)
            if len(delivered) == items:  # every result is accounted: scrape before the end
                url = f"http://127.0.0.1:{port}/metrics"
                scraped.append(await asyncio.to_thread(fetch, url))

        @flow(name="signals-metrics")
        async def batch_flow():
            config = ProcessorConfig(
                max_workers=4,
                retry=FAST,
                report_artifacts=False,
                metrics_port=port,
                metrics_textfile=str(textfile),
                metrics_pushgateway=pushgateway,
            )
            processor = ParallelBatchProcessor(config=config, on_result=on_result, pricing=pricing)
            async with processor:
                for i in range(items):
                    prompt = f"refuse {i}" if i == 5 else f"question {i}"
                    await processor.add_work(LLMWorkItem(f"q{i}", strategy, prompt))
                return await processor.process_all()

        state = await batch_flow(return_state=True)
        billed = emulator.stats()
    batch = await state.aresult()
    flow_run_id = str(state.state_details.flow_run_id)
    assert batch.succeeded == items - 1 and batch.errors_by_category() == {"permanent": 1}

    endpoint = Samples(scraped[0])
    written = Samples(textfile.read_text())
    pushed = Samples(fetch(f"{pushgateway}/metrics"), flow_run_id=flow_run_id)
    for samples in (endpoint, written, pushed):
        assert_is_the_batch(samples, batch, pricing)
        # ...and the emulator's own counters
        assert samples.get("calls_total") == billed["calls_by_endpoint"]["generateContent"]
        assert samples.get("rate_limited_calls_total") == billed["calls_by_status"]["429"] == 3
        assert samples.get("tokens_total", kind="input") == billed["billed"]["input_tokens"]
        assert samples.get("tokens_total", kind="output") == billed["billed"]["output_tokens"]
        assert samples.get("tokens_total", kind="cached_input") == billed["billed"]["cached_tokens"]
        assert samples.get("items_expected") == items
        assert SECRET not in samples.text
    assert {s.labels["flow_run_id"] for s in written.samples} == {flow_run_id}
    assert {s.labels["flow_name"] for s in written.samples} == {"signals-metrics"}
    assert {s.labels["job"] for s in pushed.samples} == {"prefect-batch-llm"}
    assert batch.summary()["cooldown_seconds"] >= 0.3

    # The endpoint lived as long as the batch; the run's Pushgateway group stays until deleted.
    with pytest.raises(OSError):
        fetch(f"http://127.0.0.1:{port}/metrics")
    group = f"{pushgateway}/metrics/job/prefect-batch-llm/flow_run_id/{flow_run_id}"
    urllib.request.urlopen(urllib.request.Request(group, method="DELETE"), timeout=10).close()
    assert Samples(fetch(f"{pushgateway}/metrics"), flow_run_id=flow_run_id).samples == []


async def run_mock_batch(items: int, on_result: Any = None, **config: Any):
    strategy = MockStrategy(
        input_tokens=40,
        cached_input_tokens=30,
        output_tokens=7,
        failures=[MockFailure(kind="transient", prompt_contains="flaky")],
    )
    processor = ParallelBatchProcessor(
        config=ProcessorConfig(retry=FAST, report_artifacts=False, **config),
        on_result=on_result,
    )
    async with processor:
        for i in range(items):
            prompt = f"flaky {i}" if i % 3 == 0 else f"question {i}"
            await processor.add_work(LLMWorkItem(f"m{i}", strategy, prompt))
        return await processor.process_all()


async def test_two_batches_in_one_process_have_their_own_metrics_and_can_reuse_the_port(
    tmp_path, caplog
):
    port = free_port()

    @flow(name="two-batches")
    async def two_batches():
        first = await run_mock_batch(
            4, metrics_port=port, metrics_textfile=str(tmp_path / "first.prom")
        )
        second = await run_mock_batch(
            9, metrics_port=port, metrics_textfile=str(tmp_path / "second.prom")
        )
        return first, second

    with caplog.at_level(logging.WARNING, logger="prefect_batch_llm"):
        first, second = await two_batches()
    assert "Could not serve" not in caplog.text, "the first batch released the port"
    for batch, name in ((first, "first"), (second, "second")):
        samples = Samples((tmp_path / f"{name}.prom").read_text())
        assert_is_the_batch(samples, batch)
        # failed transient calls bill nothing: 30 cached tokens per successful call
        assert samples.get("tokens_total", kind="cached_input") == 30 * batch.succeeded
    assert first.total_items == 4 and second.total_items == 9
    assert "prefect_batch_llm_estimated_cost_usd_total" not in samples.names(), "no prices"
    assert second.summary()["attempts_max"] == 2, "the flaky items made two calls"
    assert not any(metric.name.startswith("prefect_batch_llm") for metric in REGISTRY.collect()), (
        "never the process-wide default registry"
    )


async def test_the_textfile_is_rewritten_while_the_batch_runs(tmp_path, monkeypatch):
    monkeypatch.setattr("prefect_batch_llm.metrics.PUBLISH_INTERVAL_SECONDS", 0.05)
    textfile = tmp_path / "live.prom"
    mid_batch: list[Samples] = []

    async def on_result(result):
        if not mid_batch:  # results are delivered one at a time: the count stays at 1
            await asyncio.sleep(0.5)
            mid_batch.append(Samples(textfile.read_text()))

    @flow(name="live-textfile")
    async def live():
        return await run_mock_batch(6, metrics_textfile=str(textfile), on_result=on_result)

    batch = await live()
    assert mid_batch[0].get("items_total", outcome="succeeded") == 1
    assert_is_the_batch(Samples(textfile.read_text()), batch)


async def test_metrics_that_cannot_be_served_written_or_pushed_are_warnings(tmp_path, caplog):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        busy_port = int(taken.getsockname()[1])

        @flow(name="metrics-nowhere")
        async def nowhere():
            return await run_mock_batch(
                3,
                metrics_port=busy_port,
                metrics_textfile=str(tmp_path / "missing-dir" / "batch.prom"),
                metrics_pushgateway=f"http://127.0.0.1:{free_port()}",
            )

        with caplog.at_level(logging.WARNING, logger="prefect_batch_llm"):
            batch = await nowhere()
    assert batch.succeeded == 3
    assert f"Could not serve the batch metrics on port {busy_port}" in caplog.text
    assert "Could not write the batch metrics to" in caplog.text
    assert "Could not push the batch metrics to the Pushgateway" in caplog.text


def test_only_the_documented_metric_names_exist(tmp_path):
    from prefect_batch_llm._engine import BatchStats
    from prefect_batch_llm.metrics import batch_registry
    from prefect_batch_llm.results import ModelPricing

    stats = BatchStats()
    stats.latency.record(0.2)
    registry = batch_registry(stats, ModelPricing(1.0, 2.0), {"flow_run_id": "x"})
    names = {metric.name for metric in registry.collect()}
    documented = Path(__file__).parent.parent / "docs" / "guides" / "signals.md"
    for name in names:
        assert f"`{name}" in documented.read_text(), f"{name} is not in docs/guides/signals.md"
    assert names == {
        "prefect_batch_llm_items",
        "prefect_batch_llm_item_errors",
        "prefect_batch_llm_items_expected",
        "prefect_batch_llm_calls",
        "prefect_batch_llm_rate_limited_calls",
        "prefect_batch_llm_cooldown_seconds",
        "prefect_batch_llm_tokens",
        "prefect_batch_llm_estimated_cost_usd",
        "prefect_batch_llm_call_latency_seconds",
        "prefect_batch_llm_call_latency_quantile_seconds",
    }


async def test_the_endpoint_listens_on_every_interface_and_is_closed_at_the_end():
    from prefect_batch_llm._engine import BatchStats
    from prefect_batch_llm.metrics import BatchMetrics

    port = free_port()
    metrics = BatchMetrics(
        ProcessorConfig(metrics_port=port), BatchStats(), None, flow_name="f", flow_run_id="r"
    )
    await metrics.start()
    try:
        assert metrics._server.server_address == ("0.0.0.0", port)
        assert "prefect_batch_llm_calls_total" in await asyncio.to_thread(
            fetch, f"http://127.0.0.1:{port}/metrics"
        )
    finally:
        await metrics.finish()
    with socket.socket() as again:
        again.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # past TIME_WAIT, not a listener
        again.bind(("0.0.0.0", port))
        again.listen()  # the port is free again


async def test_the_deployed_flow_takes_the_metrics_settings_from_its_config(tmp_path):
    from prefect_batch_llm.flows import batch_llm

    await MockStrategy(input_tokens=20, output_tokens=4).save("signals-mock", overwrite=True)
    source = tmp_path / "items.jsonl"
    source.write_text(
        "".join(f'{{"id": "d{i}", "prompt": "{uuid.uuid4().hex} {i}"}}\n' for i in range(5))
    )
    textfile = tmp_path / "deployed.prom"
    summary = await batch_llm(
        input=str(source),
        strategy="mock-llm-strategy/signals-mock",
        output=str(tmp_path / "out.jsonl"),
        config={"metrics_textfile": str(textfile), "report_artifacts": False},
    )
    samples = Samples(textfile.read_text())
    assert samples.get("items_total", outcome="succeeded") == summary["succeeded"] == 5
    assert samples.get("calls_total") == summary["calls"] == 5
    assert samples.get("tokens_total", kind="input") == summary["total_input_tokens"] == 100
    assert {s.labels["flow_name"] for s in samples.samples} == {"batch-llm"}
    for key in ("latency_p50_seconds", "latency_p95_seconds", "latency_p99_seconds"):
        assert summary[key] is not None
    assert summary["attempts_mean"] == 1.0 and summary["attempts_max"] == 1
