"""Batch inputs and outputs as files: stream JSONL/CSV items in, write JSONL results out.

Paths may be local or any fsspec URL (`s3://…`, `gs://…`, `memory://…`). Input is read one
line at a time, never whole; results are appended and flushed one per item.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any

import fsspec
from pydantic import BaseModel

from prefect_batch_llm.errors import ErrorCategory, LLMCallError
from prefect_batch_llm.results import WorkItemResult
from prefect_batch_llm.strategy import ExecuteResult, LLMCallStrategy, RetryState

_ID_FIELDS = ("id", "item_id")


@dataclass(frozen=True)
class InputRecord:
    """A valid input line."""

    line: int
    item_id: str
    prompt: str
    context: Any


@dataclass(frozen=True)
class InvalidInput:
    """An input line that cannot run, with what is wrong and how to fix it."""

    line: int
    item_id: str
    error: str


def input_exists(path: str) -> bool:
    fs, resolved = fsspec.core.url_to_fs(path)
    return bool(fs.exists(resolved))


def count_items(path: str) -> int:
    """Data lines of an input file (a streaming pass, for progress reporting)."""
    with fsspec.open(path, "rt", encoding="utf-8", newline="") as handle:
        lines = sum(1 for raw in handle if raw.strip())
    return max(0, lines - 1) if path.split("?", 1)[0].lower().endswith(".csv") else lines


def read_input(path: str) -> Iterator[InputRecord | InvalidInput]:
    """Stream the items of a `.jsonl`/`.ndjson` or `.csv` file, one record per data line.

    JSONL lines are objects with `id` (or `item_id`), `prompt`, and either a `context` value or
    other fields (which become the context). CSV files need a `prompt` column; `id` is
    optional; other columns become the context. A line without an id gets `line-N`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the extension is neither JSONL nor CSV.
    """
    suffix = PurePosixPath(path.split("?", 1)[0]).suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv"):
        raise ValueError(
            f"Input {path!r} has extension {suffix or '(none)'!r}: use a .jsonl file (one JSON "
            "object per line) or a .csv file with a 'prompt' column."
        )
    if not input_exists(path):
        raise FileNotFoundError(
            f"Input file {path!r} not found. Pass input= a path or fsspec URL of a .jsonl or "
            ".csv file that the flow's process can read."
        )
    seen: dict[str, int] = {}
    with fsspec.open(path, "rt", encoding="utf-8", newline="") as handle:
        records = _jsonl(handle) if suffix != ".csv" else _csv(handle)
        for record in records:
            if isinstance(record, InputRecord):
                first = seen.get(record.item_id)
                if first is not None:
                    yield InvalidInput(
                        record.line,
                        f"{record.item_id}@line-{record.line}",
                        f"line {record.line}: duplicate id {record.item_id!r} (first used on "
                        f"line {first}); ids must be unique, give this line another id.",
                    )
                    continue
                seen[record.item_id] = record.line
            yield record


def _check(line: int, item_id: Any, prompt: Any, context: Any) -> InputRecord | InvalidInput:
    ident = str(item_id).strip() if item_id not in (None, "") else f"line-{line}"
    if not isinstance(prompt, str) or not prompt.strip():
        got = "missing" if prompt is None else f"empty ({prompt!r})"
        return InvalidInput(
            line, ident, f"line {line}: the prompt is {got}; give the line a non-empty 'prompt'."
        )
    return InputRecord(line, ident, prompt, context)


def _jsonl(handle: IO[str]) -> Iterator[InputRecord | InvalidInput]:
    for line, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            yield InvalidInput(
                line,
                f"line-{line}",
                f"line {line}: not valid JSON ({exc.msg} at column {exc.colno}); fix the line "
                "or remove it.",
            )
            continue
        if not isinstance(data, dict):
            yield InvalidInput(
                line,
                f"line-{line}",
                f'line {line}: expected a JSON object like {{"id": "a", "prompt": "..."}}, got '
                f"{type(data).__name__}.",
            )
            continue
        item_id = next((data[f] for f in _ID_FIELDS if f in data), None)
        rest = {k: v for k, v in data.items() if k not in (*_ID_FIELDS, "prompt")}
        context = rest.pop("context") if "context" in rest and len(rest) == 1 else rest or None
        yield _check(line, item_id, data.get("prompt"), context)


def _csv(handle: IO[str]) -> Iterator[InputRecord | InvalidInput]:
    reader = csv.DictReader(handle)
    columns = reader.fieldnames or []
    missing = "prompt" not in columns
    for row in reader:
        line = reader.line_num
        item_id = next((row.get(f) for f in _ID_FIELDS if f in columns), None)
        if missing:
            yield InvalidInput(
                line,
                str(item_id or f"line-{line}"),
                f"line {line}: the CSV has no 'prompt' column (columns: {', '.join(columns)}); "
                "rename the column holding the prompts to 'prompt'.",
            )
            continue
        rest = {k: v for k, v in row.items() if k not in (*_ID_FIELDS, "prompt") and k}
        yield _check(line, item_id, row.get("prompt"), rest or None)


class RejectedInput(LLMCallStrategy[None]):
    """Stands in for the strategy of an invalid input line: fails it, without any call.

    Invalid lines run through the processor like any item, so they are counted, reported in
    the artifacts and written to the results as failures of category `invalid_input`.
    """

    def __init__(self, error: str) -> None:
        self.error = error

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> ExecuteResult:
        raise LLMCallError(self.error, category=ErrorCategory.INVALID_INPUT)

    def cache_fingerprint(self) -> str:
        return f"rejected:{self.error}"


def result_line(result: WorkItemResult[Any, Any]) -> str:
    """One results-file line: id, success, output, error, category, tokens, attempts."""
    output = result.output
    if isinstance(output, BaseModel):
        output = output.model_dump(mode="json")
    record = {
        "id": result.item_id,
        "success": result.success,
        "output": output,
        "error": result.error,
        "category": result.error_category,
        "tokens": dict(result.token_usage),
        "attempts": result.attempts,
    }
    if result.metadata.get("cached_result"):
        record["cached"] = True
    return json.dumps(record, default=str)


class ResultsWriter:
    """Writes one JSONL line per result as soon as it is final (flushed per line)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: Any = fsspec.open(path, "wt", encoding="utf-8", auto_mkdir=True)
        self._handle: IO[str] | None = None
        self.lines = 0

    def __enter__(self) -> ResultsWriter:
        self._handle = self._file.open()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def write(self, result: WorkItemResult[Any, Any]) -> None:
        assert self._handle is not None, "use ResultsWriter as a context manager"
        self._handle.write(result_line(result) + "\n")
        self._handle.flush()
        self.lines += 1
