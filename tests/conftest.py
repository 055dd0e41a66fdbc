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

from prefect_batch_llm.testing.postgres_server import INGEST_SETTINGS


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One fresh SQLite-backed Prefect server for the whole session (15-25 s to start).

    It records task runs in batches, as the guide says to run a server for batches: with
    Prefect's default (one row per transaction) it spent ~25 s of CPU after each 500-item test
    recording it, slowing the next tests on a 2-core machine. Only this server gets those
    settings; the servers tests start themselves see the environment as it was."""
    added = {key: value for key, value in INGEST_SETTINGS.items() if key not in os.environ}
    os.environ.update(added)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            for key in added:
                del os.environ[key]
            added.clear()
            yield
    finally:
        for key in added:
            os.environ.pop(key, None)
