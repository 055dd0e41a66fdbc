# Set-up on a fresh machine needs only python3 and make:
#   make demo   - run the demo batch end to end (ephemeral Prefect server, Gemini emulator)
#   make test   - run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: install demo test lint docs check benchmark benchmark-scale benchmark-dask clean postgres-server e2e-postgres

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Prefect 3.8.8's ephemeral server logs a cancelled event flush ("Error flushing 1 events")
# when it is stopped at exit; that is shutdown noise, not a failure of the batch.
demo: $(STAMP)
	PREFECT_SERVER_LOGGING_LEVEL=$${PREFECT_SERVER_LOGGING_LEVEL:-CRITICAL} $(BIN)/python flows/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

check: lint docs test

benchmark: $(STAMP)
	PREFECT_LOGGING_LEVEL=WARNING $(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/gemini_cache_billing.py

# Scale-out benchmarks (PostgreSQL from Debian, ~40 min): server ingest, shards on workers.
benchmark-scale: $(STAMP)
	$(BIN)/python benchmarks/server_ingest.py
	$(BIN)/python benchmarks/scale_out.py

# prefect-dask's DaskTaskRunner against the processor (~6 min); prefect-dask is not a
# dependency of the project, so it gets its own venv.
benchmark-dask:
	$(PYTHON) -m venv .venv-dask
	.venv-dask/bin/python -m pip install --quiet -e . prefect-dask==0.3.7
	.venv-dask/bin/python benchmarks/dask_runner.py --items 300

# A Postgres-backed Prefect server (PostgreSQL from Debian: apt-get install -y postgresql);
# Ctrl-C stops it. Options: make postgres-server POSTGRES_SERVER_ARGS="--port 5433 --detach"
postgres-server: $(STAMP)
	$(BIN)/python -m prefect_batch_llm.testing.postgres_server start $(POSTGRES_SERVER_ARGS)

# The deployment end-to-end test against that server (not in CI: it adds a Postgres start).
e2e-postgres: $(STAMP)
	BATCH_LLM_E2E_DATABASE=postgres $(BIN)/python -m pytest tests/test_deployment_e2e.py

clean:
	rm -rf $(VENV) .venv-dask site .mypy_cache .ruff_cache .pytest_cache
