"""`python -m prefect_batch_llm.testing.emulator`: run the Gemini emulator as a process."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from prefect_batch_llm.testing.emulator import BatchFault, Fault, GeminiEmulator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gemini-emulator",
        description="A local Gemini Developer API on loopback. Stats: GET /_emulator/stats.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        help="accepted key (repeatable); default: any non-empty key",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per generate call")
    parser.add_argument("--jitter", type=float, default=0.0, help="extra random seconds")
    parser.add_argument("--rpm", type=int, help="requests-per-minute quota (429 beyond)")
    parser.add_argument("--tpm", type=int, help="tokens-per-minute quota (429 beyond)")
    parser.add_argument("--min-cache-tokens", type=int, default=1024)
    parser.add_argument(
        "--faults",
        type=Path,
        help='JSON file: a list of Fault objects, or {"faults": [...], "batch_faults": [...]}',
    )
    parser.add_argument("--batch-queued-seconds", type=float, default=0.0)
    parser.add_argument("--batch-pending-seconds", type=float, default=1.0)
    parser.add_argument("--batch-running-seconds", type=float, default=2.0)
    parser.add_argument(
        "--batch-inline-limit-bytes",
        type=int,
        default=20 * 1024 * 1024,
        help="largest batchGenerateContent body (inline batches beyond it answer 400)",
    )
    args = parser.parse_args(argv)
    scripted = json.loads(args.faults.read_text()) if args.faults else []
    if isinstance(scripted, list):
        scripted = {"faults": scripted}
    faults = [Fault.model_validate(f) for f in scripted.get("faults", [])]
    batch_faults = [BatchFault.model_validate(f) for f in scripted.get("batch_faults", [])]
    emulator = GeminiEmulator(
        host=args.host,
        port=args.port,
        api_keys=args.api_keys,
        latency=args.latency,
        latency_jitter=args.jitter,
        rpm=args.rpm,
        tpm=args.tpm,
        min_cache_tokens=args.min_cache_tokens,
        faults=faults,
        batch_faults=batch_faults,
        batch_queued_seconds=args.batch_queued_seconds,
        batch_pending_seconds=args.batch_pending_seconds,
        batch_running_seconds=args.batch_running_seconds,
        batch_inline_limit_bytes=args.batch_inline_limit_bytes,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with emulator:
        print(f"Gemini emulator listening on {emulator.base_url}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
