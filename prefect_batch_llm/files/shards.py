"""Shard files of one input, and one results file from the shards' results.

`split_input()` reads the input once and deals its valid items round-robin into N JSONL
shard files, each item written with its explicit id, prompt and context (so an item keeps its
id whatever shard it lands in); invalid lines do not go to a shard: they are returned as
results (they fail without a call). `ShardResults` later reads each shard's results file
(or, for a shard run that died, its `.partial` progress), gives every expected item that has
no line a failed result that says which shard run to resume, and yields one result per item.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from prefect_batch_llm.errors import ErrorCategory
from prefect_batch_llm.files.input import InvalidInput, read_input
from prefect_batch_llm.results import TokenUsage, WorkItemResult


@dataclass
class Shard:
    """One shard: its input file, where its results go, and the ids it holds."""

    number: int
    input: str
    output: str
    ids: list[str] = field(default_factory=list)


def split_input(
    path: str, directory: str, shards: int
) -> tuple[list[Shard], list[WorkItemResult[Any, Any]]]:
    """Deal the items of `path` into `shards` JSONL files under `directory` (overwritten: the
    same input always gives the same shards, so a re-run resumes them)."""
    if shards < 1:
        raise ValueError(f"shards={shards}: use 1 or more.")
    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    prefix = directory.rstrip("/")
    parts = [
        Shard(k, f"{prefix}/shard-{k:03d}.jsonl", f"{prefix}/shard-{k:03d}.results.jsonl")
        for k in range(shards)
    ]
    invalid: list[WorkItemResult[Any, Any]] = []
    handles = [fsspec.open(part.input, "w", encoding="utf-8").open() for part in parts]
    try:
        dealt = 0
        for record in read_input(path):
            if isinstance(record, InvalidInput):
                invalid.append(
                    WorkItemResult(
                        item_id=record.item_id,
                        success=False,
                        error=record.error,
                        error_category=ErrorCategory.INVALID_INPUT,
                    )
                )
                continue
            part = parts[dealt % shards]
            line = {"id": record.item_id, "prompt": record.prompt}
            if isinstance(record.context, dict):
                line.update({k: v for k, v in record.context.items() if k not in line})
            handles[dealt % shards].write(json.dumps(line, ensure_ascii=False) + "\n")
            part.ids.append(record.item_id)
            dealt += 1
    finally:
        for handle in handles:
            handle.close()
    return [part for part in parts if part.ids], invalid


def _result_of(line: dict[str, Any]) -> WorkItemResult[Any, Any]:
    tokens = line.get("tokens") or {}
    return WorkItemResult(
        item_id=str(line["id"]),
        success=bool(line.get("success")),
        output=line.get("output"),
        error=line.get("error"),
        error_category=line.get("category"),
        token_usage=TokenUsage(**{k: int(v) for k, v in tokens.items()}),  # type: ignore[typeddict-item]
        attempts=int(line.get("attempts") or 0),
        context=line.get("context"),
        metadata={"cached_result": True} if line.get("cached") else {},
    )


def _lines(path: str) -> Iterator[dict[str, Any]]:
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.exists(local):
        return
    with fs.open(local, "r", encoding="utf-8") as handle:
        for text in handle:
            try:
                yield json.loads(text)
            except json.JSONDecodeError:  # a torn last line of a killed shard run
                continue


def shard_results(shard: Shard, outcome: str) -> Iterator[WorkItemResult[Any, Any]]:
    """One result per id of `shard`: its results file's lines (or its `.partial` progress
    if the shard run did not finish), and a failed result for each id without one."""
    expected = set(shard.ids)
    source = shard.output
    fs, local = fsspec.core.url_to_fs(source)
    if not fs.exists(local):
        source = f"{shard.output}.partial"
    for line in _lines(source):
        item_id = str(line.get("id"))
        if item_id in expected:
            expected.discard(item_id)
            yield _result_of(line)
    for item_id in shard.ids:
        if item_id in expected:
            yield WorkItemResult(
                item_id=item_id,
                success=False,
                error=f"shard {shard.number} ({outcome}) ended without this item's result; "
                "run the sharded flow again to resume it (completed items are not billed "
                "again)",
                error_category=ErrorCategory.ABORTED,
            )
