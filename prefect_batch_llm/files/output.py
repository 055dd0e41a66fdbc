"""Write batch results: one JSONL line per item, never destroying an earlier results file.

Results are written, one flushed line per item, to `<output>.partial`, which replaces the
output only when the batch completes: a run that fails or is killed never touches an earlier
results file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
from pathlib import PurePosixPath
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel

from prefect_batch_llm.results import WorkItemResult

# Characters JSON leaves alone but line readers split on: escaped, one result per line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def result_line(result: WorkItemResult[Any, Any]) -> str:
    """One results-file line (no newline), unicode as UTF-8 text, not `\\u` escapes.

    Keys: id, success, output, error, category, tokens, attempts, context (the item's
    context: the other JSONL fields or CSV columns, or null), and `cached: true` for an item
    an earlier run completed.
    """
    record = {
        "id": result.item_id,
        "success": result.success,
        "output": _plain(result.output),
        "error": result.error,
        "category": result.error_category,
        "tokens": dict(result.token_usage),
        "attempts": result.attempts,
        "context": _plain(result.context),
    }
    if result.metadata.get("cached_result"):
        record["cached"] = True
    line = json.dumps(record, default=str, ensure_ascii=False).translate(_LINE_BREAKS)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (e.g. from a lossy decode): keep it escaped
        line = json.dumps(record, default=str)
    return line


# -- where results go -------------------------------------------------------------------------


def _location(path: str) -> tuple[str, str]:
    """What identifies a file: its filesystem's protocol and its normalized path."""
    fs, resolved = fsspec.core.url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        return "file", os.path.normcase(os.path.realpath(resolved))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return str(protocol), posixpath.normpath(resolved)


def check_output_path(input: str, output: str) -> None:
    """Refuse an output that is the input file itself, however either is spelled.

    Local paths are compared after resolving `.`/`..`, symlinks and `file://` URLs (and by
    inode when both exist); other fsspec URLs by protocol and normalized path.

    Raises:
        ValueError: `output` is the same file as `input`.
    """
    same = _location(input) == _location(output)
    if not same:
        try:
            same = os.path.samefile(_local(input), _local(output))
        except (OSError, ValueError):
            same = False
    if same:
        suggestion = f"{PurePosixPath(input.split('?', 1)[0]).stem}.results.jsonl"
        raise ValueError(
            f"output={output!r} is the input file {input!r}: writing results there would "
            f"replace your items. Pass another output=, e.g. {suggestion!r}, or leave it "
            "unset for the default under results/."
        )


def _local(path: str) -> str:
    fs, resolved = fsspec.core.url_to_fs(path)
    if not isinstance(fs, LocalFileSystem):
        raise ValueError(f"{path!r} is not a local path")
    return str(resolved)


class ResultsWriteError(OSError):
    """The results file could not be written (disk full, no permission, ...).

    `errno` is the cause's. The message names the destination, how many results were written
    and the fix. Attributes: `destination`, `partial` (where the complete lines written so far
    are) and `written` (how many).
    """

    destination: str
    partial: str
    written: int


def _fix_for(code: int | None) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "Free disk space (or pass an output= on a disk with room)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "Make the output directory writable (or pass a writable output=)"
    return "Fix the cause above (or pass another output=)"


class ResultsWriter:
    """Writes one JSONL line per result, flushed as soon as it is final, never destroying data.

    Lines go to `<path>.partial` beside the destination (same directory, same filesystem): it
    is the live progress of the batch. The destination is replaced only by `commit()`, after
    every item has its result: atomically with `os.replace` for local paths, with `fs.mv` for
    other fsspec filesystems.

    Contract, as a context manager:

    - `commit()` replaces the destination with the partial file (once; a second call does
      nothing). Leaving the `with` block without an exception also commits: finishing the
      block means the batch completed.
    - Leaving it with an exception (the batch failed or was cancelled) closes the partial
      file and changes nothing else: a previous results file at the destination stays
      exactly as it was, and the partial file is left for inspection. A killed process
      leaves the same state.
    - A write error raises `ResultsWriteError` (an `OSError`); the partial file is cut back
      to its last complete line where the filesystem allows (local files), and nothing,
      certainly no torn line, reaches the destination. Later `write()`/`commit()` calls raise
      the same error.

    Attributes:
        path: The destination, as given.
        partial_path: Where the lines are written until `commit()`.
        lines: How many results were written.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.partial_path = f"{path}.partial"
        self._fs, self._destination = fsspec.core.url_to_fs(path)
        self._local = isinstance(self._fs, LocalFileSystem)
        self._partial = f"{self._destination}.partial"
        self._handle: Any = None
        self._good_bytes = 0
        self._failed: ResultsWriteError | None = None
        self._committed = False
        self.lines = 0

    def __enter__(self) -> ResultsWriter:
        try:
            self._fs.makedirs(self._fs._parent(self._partial), exist_ok=True)
            if self._local:
                # Unbuffered: each line is one write, and a failed one can be cut back.
                self._handle = open(self._partial, "wb", buffering=0)
            else:
                self._handle = self._fs.open(self._partial, "wb")
        except OSError as exc:
            raise self._error(exc, f"creating {self.partial_path!r}") from exc
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.commit()
        elif self._handle is not None:
            handle, self._handle = self._handle, None
            with contextlib.suppress(Exception):  # the exception in flight is what matters
                handle.close()

    def write(self, result: WorkItemResult[Any, Any]) -> None:
        """Append one result line to the partial file and flush it."""
        handle = self._open_handle()
        data = (result_line(result) + "\n").encode("utf-8")
        try:
            if self._local:
                view = memoryview(data)
                while view:
                    view = view[handle.write(view) :]
            else:
                handle.write(data)
                handle.flush()
        except OSError as exc:
            self._abandon()
            raise self._error(exc, f"writing to {self.partial_path!r}") from exc
        self._good_bytes += len(data)
        self.lines += 1

    def commit(self) -> None:
        """Replace the destination with the results written: call it when the batch is done.

        Raises:
            ResultsWriteError: the partial file could not be completed or moved into place
                (the destination is then unchanged).
        """
        if self._committed:
            return
        handle = self._open_handle()
        self._handle = None
        try:
            if self._local:
                os.fsync(handle.fileno())
            handle.close()
        except OSError as exc:
            self._handle = handle
            self._abandon()
            raise self._error(exc, f"finishing {self.partial_path!r}") from exc
        try:
            if self._local:
                os.replace(self._partial, self._destination)
            else:
                self._fs.mv(self._partial, self._destination)
        except OSError as exc:
            raise self._error(exc, f"moving {self.partial_path!r} over it") from exc
        self._committed = True

    def _open_handle(self) -> Any:
        if self._failed is not None:
            raise self._failed
        if self._handle is None:
            raise RuntimeError(
                f"ResultsWriter({self.path!r}) is not open: use it as `with ResultsWriter(path) "
                "as writer:` and write or commit inside the block, before it commits."
            )
        return self._handle

    def _abandon(self) -> None:
        """After a failed write: drop a torn last line (local files), close, stay failed."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        with contextlib.suppress(Exception):  # best effort: the write error is what matters
            if self._local:
                os.ftruncate(handle.fileno(), self._good_bytes)
        with contextlib.suppress(Exception):
            handle.close()

    def _error(self, cause: OSError, doing: str) -> ResultsWriteError:
        reason = cause.strerror or str(cause) or type(cause).__name__
        message = (
            f"Could not write the results file {self.path!r}: {reason} while {doing}, after "
            f"{self.lines} results were written. {self.path!r} was not changed: a previous "
            f"results file there is kept as it was; the {self.lines} results written so far "
            f"are in {self.partial_path!r}. {_fix_for(cause.errno)}, then re-run the flow: "
            "with result caching (the flow's default) completed items are not called again."
        )
        error = (
            ResultsWriteError(cause.errno, message) if cause.errno else ResultsWriteError(message)
        )
        error.destination, error.partial, error.written = self.path, self.partial_path, self.lines
        self._failed = error
        return error
