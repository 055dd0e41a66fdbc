"""Test helpers for users' own tests: a mock strategy and a local Gemini API emulator."""

from prefect_batch_llm.testing.emulator import (
    BatchFault,
    EmulatorClock,
    Fault,
    GeminiEmulator,
    count_tokens,
)
from prefect_batch_llm.testing.mock import MockFailure, MockStrategy

__all__ = [
    "BatchFault",
    "EmulatorClock",
    "Fault",
    "GeminiEmulator",
    "MockFailure",
    "MockStrategy",
    "count_tokens",
]
