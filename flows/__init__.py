"""Deployable flows of prefect-batch-llm (entrypoints referenced by prefect.yaml)."""
