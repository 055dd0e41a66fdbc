"""The Prefect UI in a real browser, after a real batch run.

Starts `prefect server start` on a free loopback port with its own PREFECT_HOME, registers
the blocks, runs the deployable `batch-llm` flow over a small file against the bundled Gemini
emulator (one item scripted to fail with a permanent 400), then opens the UI in headless
Chromium (Playwright driving Debian's `/usr/bin/chromium`; Playwright's own browser download
is not used) and checks what a user sees: the task runs named after the items, the report
artifact, a failed item's error, the block form of the cached strategy.

Screenshots of every page go to `tests/.artifacts/ui/` (gitignored). Skipped, with one
message, where Playwright or a Chromium executable is missing (`.ci/run` installs both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_batch_llm._links import LOGO_URL
from prefect_batch_llm.testing import Fault, GeminiEmulator

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - depends on the environment
    async_playwright = None

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
SCREENSHOTS = REPO / "tests" / ".artifacts" / "ui"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STRATEGY = "gemini-cached-strategy/handbook-qa"  # saved by blocks/create_blocks.py
MODEL = "gemini-2.5-flash"
FAILING = "ui-gift-card"
ITEMS = {
    "ui-return-window": "How long may I return an item?",
    "ui-refund-time": "How fast is a refund paid?",
    FAILING: "Can I refund a gift card?",
}
EMULATOR_ERROR = "Request contains an invalid argument."  # the emulator's 400 message


def find_chromium() -> str | None:
    """`CHROMIUM_PATH`, else the first Chromium or Chrome on PATH."""
    configured = os.environ.get("CHROMIUM_PATH")
    if configured:
        return configured if Path(configured).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = find_chromium()
_missing = [
    what
    for what, absent in (
        ("the playwright package (pip install -e '.[dev]')", async_playwright is None),
        ("a Chromium executable (apt-get install chromium, or set CHROMIUM_PATH)", not CHROMIUM),
    )
    if absent
]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"browser test needs {' and '.join(_missing)}"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real `prefect server start` on a free port; yields its API URL and a client env."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "storage"),
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server did not become healthy"
            time.sleep(0.3)
        yield api, env
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert async_playwright is not None and CHROMIUM is not None
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=SCREENSHOTS / f"{name}.png")


async def read_run(api: str) -> dict[str, Any]:
    """The ids the pages are addressed by: the flow run, its task runs, its artifacts."""
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            [flow_run] = await client.read_flow_runs()
            only_this_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
            task_runs = await client.read_task_runs(flow_run_filter=only_this_run)
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])
                )
            )
    return {
        "flow_run": flow_run,
        "task_runs": {t.name: t for t in task_runs},
        "artifacts": artifacts,
    }


async def test_the_ui_shows_a_finished_batch_and_the_block_form(
    tmp_path: Path, server: tuple[str, dict[str, str]], browser: Browser
) -> None:
    api, env = server
    ui = api.removesuffix("/api")
    source = tmp_path / "questions.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in ITEMS.items()))
    output = tmp_path / "results.jsonl"

    with GeminiEmulator(latency=0.01) as emulator:
        emulator.add_fault(Fault(kind="400", prompt_contains=ITEMS[FAILING]))
        run([*PREFECT, "block", "register", "-m", "prefect_batch_llm"], env)
        run([sys.executable, "blocks/create_blocks.py", "--emulator-url", emulator.base_url], env)
        # The deployable flow, run once against the server: 1 of 3 items fails, more than
        # the default 5% allowed, so the run ends Failed (exit status 1) after its report.
        flow = subprocess.run(
            [
                sys.executable,
                "-c",
                "import asyncio, sys; from prefect_batch_llm.flows import batch_llm; "
                "asyncio.run(batch_llm("
                "input=sys.argv[1], strategy=sys.argv[2], output=sys.argv[3]))",
                str(source),
                STRATEGY,
                str(output),
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert "1 of 3 items failed" in flow.stderr + flow.stdout, flow.stderr[-3000:]

    found = await read_run(api)
    flow_run = found["flow_run"]
    assert set(found["task_runs"]) == set(ITEMS)
    failed_task_run = found["task_runs"][FAILING]
    # Keyed per flow and input (`<...>-report`), so runs of one input share a timeline.
    [report] = [a for a in found["artifacts"] if (a.key or "").endswith("-report")]
    [failure_note] = [
        a
        for a in found["artifacts"]
        if a.task_run_id == failed_task_run.id and a.type == "markdown"
    ]

    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    expect.set_options(timeout=30_000)  # a loaded 2-core machine renders slowly
    print(f"\nscreenshots: {SCREENSHOTS}")

    # The flow run's Task Runs tab lists one task run per item, named by its id.
    await page.goto(f"{ui}/runs/flow-run/{flow_run.id}?tab=Task+Runs")
    await page.locator("li.p-tab", has_text="Task Runs").click()
    for item_id in ITEMS:
        await expect(page.get_by_text(item_id, exact=True).first).to_be_visible()
    await expect(page.get_by_text("(2 Completed, 1 Failed)")).to_be_visible()
    await shot(page, "flow-run-task-runs")

    # The report artifact names what ran: input, strategy block, model, output.
    await page.goto(f"{ui}/artifacts/artifact/{report.id}")
    await expect(page.get_by_role("heading", name="LLM batch report")).to_be_visible()
    await shot(page, "report-artifact")
    expected_rows = {
        "Outcome": "failed: 1 of 3 items failed",
        "Input": str(source),
        "Strategy": STRATEGY,
        "Model": MODEL,
        "Output": str(output),
    }
    for label, value in expected_rows.items():
        row = page.locator("tr").filter(
            has=page.locator("td:first-child", has_text=re.compile(rf"^\s*{label}\s*$"))
        )
        assert await row.count() == 1, f"the report has no single {label!r} row"
        assert value in await row.inner_text(), f"report row {label!r} lacks {value!r}"

    # A successful item's task run shows its outcome, calls, tokens and prompt (its final
    # state message, in the line Prefect logs when it ends; the flow's default logs).
    ok_task_run = found["task_runs"]["ui-return-window"]
    await page.goto(f"{ui}/runs/task-run/{ok_task_run.id}")
    await expect(
        page.get_by_text(re.compile(r"succeeded · 1 call\(s\) · tokens in"))
    ).to_be_visible()
    await expect(page.get_by_text(re.compile(re.escape(ITEMS["ui-return-window"])))).to_be_visible()
    await shot(page, "succeeded-task-run")

    # A failed item's task run shows why it failed, in its logs (the final state message)...
    await page.goto(f"{ui}/runs/task-run/{failed_task_run.id}")
    await expect(page.get_by_text(EMULATOR_ERROR).first).to_be_visible()
    await expect(page.get_by_text(re.compile(r"Finished in state Failed"))).to_be_visible()
    await shot(page, "failed-task-run")
    # ... and in the markdown artifact on that task run.
    await page.goto(f"{ui}/runs/task-run/{failed_task_run.id}?tab=Artifacts")
    await page.locator("li.p-tab", has_text="Artifacts").click()
    await expect(page.get_by_text(f"Why item {FAILING} failed")).to_be_visible()
    await page.goto(f"{ui}/artifacts/artifact/{failure_note.id}")
    await expect(page.get_by_text(EMULATOR_ERROR).first).to_be_visible()
    await shot(page, "failed-item-artifact")

    # The cached strategy's create form renders its fields, with their descriptions.
    await page.goto(f"{ui}/blocks/catalog/gemini-cached-strategy/create")
    await expect(page.get_by_text("Block Name", exact=True)).to_be_visible()
    # Fields with a plain default are required in the schema (so a block picked in a run form
    # validates, see StrategyBlock.__get_pydantic_json_schema__): no "(Optional)" on them.
    for label in (
        "Model",
        "System Instruction",
        "Cached Documents (Optional)",
        "Cached Document Paths (Optional)",
        "Cache Ttl Seconds",
        "Cache Renewal Buffer Seconds",
        "Cache Tags (Optional)",
        "Auto Renew",
        "Delete Cache On Cleanup",
        "Lifetime of the cache.",
    ):
        await expect(page.get_by_text(label, exact=True).first).to_be_attached()
    values = await page.eval_on_selector_all(
        "input, textarea", "fields => fields.map(field => field.value)"
    )
    assert {MODEL, "3600", "300"} <= set(values), values  # the fields' defaults are filled in
    # The logo points at the published docs site (not reachable offline: see
    # docs/guides/deployments.md, "Block logos").
    logos = await page.eval_on_selector_all("img", "imgs => imgs.map(img => img.src)")
    assert LOGO_URL in logos
    await shot(page, "block-form-gemini-cached-strategy")
    await page.get_by_text("Cache Ttl Seconds", exact=True).scroll_into_view_if_needed()
    await shot(page, "block-form-cache-fields")


async def test_a_strategy_block_picked_in_the_run_form_runs_the_batch(
    tmp_path: Path, server: tuple[str, dict[str, str]], browser: Browser
) -> None:
    """The deployment's run form: `strategy` is a block picker; the picked block's reference
    passes the server's parameter validation and the flow run loads and runs that block."""
    api, env = server
    ui = api.removesuffix("/api")
    source = tmp_path / "questions.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in ITEMS.items()))
    output = tmp_path / "picked.results.jsonl"
    with GeminiEmulator(latency=0.01) as emulator:
        run([*PREFECT, "block", "register", "-m", "prefect_batch_llm"], env)
        run([sys.executable, "blocks/create_blocks.py", "--emulator-url", emulator.base_url], env)
        deployment_id = run(
            [
                sys.executable,
                "-c",
                "import sys; from prefect_batch_llm.flows import batch_llm; "
                "d = batch_llm.to_deployment('form', parameters={'output': sys.argv[1]}); "
                "d.entrypoint = 'flows/batch.py:batch_llm'; print(d.apply())",
                str(output),
            ],
            env,
        ).strip()

        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        expect.set_options(timeout=30_000)
        await page.goto(f"{ui}/deployments/deployment/{deployment_id}/run")
        await page.locator("textarea").first.fill(str(source))  # `input`, the first field
        await page.get_by_text("GeminiCachedStrategy", exact=True).first.click()
        picker = page.locator(".block-document-input .p-select-button__control").first
        await picker.focus()
        await page.keyboard.press("Space")  # the select opens from the keyboard
        await page.get_by_text("handbook-qa", exact=True).click()
        await expect(page.locator(".block-document-input").first).to_contain_text("handbook-qa")
        await shot(page, "run-form-block-picker")
        await page.get_by_role("button", name="Submit").click()
        await page.wait_for_url(re.compile(r"/deployments/deployment/[^/]+\?tab=Runs"))

        with temporary_settings(updates={PREFECT_API_URL: api}):
            async with get_client() as client:
                [flow_run] = await client.read_flow_runs()
                block = await client.read_block_document_by_name(
                    "handbook-qa", "gemini-cached-strategy"
                )
        assert flow_run.parameters["strategy"] == {"$ref": {"block_document_id": str(block.id)}}
        # Execute that flow run as a worker would (the engine, in its own process).
        run(
            [sys.executable, "-m", "prefect.engine"],
            {**env, "PREFECT__FLOW_RUN_ID": str(flow_run.id)},
            timeout=180,
        )
    with temporary_settings(updates={PREFECT_API_URL: api}):
        async with get_client() as client:
            finished = await client.read_flow_run(flow_run.id)
    assert finished.state is not None and finished.state.is_completed(), finished.state
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(ITEMS)
    assert all(line["success"] for line in lines)
