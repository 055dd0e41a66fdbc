"""Read batch inputs: stream the items of a JSONL or CSV file, one line at a time.

Paths may be local or any fsspec URL (`s3://…`, `gs://…`, `memory://…`). Input is read one
line at a time, never whole, as UTF-8 (a leading byte order mark is allowed); a line that is
not valid UTF-8 becomes an invalid item, the others run.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any

import fsspec

from prefect_batch_llm.errors import ErrorCategory, LLMCallError
from prefect_batch_llm.strategy import ExecuteResult, LLMCallStrategy, RetryState

_ID_FIELDS = ("id", "item_id")
_BOM = b"\xef\xbb\xbf"
_REPLACEMENT = "\ufffd"
_RESAVE = "the file is probably in another encoding (such as Windows-1252): re-save it as UTF-8"
_RESAVE_CSV = f"{_RESAVE} (in Excel: Save As, 'CSV UTF-8 (Comma delimited)')"


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
    """Data lines of an input file (a streaming pass, for progress reporting).

    Lines that are not valid UTF-8 count: they become invalid items.
    """
    with fsspec.open(path, "rt", encoding="latin-1", newline="") as handle:
        lines = sum(1 for text in _Utf8Lines(handle) if text.strip())
    return max(0, lines - 1) if path.split("?", 1)[0].lower().endswith(".csv") else lines


def read_input(path: str) -> Iterator[InputRecord | InvalidInput]:
    """Stream the items of a `.jsonl`/`.ndjson` or `.csv` file, one record per data line.

    JSONL lines are objects with `id` (or `item_id`), `prompt`, and either a `context` value or
    other fields (which become the context). CSV files need a `prompt` column; `id` is
    optional; other columns become the context. A line without an id (or with an empty one)
    gets `line-N`. The file is UTF-8, optionally with a byte order mark (as Excel writes it);
    a line (for CSV, a row) that is not valid UTF-8 is an `InvalidInput`, the others are read.

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
    # Latin-1 maps each byte to one character, so the text layer only splits lines (\n, \r\n
    # or \r, as before) and `_Utf8Lines` decodes each line itself: a bad byte spoils one line.
    with fsspec.open(path, "rt", encoding="latin-1", newline="") as handle:
        lines = _Utf8Lines(handle)
        records = _jsonl(lines) if suffix != ".csv" else _csv(lines)
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


class _Utf8Lines:
    """The physical lines of a Latin-1 text handle, decoded as the UTF-8 they really are.

    A line that is not valid UTF-8 is yielded with U+FFFD in place of its bad bytes, and
    `errors` maps its number to a description of the first bad byte (until a reader takes it).
    A UTF-8 byte order mark at the start of the file is dropped.
    """

    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle
        self.line = 0
        self.errors: dict[int, str] = {}

    def __iter__(self) -> Iterator[str]:
        for text in self.handle:
            self.line += 1
            raw = text.encode("latin-1")
            if self.line == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                before = raw[: exc.start].decode("utf-8")
                near = f", after {before[-20:]!r}" if before.strip() else ""
                self.errors[self.line] = (
                    f"byte 0x{raw[exc.start]:02x} at column {len(before) + 1}{near}"
                )
                yield raw.decode("utf-8", "replace")


def _ident(item_id: Any) -> str | None:
    """The id as given, stripped; None when the line has no id (missing or empty)."""
    return None if item_id is None or item_id == "" else str(item_id).strip()


def _usable_id(line: int, item_id: Any) -> str:
    """An id for the result of a line that cannot run: its own when it has a readable one."""
    ident = _ident(item_id)
    return ident if ident and _REPLACEMENT not in ident else f"line-{line}"


def _check(line: int, item_id: Any, prompt: Any, context: Any) -> InputRecord | InvalidInput:
    ident = _ident(item_id)
    if ident == "":
        return InvalidInput(
            line,
            f"line-{line}",
            f"line {line}: the id is blank ({item_id!r}); give the line a non-blank id, or "
            f"remove the id field to use 'line-{line}'.",
        )
    ident = ident or f"line-{line}"
    if prompt is None:
        problem = "missing"
    elif not isinstance(prompt, str):
        return InvalidInput(
            line,
            ident,
            f"line {line}: the prompt is not text (got {type(prompt).__name__}); give the line "
            "a 'prompt' string (in JSON, in double quotes).",
        )
    elif not prompt.strip():
        problem = f"empty ({prompt!r})"
    else:
        return InputRecord(line, ident, prompt, context)
    return InvalidInput(
        line, ident, f"line {line}: the prompt is {problem}; give the line a non-empty 'prompt'."
    )


def _jsonl(lines: _Utf8Lines) -> Iterator[InputRecord | InvalidInput]:
    for text in lines:
        line = lines.line
        bad_byte = lines.errors.pop(line, None)
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if bad_byte is None:
                yield InvalidInput(
                    line,
                    f"line-{line}",
                    f"line {line}: not valid JSON ({exc.msg} at column {exc.colno}); fix the "
                    "line or remove it.",
                )
                continue
            data = None
        if bad_byte is not None:
            found = data if isinstance(data, dict) else {}
            yield InvalidInput(
                line,
                _usable_id(line, next((found[f] for f in _ID_FIELDS if f in found), None)),
                f"line {line}: not valid UTF-8 ({bad_byte}); {_RESAVE}.",
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


def _csv(lines: _Utf8Lines) -> Iterator[InputRecord | InvalidInput]:
    reader = csv.DictReader(lines)
    columns = reader.fieldnames or []
    header_error = next(iter(lines.errors.values()), None)
    lines.errors.clear()
    missing = "prompt" not in columns
    for row in reader:
        line = reader.line_num  # the row's last line: a quoted field may span several
        item_id = next((row.get(f) for f in _ID_FIELDS if f in columns), None)
        bad = min(lines.errors, default=None)  # only this row's lines were read since
        bad_byte = lines.errors[bad] if bad is not None else None
        lines.errors.clear()
        if header_error is not None:
            yield InvalidInput(
                line,
                _usable_id(line, item_id),
                f"line {line}: the CSV header (line 1) is not valid UTF-8 ({header_error}); "
                f"{_RESAVE_CSV}.",
            )
        elif bad_byte is not None:
            row_end = f" (in the CSV row that ends on line {line})" if bad != line else ""
            yield InvalidInput(
                line,
                _usable_id(line, item_id),
                f"line {bad}: not valid UTF-8 ({bad_byte}){row_end}; {_RESAVE_CSV}.",
            )
        elif missing:
            yield InvalidInput(
                line,
                _usable_id(line, item_id),
                f"line {line}: the CSV has no 'prompt' column (columns: {', '.join(columns)}); "
                "rename the column holding the prompts to 'prompt'.",
            )
        else:
            rest = {k: v for k, v in row.items() if k not in (*_ID_FIELDS, "prompt") and k}
            yield _check(line, item_id, row.get("prompt"), rest or None)


class RejectedInput(LLMCallStrategy[None]):
    """Stands in for the strategy of an invalid input line: fails it, without any call.

    Invalid lines run through the processor like any item, so they are counted, reported in
    the artifacts and written to the results as failures of category `invalid_input`.
    """

    #: Not a strategy of its own: Batch Mode is decided by the first real item.
    stands_in = True

    def __init__(self, error: str) -> None:
        self.error = error

    async def execute(
        self, prompt: Any, attempt: int, timeout: float, state: RetryState | None = None
    ) -> ExecuteResult:
        raise LLMCallError(self.error, category=ErrorCategory.INVALID_INPUT)

    def cache_fingerprint(self) -> str:
        return f"rejected:{self.error}"


#: Characters that some line splitters (`str.splitlines`, older JavaScript) treat as line
#: breaks: escaped in results lines so that one result is always one line.
