"""Runs the `batch_llm` flow with a canary API key, then prints what its API holds.

Used by tests/test_secrets.py, in a subprocess with its own PREFECT_HOME (and so its own
ephemeral Prefect server). The canary key is read from stdin: it is never on the command
line, in the environment or in a file, so anything that writes it down is the library.

    python secrets_canary_flow.py SPEC.json < canary

SPEC holds `base_url` (the Gemini emulator), `document` (text to context-cache) and one
`runs` entry per flow run: `strategy` ("plain" or "cached"), `input`, `output` and
`config` (the flow's `config` parameter: overrides of the flow's defaults).

Prints one line per section, `@@readback <json>`: the flow's return values, then the flow
runs, task runs, every state of each (messages included), logs, artifacts and events,
as read back from the API after the runs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr

MARKER = "@@readback "


def emit(section: str, data: Any) -> None:
    print(MARKER + json.dumps({"section": section, "data": data}, default=str), flush=True)


def dump(models: list[Any]) -> list[Any]:
    return [m.model_dump(mode="json") for m in models]


async def save_strategies(spec: dict[str, Any], canary: str) -> dict[str, str]:
    from prefect_batch_llm.gemini import GeminiCachedStrategy, GeminiCredentials, GeminiStrategy

    key = SecretStr(canary)
    credentials = GeminiCredentials(api_key=key, base_url=spec["base_url"])
    await credentials.asave("secrets-canary", overwrite=True)
    # The cached run's HTTP timeout is shorter than its timeout_per_item: its slow item
    # fails inside the client (httpx ReadTimeout, which carries the request) instead.
    quick = GeminiCredentials(api_key=key, base_url=spec["base_url"], timeout_seconds=1.0)
    await quick.asave("secrets-canary-quick", overwrite=True)
    await GeminiStrategy(credentials=credentials).asave("secrets-plain", overwrite=True)
    cached = GeminiCachedStrategy(
        credentials=quick,
        system_instruction="Answer from the handbook.",
        cached_documents=[spec["document"]],
        cache_ttl_seconds=3600,
        cache_renewal_buffer_seconds=60,
    )
    await cached.asave("secrets-cached", overwrite=True)
    return {
        "plain": "gemini-strategy/secrets-plain",
        "cached": "gemini-cached-strategy/secrets-cached",
    }


async def run_flows(spec: dict[str, Any], strategies: dict[str, str]) -> None:
    from prefect_batch_llm.flows import DEFAULT_FLOW_CONFIG, batch_llm

    assert DEFAULT_FLOW_CONFIG.cache_results, "the deployable flow persists results by default"
    for run in spec["runs"]:
        try:
            # A mapping, as from the CLI or the UI: the fields it names override the flow's
            # defaults (which keep cache_results=True).
            summary = await batch_llm(
                input=run["input"],
                strategy=strategies[run["strategy"]],
                output=run["output"],
                config=run["config"],
            )
        except Exception as exc:  # reported, and searched, like everything else
            emit(f"flow-error:{run['strategy']}", f"{type(exc).__name__}: {exc}")
        else:
            emit(f"return-value:{run['strategy']}", summary)


async def read_back() -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        flow_runs = await client.read_flow_runs()
        emit("flow-runs", dump(flow_runs))
        emit(
            "flow-run-states",
            {str(r.id): dump(await client.read_flow_run_states(r.id)) for r in flow_runs},
        )
        task_runs: list[Any] = []
        while page := await client.read_task_runs(limit=200, offset=len(task_runs)):
            task_runs.extend(page)
        emit("task-runs", dump(task_runs))
        emit(
            "task-run-states",
            {str(r.id): dump(await client.read_task_run_states(r.id)) for r in task_runs},
        )
        logs: list[Any] = []
        while page := await client.read_logs(limit=200, offset=len(logs)):
            logs.extend(page)
        emit("logs", dump(logs))
        artifacts: list[Any] = []
        while page := await client.read_artifacts(limit=200, offset=len(artifacts)):
            artifacts.extend(page)
        emit("artifacts", dump(artifacts))
        try:
            events: list[Any] = []
            response = await client.request("POST", "/events/filter", json={"limit": 50})
            body = response.json()
            events.extend(body.get("events", []))
            while body.get("next_page") and len(events) < 5000:
                body = (await client._client.get(body["next_page"])).json()
                events.extend(body.get("events", []))
            emit("events", events)
        except Exception as exc:
            emit("events-error", f"{type(exc).__name__}: {exc}")


async def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    canary = sys.stdin.readline().strip()
    assert canary, "pass the canary API key on stdin"
    started = time.monotonic()
    strategies = await save_strategies(spec, canary)  # starts the ephemeral server
    saved = time.monotonic()
    await run_flows(spec, strategies)
    ran = time.monotonic()
    await read_back()
    emit(
        "timings",
        {
            "server_start_and_blocks": round(saved - started, 1),
            "flows": round(ran - saved, 1),
            "read_back": round(time.monotonic() - ran, 1),
        },
    )


if __name__ == "__main__":
    asyncio.run(main())
