"""Test session setup: an isolated PREFECT_HOME and one Prefect test server for the session."""

import os
import tempfile

# Before Prefect is imported: its settings are read once.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-batch-llm-tests-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ.pop("PREFECT_API_URL", None)

import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One fresh SQLite-backed Prefect server for the whole session (15-25 s to start)."""
    with prefect_test_harness(server_startup_timeout=120):
        yield
