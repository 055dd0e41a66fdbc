"""Input and results files: encodings, ids, prompts, context in results, output safety."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import textwrap
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
from helpers import mounted_tmpfs

from prefect_batch_llm import files
from prefect_batch_llm.files import InputRecord, InvalidInput, count_items, read_input
from prefect_batch_llm.results import WorkItemResult


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """These tests never talk to Prefect: no test server (overrides the conftest fixture)."""
    yield


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def jsonl(*objects: Any) -> bytes:
    return b"".join(json.dumps(o, ensure_ascii=False).encode() + b"\n" for o in objects)


def result(item_id: str, output: Any = "ok", context: Any = None) -> WorkItemResult[Any, Any]:
    return WorkItemResult(item_id=item_id, success=True, output=output, context=context)


# -- 1. encodings ----------------------------------------------------------------------------


def test_utf8_bom_at_start_of_jsonl_is_accepted(tmp_path):
    path = write(
        tmp_path / "bom.jsonl",
        b"\xef\xbb\xbf" + jsonl({"id": "a", "prompt": "caf\u00e9?"}, {"id": "b", "prompt": "p"}),
    )
    records = list(read_input(path))
    assert records == [InputRecord(1, "a", "caf\u00e9?", None), InputRecord(2, "b", "p", None)]
    assert count_items(path) == 2


def test_utf8_bom_at_start_of_csv_is_accepted(tmp_path):
    path = write(
        tmp_path / "excel.csv",
        "\ufeffid,prompt,lang\r\na,caf\u00e9?,fr\r\nb,hello,en\r\n".encode(),
    )
    records = list(read_input(path))
    assert records == [
        InputRecord(2, "a", "caf\u00e9?", {"lang": "fr"}),
        InputRecord(3, "b", "hello", {"lang": "en"}),
    ]
    assert count_items(path) == 2


def test_invalid_utf8_byte_in_jsonl_invalidates_only_that_line(tmp_path):
    bad = b'{"id": "b", "prompt": "caf\xe9 au lait"}\n'  # Latin-1 e-acute
    path = write(
        tmp_path / "mixed.jsonl",
        jsonl({"id": "a", "prompt": "one"}) + bad + jsonl({"id": "c", "prompt": "tr\u00e8s"}),
    )
    records = list(read_input(path))
    assert records[0] == InputRecord(1, "a", "one", None)
    assert records[2] == InputRecord(3, "c", "tr\u00e8s", None)
    invalid = records[1]
    assert isinstance(invalid, InvalidInput)
    assert invalid.line == 2
    assert invalid.item_id == "b"  # the id is still readable: the result can be matched
    assert invalid.error.startswith("line 2: not valid UTF-8 (byte 0xe9 at column 27")
    assert "re-save it as UTF-8" in invalid.error
    assert count_items(path) == 3


def test_invalid_utf8_byte_in_multiline_csv_row_invalidates_that_row(tmp_path):
    data = (
        b"id,prompt\n"
        b'a,"first\nquestion"\n'  # lines 2-3, valid
        b'b,"second \xe9t\xe9\nquestion"\n'  # lines 4-5, bad byte on line 4
        b"c,third\n"  # line 6
        b'd,"caf\xc3\xa9\nok"\n'  # lines 7-8, valid UTF-8 across the newline
    )
    path = write(tmp_path / "multi.csv", data)
    records = list(read_input(path))
    assert [type(r).__name__ for r in records] == [
        "InputRecord",
        "InvalidInput",
        "InputRecord",
        "InputRecord",
    ]
    assert records[0] == InputRecord(3, "a", "first\nquestion", None)
    assert records[2] == InputRecord(6, "c", "third", None)
    assert records[3] == InputRecord(8, "d", "caf\u00e9\nok", None)
    invalid = records[1]
    assert isinstance(invalid, InvalidInput)
    assert invalid.item_id == "b"
    assert invalid.line == 5
    assert invalid.error.startswith(
        "line 4: not valid UTF-8 (byte 0xe9 at column 11, after 'b,\"second ')"
        " (in the CSV row that ends on line 5);"
    )
    assert "CSV UTF-8" in invalid.error  # how to fix it in Excel
    count_items(path)  # no UnicodeDecodeError


def test_invalid_utf8_in_csv_header_invalidates_every_row(tmp_path):
    path = write(tmp_path / "header.csv", b"id,prompt,caf\xe9\na,p,1\n")
    [invalid] = list(read_input(path))
    assert isinstance(invalid, InvalidInput)
    assert invalid.error.startswith("line 2: the CSV header (line 1) is not valid UTF-8")


def test_old_mac_cr_line_endings_still_split_lines(tmp_path):
    path = write(tmp_path / "mac.csv", b"id,prompt\ra,one\rb,two\r")
    assert [r.item_id for r in read_input(path)] == ["a", "b"]
    assert count_items(path) == 2


def test_input_is_streamed_not_read_whole(tmp_path):
    prompt = "x" * 1_000_000
    path = write(
        tmp_path / "big.jsonl", jsonl(*({"id": str(i), "prompt": prompt} for i in range(30)))
    )
    tracemalloc.start()
    try:
        for record in read_input(path):
            assert isinstance(record, InputRecord)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12_000_000, f"peak {peak} bytes for a 30 MB file"


# -- 2. ids ----------------------------------------------------------------------------------


def test_whitespace_only_id_is_invalid_in_jsonl(tmp_path):
    path = write(
        tmp_path / "ids.jsonl",
        jsonl({"id": "   ", "prompt": "x"}, {"prompt": "no id"}, {"id": "", "prompt": "empty"}),
    )
    blank, missing, empty = read_input(path)
    assert isinstance(blank, InvalidInput)
    assert blank.item_id == "line-1"
    assert blank.error == (
        "line 1: the id is blank ('   '); give the line a non-blank id, or remove the id "
        "field to use 'line-1'."
    )
    assert missing == InputRecord(2, "line-2", "no id", None)
    assert empty == InputRecord(3, "line-3", "empty", None)


def test_whitespace_only_id_is_invalid_in_csv(tmp_path):
    path = write(tmp_path / "ids.csv", b"id,prompt\n  ,x\n,no id\n")
    blank, missing = read_input(path)
    assert isinstance(blank, InvalidInput)
    assert blank.item_id == "line-2"
    assert blank.error.startswith("line 2: the id is blank ('  ')")
    assert missing == InputRecord(3, "line-3", "no id", None)


def test_whitespace_only_id_without_prompt_column_still_gets_a_usable_id(tmp_path):
    path = write(tmp_path / "noprompt.csv", b"id,question\n  ,x\n")
    [invalid] = read_input(path)
    assert isinstance(invalid, InvalidInput)
    assert invalid.item_id == "line-2"


# -- 3. prompts ------------------------------------------------------------------------------


def test_non_text_prompt_is_reported_as_not_text(tmp_path):
    path = write(
        tmp_path / "prompts.jsonl",
        jsonl(
            {"id": "n", "prompt": 42},
            {"id": "l", "prompt": ["a"]},
            {"id": "t", "prompt": True},
            {"id": "e", "prompt": "  "},
            {"id": "m"},
        ),
    )
    errors = [r.error for r in read_input(path) if isinstance(r, InvalidInput)]
    assert errors[0].startswith("line 1: the prompt is not text (got int);")
    assert errors[1].startswith("line 2: the prompt is not text (got list);")
    assert errors[2].startswith("line 3: the prompt is not text (got bool);")
    assert errors[3] == "line 4: the prompt is empty ('  '); give the line a non-empty 'prompt'."
    assert errors[4] == "line 5: the prompt is missing; give the line a non-empty 'prompt'."


# -- 4. result lines -------------------------------------------------------------------------


def test_result_line_keeps_context_and_writes_utf8():
    line = files.result_line(
        WorkItemResult(
            item_id="q-\u00e9",
            success=True,
            output="Stra\u00dfe \u2014 \u65e5\u672c",
            context={"team": "\u00e9quipe", "n": 1},
            token_usage={"input_tokens": 3},
            attempts=1,
        )
    )
    assert "\\u" not in line
    assert "Stra\u00dfe \u2014 \u65e5\u672c" in line
    record = json.loads(line)
    assert record == {
        "id": "q-\u00e9",
        "success": True,
        "output": "Stra\u00dfe \u2014 \u65e5\u672c",
        "error": None,
        "category": None,
        "tokens": {"input_tokens": 3},
        "attempts": 1,
        "context": {"team": "\u00e9quipe", "n": 1},
    }


def test_result_line_stays_one_valid_utf8_line():
    line = files.result_line(result("a", output="x\u2028y\u2029z\x85 lone \ud800"))
    line.encode("utf-8")  # a lone surrogate is escaped, never written raw
    assert len(line.splitlines()) == 1  # U+2028/2029/0085 are escaped too
    assert json.loads(line)["output"] == "x\u2028y\u2029z\x85 lone \ud800"


# -- 5. output path --------------------------------------------------------------------------


def test_check_output_path_rejects_the_input_under_any_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    source = tmp_path / "a" / "x.jsonl"
    source.write_text('{"id": "a", "prompt": "p"}\n')
    (tmp_path / "link.jsonl").symlink_to(source)
    same = [
        str(source),
        "a/x.jsonl",
        "./a/../a/x.jsonl",
        f"file://{source}",
        str(tmp_path / "link.jsonl"),
    ]
    for output in same:
        with pytest.raises(ValueError, match="is the input file") as caught:
            files.check_output_path("a/x.jsonl", output)
        assert "output=" in str(caught.value)
    files.check_output_path("a/x.jsonl", "a/x.results.jsonl")
    files.check_output_path(str(source), str(tmp_path / "new" / "x.jsonl"))


def test_check_output_path_compares_fsspec_urls():
    with pytest.raises(ValueError, match="is the input file"):
        files.check_output_path("memory://d/in.jsonl", "memory://d/sub/../in.jsonl")
    files.check_output_path("memory://d/in.jsonl", "memory://d/out.jsonl")
    files.check_output_path("memory://d/in.jsonl", "/d/in.jsonl")  # another filesystem


# -- 6. results writer -----------------------------------------------------------------------


def test_failed_run_keeps_previous_results_and_leaves_partial(tmp_path):
    destination = tmp_path / "results.jsonl"
    destination.write_text('{"id": "old"}\n')
    with pytest.raises(RuntimeError, match="boom"), files.ResultsWriter(str(destination)) as w:
        w.write(result("a"))
        w.write(result("b"))
        raise RuntimeError("boom")
    assert destination.read_text() == '{"id": "old"}\n'
    partial = tmp_path / "results.jsonl.partial"
    assert [json.loads(x)["id"] for x in partial.read_text().splitlines()] == ["a", "b"]
    assert w.lines == 2


def test_commit_replaces_destination_atomically(tmp_path):
    destination = tmp_path / "out" / "results.jsonl"
    destination.parent.mkdir()
    destination.write_text('{"id": "old"}\n')
    with files.ResultsWriter(str(destination)) as writer:
        writer.write(result("a"))
        partial = tmp_path / "out" / "results.jsonl.partial"
        assert partial.read_text().count("\n") == 1  # flushed per line: live progress
        assert destination.read_text() == '{"id": "old"}\n'
        writer.commit()
        assert [json.loads(x)["id"] for x in destination.read_text().splitlines()] == ["a"]
    assert not partial.exists()
    assert writer.lines == 1


def test_clean_exit_commits_and_creates_directories(tmp_path):
    destination = tmp_path / "new" / "dir" / "results.jsonl"
    with files.ResultsWriter(str(destination)) as writer:
        writer.write(result("a"))
    assert json.loads(destination.read_text())["id"] == "a"
    assert not (destination.parent / "results.jsonl.partial").exists()


def test_writer_on_other_fsspec_filesystems():
    base = f"memory://writer-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{base}/results.jsonl", b"old\n")
    with pytest.raises(KeyError), files.ResultsWriter(f"{base}/results.jsonl") as writer:
        writer.write(result("a"))
        raise KeyError("boom")
    assert fs.cat(f"{base}/results.jsonl") == b"old\n"
    assert fs.cat(f"{base}/results.jsonl.partial").count(b"\n") == 1
    with files.ResultsWriter(f"{base}/results.jsonl") as writer:
        writer.write(result("b"))
        writer.commit()
    assert json.loads(fs.cat(f"{base}/results.jsonl"))["id"] == "b"
    assert not fs.exists(f"{base}/results.jsonl.partial")


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from prefect_batch_llm.files import ResultsWriter
    from prefect_batch_llm.results import WorkItemResult

    writer = ResultsWriter(sys.argv[1]).__enter__()
    writer.write(WorkItemResult(item_id="new", success=True, output="x"))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_run_keeps_previous_results(tmp_path):
    destination = tmp_path / "results.jsonl"
    destination.write_text('{"id": "old"}\n')
    run = subprocess.run([sys.executable, "-c", KILLED, str(destination)], timeout=120)
    assert run.returncode == -signal.SIGKILL
    assert destination.read_text() == '{"id": "old"}\n'
    assert json.loads((tmp_path / "results.jsonl.partial").read_text())["id"] == "new"


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 KiB tmpfs, so writes fail with a real ENOSPC (needs root and mount)."""
    yield from mounted_tmpfs(tmp_path / "tiny", "64k")


def test_disk_full_raises_results_write_error_and_keeps_destination(tiny_disk):
    destination = tiny_disk / "results.jsonl"
    destination.write_text('{"id": "old"}\n')
    written = 0
    with pytest.raises(files.ResultsWriteError) as caught:  # noqa: SIM117
        with files.ResultsWriter(str(destination)) as writer:
            for i in range(1000):
                writer.write(result(f"item-{i}", output="y" * 3000))
                written += 1
    error = caught.value
    assert isinstance(error, OSError)
    assert error.errno == errno.ENOSPC
    assert written == writer.lines > 0
    message = str(error)
    assert str(destination) in message
    assert f"{written} results" in message
    assert "Free disk space" in message
    assert destination.read_text() == '{"id": "old"}\n'  # untouched, no torn line
    lines = (tiny_disk / "results.jsonl.partial").read_bytes().split(b"\n")
    assert lines[-1] == b""  # the partial file ends with a complete line
    assert [json.loads(x)["id"] for x in lines[:-1]] == [f"item-{i}" for i in range(written)]


class _FillsUp:
    """A file object that fails like a full disk once `room` bytes are written."""

    def __init__(self, inner: Any, room: int) -> None:
        self.inner, self.room = inner, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return int(self.inner.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_write_error_on_other_fsspec_filesystems_keeps_destination(monkeypatch):
    base = f"memory://full-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{base}/results.jsonl", b"old\n")
    real_open = type(fs).open
    monkeypatch.setattr(
        type(fs), "open", lambda self, *a, **k: _FillsUp(real_open(self, *a, **k), 300)
    )
    with pytest.raises(files.ResultsWriteError, match="after 2 results were written"):  # noqa: SIM117
        with files.ResultsWriter(f"{base}/results.jsonl") as writer:
            for i in range(10):
                writer.write(result(f"i{i}"))
    monkeypatch.undo()
    assert writer.lines == 2
    assert fs.cat(f"{base}/results.jsonl") == b"old\n"
    with pytest.raises(files.ResultsWriteError):
        writer.commit()  # a failed writer never commits
    assert fs.cat(f"{base}/results.jsonl") == b"old\n"
