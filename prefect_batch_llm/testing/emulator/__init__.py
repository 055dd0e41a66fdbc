"""A local Gemini API emulator: `GeminiEmulator`, its `Fault`s and its token rule."""

from prefect_batch_llm.testing.emulator._jobs import BatchFault
from prefect_batch_llm.testing.emulator._state import EmulatorClock, Fault, count_tokens
from prefect_batch_llm.testing.emulator.server import GeminiEmulator

__all__ = ["BatchFault", "EmulatorClock", "Fault", "GeminiEmulator", "count_tokens"]
