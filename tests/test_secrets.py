"""No credential is ever written anywhere: not in results, logs, states, events or artifacts.

The deployable `batch_llm` flow runs in a subprocess with its own PREFECT_HOME (so its own
ephemeral Prefect server, SQLite database, result storage and a log file) against the Gemini
emulator, with a canary API key, over items that fail in every way the emulator can script
(401, 403 quoting the key as the hosted API does, 404, 400, 429 past the rate-limit budget,
500, 503, a dropped connection, a timeout in the processor and one in the HTTP client, an
expired and a deleted context cache) plus successes. Then every byte the run left
behind is searched for the key: every file under PREFECT_HOME (JSON string values, base64 and
zlib/gzip payloads decoded, recursively: result files hold base64 cloudpickle), every value
of every table of the database, the results file, the subprocess's stdout/stderr, the flow's
return values, and the flow runs' states, logs, artifacts and events read back from its API.

The saved credentials block is the one place the key belongs; Prefect stores block data
encrypted, so the search does not see it there (nothing here decrypts it).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect_batch_llm.testing import Fault, GeminiEmulator

SCRIPT = Path(__file__).parent / "scripts" / "secrets_canary_flow.py"
MARKER = "@@readback "
HEADER = b"x-goog-api-key"
# ~1,250 tokens by the emulator's rule: above the 1,024-token minimum cache size.
DOCUMENT = "\n".join(
    f"Handbook section {i}: expense claims are filed within thirty days of purchase."
    for i in range(64)
)

RETRY = {"max_attempts": 2, "initial_wait": 0.05, "max_wait": 0.2, "max_rate_limit_retries": 2}
# Overrides of the flow's defaults (which keep cache_results=True). Most items fail on purpose:
# the run must not fail for it.
FLOW_CONFIG = {"retry": RETRY, "max_failed_fraction": 1.0, "progress_bar": False}
FAULTS = [
    Fault(kind="401", prompt_contains="[fault:401]"),
    Fault(kind="403", prompt_contains="[fault:403]"),  # quotes the key, as the hosted API does
    Fault(kind="404", prompt_contains="[fault:404]"),
    Fault(kind="400", prompt_contains="[fault:400]"),
    Fault(kind="429", prompt_contains="[fault:429]", retry_after=0.1, retry_after_header=False),
    Fault(
        kind="429",
        prompt_contains="[fault:429-once]",
        times=1,
        retry_after=0.1,
        retry_after_header=False,
    ),
    Fault(kind="500", prompt_contains="[fault:500]"),
    Fault(kind="500", prompt_contains="[fault:500-once]", times=1),
    Fault(kind="503", prompt_contains="[fault:503]"),
    Fault(kind="drop", prompt_contains="[fault:drop]"),
    Fault(kind="slow", prompt_contains="[fault:slow]", delay=3.0),
]
# GeminiStrategy, 4 workers, timeout_per_item 1 s: the slow item times out in the processor.
PLAIN_ITEMS = {
    "p-ok-1": "What is the capital of France?",
    "p-401": "[fault:401] Who am I?",
    "p-ok-2": "Name three primary colours.",
    "p-403": "[fault:403] Tell me a joke.",
    "p-404": "[fault:404] Which model is this?",
    "p-400": "[fault:400] Parse this.",
    "p-429": "[fault:429] Busy?",
    "p-429-once": "[fault:429-once] Busy once?",
    "p-500": "[fault:500] Crash?",
    "p-500-once": "[fault:500-once] Crash once?",
    "p-503": "[fault:503] Overloaded?",
    "p-drop": "[fault:drop] Hang up?",
    "p-slow": "[fault:slow] Take your time.",
    "p-ok-3": "Spell 'necessary'.",
    "p-ok-4": "What is 2 + 2?",
}
# GeminiCachedStrategy, 1 worker (items in order), HTTP timeout 1 s (slow: httpx timeout).
CACHED_ITEMS = {
    "c-ok-1": "How long do I have to file a claim?",
    "c-expire": "[cache:expire] What does section 3 say?",  # its answer ages the cache out
    "c-after-expire": "What does section 4 say?",  # 400 "Cache content X is expired", renewed
    "c-403": "[fault:403] What does section 5 say?",
    "c-500": "[fault:500] What does section 6 say?",
    "c-429": "[fault:429] What does section 7 say?",
    "c-slow": "[fault:slow] What does section 8 say?",
    "c-ok-2": "What does section 9 say?",
    "c-delete": "[cache:delete] What does section 10 say?",  # its answer deletes the cache
    "c-after-delete": "What does section 11 say?",  # 404 CachedContent not found
}


def _logging_config(log_file: Path) -> str:
    """Prefect's default logging config, plus a file handler on every logger that logs."""
    file_handler = {"level": 0, "class": "logging.FileHandler", "formatter": "debug"}
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "standard": {
                "()": "prefect.logging.formatters.PrefectFormatter",
                "format": "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s",
                "flow_run_fmt": "%(asctime)s | %(levelname)-7s | Flow run %(flow_run_name)r"
                " - %(message)s",
                "task_run_fmt": "%(asctime)s | %(levelname)-7s | Task run %(task_run_name)r"
                " - %(message)s",
            },
            "debug": {"format": "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"},
        },
        "handlers": {
            "console": {
                "level": 0,
                "class": "prefect.logging.handlers.PrefectConsoleHandler",
                "formatter": "standard",
                "stream": "ext://sys.stderr",
            },
            "api": {"level": 0, "class": "prefect.logging.handlers.APILogHandler"},
            "file": {**file_handler, "filename": str(log_file)},
            "debug": {
                "level": 0,
                "class": "prefect.logging.handlers._SafeStreamHandler",
                "formatter": "debug",
                "stream": "ext://sys.stderr",
            },
        },
        "loggers": {
            "prefect": {"level": "INFO"},
            "prefect.extra": {"level": "INFO", "handlers": ["api", "file"], "propagate": False},
            "prefect.flow_runs": {"level": "NOTSET", "handlers": ["api"]},
            "prefect.task_runs": {"level": "NOTSET", "handlers": ["api"]},
            "prefect.server": {"level": "WARNING"},
            "prefect.client": {"level": "INFO"},
            "prefect._internal": {
                "level": "ERROR",
                "handlers": ["debug", "file"],
                "propagate": False,
            },
            "prefect_batch_llm": {"level": "INFO"},
            "uvicorn": {"level": "WARNING", "handlers": ["console", "file"], "propagate": False},
            "fastapi": {"level": "WARNING", "handlers": ["console", "file"], "propagate": False},
        },
        "root": {"level": "WARNING", "handlers": ["console", "file"]},
    }
    return json.dumps(config, indent=1)  # JSON is YAML


# -- searching -----------------------------------------------------------------------------


class Finder:
    """Collects where the canary (or a 16-hex-digit prefix of it) occurs, decoding as it goes."""

    def __init__(self, canary: str) -> None:
        self.full = canary.encode()
        self.prefix = canary[: len("canary-") + 16].encode()
        self.encoded = _base64_forms(self.prefix)
        self.hits: dict[str, list[str]] = {}

    def search(self, data: bytes, where: str, depth: int = 0) -> None:
        start = data.find(self.prefix)
        while start != -1:
            self._hit(data, start, where)
            start = data.find(self.prefix, start + 1)
        for form in self.encoded:  # base64 of the key, at any alignment, however it is framed
            start = data.find(form)
            if start != -1:
                self._hit(data, start, where, "key in base64")
        if depth >= 4 or len(data) < 12:
            return
        for label, decoded in _decodings(data):
            self.search(decoded, f"{where} -> {label}", depth + 1)

    def _hit(self, data: bytes, start: int, where: str, kind: str | None = None) -> None:
        if kind is None:
            full = data[start : start + len(self.full)] == self.full
            header = HEADER in data[max(0, start - 120) : start].lower()
            kind = ("header + key" if header else "key") if full else "key prefix"
        window = data[max(0, start - 100) : start + len(self.full) + 40]
        text = window.decode("utf-8", "backslashreplace").replace("\n", "\\n")
        self.hits.setdefault(where, []).append(f"[{kind}] ...{text[-200:]}...")

    def report(self, limit: int = 30) -> str:
        """One line per kind of place (result files grouped) and per decoding that shows the
        key (a decoded view repeats its encoded parent: only the most decoded views count),
        with how it appeared (bare, after x-goog-api-key, ...) and an example."""
        leaves: dict[str, dict[str, list[str]]] = {}
        for where, found in self.hits.items():
            if any(other.startswith(f"{where} -> ") for other in self.hits):
                continue
            top, _, path = where.partition(" -> ")
            group = re.sub(r"/[0-9a-f]{32}$", "/<result>", top)
            path = re.sub(r"\[\d+\]|\b[0-9a-f-]{36}\b", "*", path) or "raw bytes"
            leaves.setdefault(f"{group} via {path}", {}).setdefault(top, []).extend(found)
        places = {where.partition(" -> ")[0] for where in self.hits}
        lines = [
            f"the canary API key was written to {len(places)} place(s), {len(leaves)} kind(s):"
        ]
        for name, by_place in list(leaves.items())[:limit]:
            found = [hit for hits in by_place.values() for hit in hits]
            kinds = Counter(hit[1 : hit.index("]")] for hit in found)
            lines.append(f"- {name} ({len(by_place)} place(s)): {dict(kinds)}; e.g. {found[0]}")
        if len(leaves) > limit:
            lines.append(f"- ... and {len(leaves) - limit} more")
        return "\n".join(lines)


def _base64_forms(secret: bytes) -> list[bytes]:
    """The stable middle of the base64 of `secret` at each byte alignment, both alphabets."""
    forms = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret)
        middle = encoded[(shift * 8 + 5) // 6 : -4]
        forms += [middle, middle.replace(b"+", b"-").replace(b"/", b"_")]
    return forms


_B64 = re.compile(rb"[A-Za-z0-9+/_-]{16,}={0,2}")
# MIME-style base64 broken into lines (Prefect's result files hold cloudpickle like this).
_B64_LINES = re.compile(rb"(?:[A-Za-z0-9+/_-]{4,}={0,2}\r?\n){2,}[A-Za-z0-9+/_-]*={0,2}")


def _decodings(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Payloads inside `data`: JSON string values, base64 runs, zlib/gzip streams."""
    if data[:2] == b"\x1f\x8b" and (unpacked := _unpack(gzip.decompress, data)) is not None:
        yield "gzip", unpacked
    zlib_header = data[:1] == b"\x78" and data[1:2] in (b"\x01", b"\x5e", b"\x9c", b"\xda")
    if zlib_header and (unpacked := _unpack(zlib.decompress, data)) is not None:
        yield "zlib", unpacked
    stripped = data.strip()
    if stripped[:1] in (b"{", b"[", b'"'):
        try:
            value = json.loads(stripped)
        except (ValueError, UnicodeDecodeError):
            pass
        else:
            for path, text in _json_strings(value, "json"):
                if len(text) >= 12:
                    yield path, text.encode("utf-8", "surrogatepass")
            return  # the strings cover everything a JSON document holds
    runs = list(_B64_LINES.finditer(data))
    tokens = {re.sub(rb"\s", b"", m.group()) for m in runs}
    tokens |= {  # single-line runs, unless part of a multi-line one (decoded whole, above)
        m.group()
        for m in _B64.finditer(data)
        if not any(run.start() <= m.start() < run.end() for run in runs)
    }
    for token in sorted(tokens):
        for altchars in (None, b"-_"):
            try:
                decoded = base64.b64decode(token + b"=" * (-len(token) % 4), altchars)
            except (binascii.Error, ValueError):
                continue
            if len(decoded) >= 12:
                yield "base64", decoded
                break


def _unpack(decompress: Callable[[bytes], bytes], data: bytes) -> bytes | None:
    try:
        return decompress(data)
    except (OSError, EOFError, zlib.error):
        return None


def _json_strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _json_strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _json_strings(item, f"{path}[{index}]")


def search_tree(finder: Finder, root: Path, label: str) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        finder.search(path.read_bytes(), f"{label}/{path.relative_to(root)}")
    return files


def search_database(finder: Finder, database: Path, scratch: Path) -> dict[str, int]:
    """Every value of every table (a copy, with its WAL, so the original stays untouched)."""
    scratch.mkdir()
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{database}{suffix}")
        if source.exists():
            shutil.copy(source, scratch / f"{database.name}{suffix}")
    rows: dict[str, int] = {}
    connection = sqlite3.connect(scratch / database.name)
    try:
        tables = [
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        for table in tables:
            try:
                cursor = connection.execute(f'SELECT * FROM "{table}"')
            except sqlite3.DatabaseError:
                continue  # e.g. a virtual table whose module is not loaded
            columns = [d[0] for d in cursor.description]
            rows[table] = 0
            for row in cursor:
                rows[table] += 1
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, str):
                        value = value.encode("utf-8", "surrogatepass")
                    if isinstance(value, bytes):
                        finder.search(value, f"prefect.db table {table}.{column}")
    finally:
        connection.close()
    return rows


# -- the run ---------------------------------------------------------------------------------


def _write_items(path: Path, items: dict[str, str]) -> None:
    path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in items.items()))


def _subprocess_env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") and k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")
    }
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        PREFECT_LOGGING_LEVEL="INFO",
        PREFECT_LOGGING_SETTINGS_PATH=str(home / "logging.yml"),
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore",
    )
    return env


def _read_results(path: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


class CredentialWritten(AssertionError):
    """The canary key was found somewhere (any other failure of the test is a real one)."""


def test_no_credential_is_written_anywhere(tmp_path):
    canary = f"canary-{secrets.token_hex(16)}"
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "logging.yml").write_text(_logging_config(home / "prefect.log"))
    plain_in, cached_in = tmp_path / "plain.jsonl", tmp_path / "cached.jsonl"
    plain_out, cached_out = tmp_path / "plain.results.jsonl", tmp_path / "cached.results.jsonl"
    _write_items(plain_in, PLAIN_ITEMS)
    _write_items(cached_in, CACHED_ITEMS)

    with GeminiEmulator(faults=[f.model_copy() for f in FAULTS]) as emulator:

        def answer(model: str, prompt: str, body: dict[str, Any]) -> None:
            if "[cache:expire]" in prompt:
                emulator.clock.advance(7200)  # every cache's TTL (3600 s) has passed
            if "[cache:delete]" in prompt:
                for name in list(emulator.state.caches):
                    emulator.state.delete_cache(name)

        emulator.response_fn = answer
        spec = {
            "base_url": emulator.base_url,
            "document": DOCUMENT,
            "runs": [
                {
                    "strategy": "plain",
                    "input": str(plain_in),
                    "output": str(plain_out),
                    "config": {
                        **FLOW_CONFIG,
                        "max_workers": 4,
                        "timeout_per_item": 1.0,
                        "artifact_key": "secrets-plain",
                    },
                },
                {
                    "strategy": "cached",
                    "input": str(cached_in),
                    "output": str(cached_out),
                    "config": {
                        **FLOW_CONFIG,
                        "max_workers": 1,
                        "timeout_per_item": 5.0,
                        "artifact_key": "secrets-cached",
                    },
                },
            ],
        }
        spec_path = tmp_path / "spec.json"
        spec_path.write_text(json.dumps(spec))
        started = time.monotonic()
        process = subprocess.run(
            [sys.executable, str(SCRIPT), str(spec_path)],
            input=f"{canary}\n".encode(),
            env=_subprocess_env(home),
            capture_output=True,
            timeout=300,
        )
        elapsed = time.monotonic() - started
        stats = emulator.stats()

    stdout, stderr = process.stdout, process.stderr
    tail = (stdout[-3000:] + b"\n---\n" + stderr[-3000:]).decode("utf-8", "replace")
    tail = tail.replace(canary, "<the canary key>")
    assert process.returncode == 0, f"the helper script failed after {elapsed:.0f}s:\n{tail}"

    # -- the run really exercised every failure, and succeeded too ---------------------------
    sections: dict[str, Any] = {}
    plain_lines: list[bytes] = []
    for line in stdout.splitlines():
        if line.startswith(MARKER.encode()):
            record = json.loads(line[len(MARKER) :])
            sections[record["section"]] = record["data"]
        else:
            plain_lines.append(line)
    assert "return-value:plain" in sections and "return-value:cached" in sections, sections.keys()
    plain, cached = _read_results(plain_out), _read_results(cached_out)
    assert set(plain) == set(PLAIN_ITEMS) and set(cached) == set(CACHED_ITEMS)
    category = {i: r["category"] for i, r in {**plain, **cached}.items() if not r["success"]}
    expected = {
        "p-401": "permanent",
        "p-403": "permanent",
        "p-404": "permanent",
        "p-400": "permanent",
        "p-429": "rate_limit",
        "p-500": "transient",
        "p-503": "transient",
        "p-drop": "transient",
        "p-slow": "timeout",
        "c-403": "permanent",
        "c-500": "transient",
        "c-429": "rate_limit",
        "c-slow": "timeout",
    }
    # The deleted cache answers 404: the item fails, or the strategy re-creates the cache.
    if "c-after-delete" in category:
        expected["c-after-delete"] = category["c-after-delete"]
        assert category["c-after-delete"] in ("permanent", "cache_expired"), category
    assert category == expected, f"failed items by category: {category}\n{tail}"
    succeeded = {i for i, r in {**plain, **cached}.items() if r["success"]}
    assert {"p-ok-1", "p-ok-4", "p-429-once", "p-500-once", "c-ok-1", "c-ok-2"} <= succeeded
    assert {"c-expire", "c-after-expire", "c-delete"} <= succeeded
    assert cached["c-ok-2"]["tokens"]["cached_input_tokens"] > 1024
    by_status = stats["calls_by_status"]
    for status in ("200", "400", "401", "403", "404", "429", "500", "503"):
        assert by_status.get(status), (status, by_status)
    generate = Counter[str]()
    for key, count in stats["calls"].items():
        if key.startswith("generateContent|"):
            generate[key.rsplit("|", 1)[1]] += count
    # 400 and 404 answered twice: the faults, and the expired and the deleted cache.
    assert generate.get("400", 0) >= 2 and generate.get("404", 0) >= 2, stats["calls"]
    assert stats["caches"]["expired"] >= 1 and stats["caches"]["deleted"] >= 1, stats["caches"]

    # -- the API readback is not empty (so searching it means something) ---------------------
    states = [s for run in sections["task-run-states"].values() for s in run]
    assert sum(s["type"] == "FAILED" for s in states) >= len(expected), len(states)
    assert len(sections["logs"]) >= 10 and sections["artifacts"], sections.keys()
    events = sections.get("events")
    assert events, sections.get("events-error", "no events were read back")

    # -- search everything ---------------------------------------------------------------------
    finder = Finder(canary)
    files = search_tree(finder, home, "PREFECT_HOME")
    names = {p.name for p in files}
    assert "prefect.db" in names and "prefect.log" in names, sorted(names)
    results_dir = home / "storage"
    assert results_dir.is_dir() and any(results_dir.iterdir()), "no persisted results"
    assert (home / "prefect.log").stat().st_size > 0
    tables = search_database(finder, home / "prefect.db", tmp_path / "db-copy")
    assert tables.get("task_run_state") and tables.get("log"), tables
    for path in (plain_out, cached_out):
        finder.search(path.read_bytes(), f"results file {path.name}")
    finder.search(b"\n".join(plain_lines), "subprocess stdout")
    finder.search(stderr, "subprocess stderr")
    for section, data in sections.items():
        finder.search(json.dumps(data).encode(), f"API readback: {section}")

    if finder.hits:
        raise CredentialWritten(finder.report())
