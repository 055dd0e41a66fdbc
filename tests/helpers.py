"""Strategies that record what the processor does to them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from prefect_batch_llm import LLMCallStrategy, RetryState


class CountingStrategy(LLMCallStrategy[str]):
    """Counts lifecycle calls; `prepare()` is slow so concurrent workers would race it."""

    def __init__(self, name: str = "s", *, prepare_delay: float = 0.05, latency: float = 0.0):
        self.name = name
        self.prepare_delay = prepare_delay
        self.latency = latency
        self.prepare_count = 0
        self.execute_count = 0
        self.cleanup_count = 0
        self.cleanup_called = False

    async def prepare(self) -> None:
        self.prepare_count += 1
        await asyncio.sleep(self.prepare_delay)

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ):
        self.execute_count += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        return f"{self.name}: {prompt}", {"input_tokens": 10, "output_tokens": 5}

    async def cleanup(self) -> None:
        self.cleanup_count += 1
        self.cleanup_called = True


class ScriptedStrategy(LLMCallStrategy[str]):
    """Raises the scripted exceptions per prompt in order, then succeeds; logs call times."""

    def __init__(self, script: dict[str, list[BaseException]] | None = None, latency: float = 0.0):
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.latency = latency
        self.calls: list[tuple[str, float, int]] = []  # (prompt, monotonic start, attempt)
        self.errors_seen: list[tuple[str, str, int]] = []

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ):
        self.calls.append((prompt, time.monotonic(), attempt))
        if self.latency:
            await asyncio.sleep(self.latency)
        pending = self.script.get(prompt)
        if pending:
            raise pending.pop(0)
        return f"ok: {prompt}", {"input_tokens": 100, "output_tokens": 20}

    async def on_error(
        self, exception: BaseException, attempt: int, state: RetryState | None = None
    ):
        self.errors_seen.append((type(exception).__name__, str(exception), attempt))

    def calls_for(self, prompt: str) -> list[tuple[str, float, int]]:
        return [c for c in self.calls if c[0] == prompt]


class City(BaseModel):
    """An output type importable as 'helpers:City' (tests/ is on sys.path under pytest)."""

    name: str
    population: int


def mounted_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` at `mount_point` for the duration of a fixture, so writes fail
    with a real ENOSPC; skips the test where mounting is not allowed (needs root)."""
    import pytest

    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs for a real ENOSPC needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
