"""What a shared Gemini context cache saves: billed cost from the emulator's counters.

    .venv/bin/python benchmarks/gemini_cache_billing.py [--items 200] [--context-tokens 20000]

Every leg runs the same items (a 20,000-token shared context + a short question each)
through ParallelBatchProcessor against its own fresh emulator, then fast-forwards the
emulator clock past the TTL so caches left alive are billed their storage until expiry:
  no-cache        GeminiStrategy, the context sent with every call
  shared          ONE GeminiCachedStrategy for all items (the recommended way)
  per-item        one GeminiCachedStrategy instance per item, same content (they find and
                  reuse the same cache by fingerprint, after a creation race at the start)
  per-item-v0.1   one cache per item (unique tags): batch-llm v0.1's behaviour
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from pydantic import SecretStr

from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig
from prefect_batch_llm.gemini import (
    GeminiCachedStrategy,
    GeminiCredentials,
    GeminiStrategy,
)
from prefect_batch_llm.testing import GeminiEmulator

TTL = 3600


async def leg(name: str, items: int, context: str, workers: int) -> dict[str, Any]:
    with GeminiEmulator() as emulator:
        creds = GeminiCredentials(api_key=SecretStr("bench"), base_url=emulator.base_url)
        instruction = "Answer questions about the attached handbook."

        def strategy(i: int) -> Any:
            if name == "no-cache":
                return GeminiStrategy(
                    credentials=creds, system_instruction=f"{instruction}\n\n{context}"
                )
            tags = {"item": str(i)} if name == "per-item-v0.1" else {}
            return GeminiCachedStrategy(
                credentials=creds,
                system_instruction=instruction,
                cached_documents=[context],
                cache_ttl_seconds=TTL,
                cache_tags=tags,
            )

        shared = strategy(0)
        started = time.perf_counter()
        async with ParallelBatchProcessor(config=ProcessorConfig(max_workers=workers)) as proc:
            for i in range(items):
                chosen = shared if name in ("no-cache", "shared") else strategy(i)
                await proc.add_work(
                    LLMWorkItem(
                        item_id=f"q{i}",
                        strategy=chosen,
                        prompt=f"Question {i}: what does section {i} say?",
                    )
                )
            result = await proc.process_all()
        wall = time.perf_counter() - started
        emulator.clock.advance(TTL + 1)  # caches left alive are billed until they expire
        stats = emulator.stats()
    billed = stats["billed"]
    return {
        "leg": name,
        "ok": result.succeeded,
        "caches": stats["caches"]["created"],
        "cache_calls": sum(n for k, n in stats["calls_by_endpoint"].items() if "cached" in k),
        "input": billed["input_tokens"],
        "cached": billed["cached_tokens"],
        "output": billed["output_tokens"],
        "hit_rate": round(result.cache_hit_rate(), 1),
        "tokens_usd": billed["input_usd"] + billed["cached_usd"] + billed["output_usd"],
        "storage_usd": billed["storage_usd"],
        "total_usd": billed["total_usd"],
        "wall_s": round(wall, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--context-tokens", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args()
    context = ("lorem " * (args.context_tokens * 4 // 6 + 1))[: args.context_tokens * 4]
    rows = [
        await leg(n, args.items, context, args.workers)
        for n in ("no-cache", "shared", "per-item", "per-item-v0.1")
    ]
    base = rows[0]["total_usd"]
    print(
        f"\n{args.items} items, {args.context_tokens}-token shared context, gemini-2.5-flash "
        f"list prices, {args.workers} workers, storage billed until TTL ({TTL}s) expiry"
    )
    print(
        "command: python benchmarks/gemini_cache_billing.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    )
    head = (
        f"{'leg':<14}{'ok':>5}{'caches':>7}{'cache API':>10}{'input tok':>11}{'cached tok':>12}"
        f"{'hit %':>7}{'tokens $':>10}{'storage $':>10}{'total $':>9}{'vs no-cache':>12}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['leg']:<14}{r['ok']:>5}{r['caches']:>7}{r['cache_calls']:>10}{r['input']:>11}"
            f"{r['cached']:>12}{r['hit_rate']:>7}{r['tokens_usd']:>10.4f}{r['storage_usd']:>10.4f}"
            f"{r['total_usd']:>9.4f}{r['total_usd'] / base:>11.2f}x"
        )


if __name__ == "__main__":
    asyncio.run(main())
