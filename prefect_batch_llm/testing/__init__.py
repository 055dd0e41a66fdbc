"""Test helpers for users' own tests: a configurable mock strategy."""

from prefect_batch_llm.testing.mock import MockFailure, MockStrategy

__all__ = ["MockFailure", "MockStrategy"]
