"""What a shared Gemini context cache saves: billed cost from the emulator's counters.

    .venv/bin/python benchmarks/gemini_cache_billing.py [--items 200] [--context-tokens 20000]
        [--legs shared,batch+cache]

Every leg runs the same items (a 20,000-token shared context + a short question each)
through ParallelBatchProcessor against its own fresh emulator, then fast-forwards the
emulator clock past the TTL so caches left alive are billed their storage until expiry:
  no-cache        GeminiStrategy, the context sent with every call
  shared          ONE GeminiCachedStrategy for all items (the recommended way)
  per-item        one GeminiCachedStrategy instance per item, same content (they find and
                  reuse the same cache by fingerprint, after a creation race at the start)
  per-item-v0.1   one cache per item (unique tags): batch-llm v0.1's behaviour
  flex            no-cache on the Flex tier (execution="flex")
  flex+cache      shared on the Flex tier
  batch           no-cache in Gemini Batch Mode (execution="batch": one job)
  batch+cache     shared in Batch Mode: the requests name the shared cache

Costs are the emulator's bill, each request at the prices of its path (standard, flex,
batch) plus cache storage; "same out" says whether every output equals the shared leg's.
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


LEGS = (
    "no-cache",
    "shared",
    "per-item",
    "per-item-v0.1",
    "flex",
    "flex+cache",
    "batch",
    "batch+cache",
)


async def leg(name: str, items: int, context: str, workers: int, model: str) -> dict[str, Any]:
    execution = name.split("+")[0] if name.startswith(("flex", "batch")) else "standard"
    uncached = name in ("no-cache", "flex", "batch")
    with GeminiEmulator(batch_pending_seconds=0.5, batch_running_seconds=1.0) as emulator:
        creds = GeminiCredentials(api_key=SecretStr("bench"), base_url=emulator.base_url)
        instruction = "Answer questions about the attached handbook."

        def strategy(i: int) -> Any:
            if uncached:
                return GeminiStrategy(
                    credentials=creds,
                    model=model,
                    system_instruction=f"{instruction}\n\n{context}",
                    execution=execution,
                )
            tags = {"item": str(i)} if name == "per-item-v0.1" else {}
            return GeminiCachedStrategy(
                credentials=creds,
                model=model,
                system_instruction=instruction,
                cached_documents=[context],
                cache_ttl_seconds=TTL,
                cache_tags=tags,
                execution=execution,
            )

        shared = strategy(0)
        started = time.perf_counter()
        config = ProcessorConfig(
            max_workers=workers, batch_poll_interval_seconds=0.2, report_artifacts=False
        )
        async with ParallelBatchProcessor(config=config) as proc:
            for i in range(items):
                chosen = strategy(i) if name.startswith("per-item") else shared
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
    paths = stats["billed_by_path"].values()
    tokens_usd = sum(p["total_usd"] for p in paths)
    storage = stats["billed"]["storage_usd"]
    return {
        "leg": name,
        "ok": result.succeeded,
        "caches": stats["caches"]["created"],
        "cache_calls": sum(n for k, n in stats["calls_by_endpoint"].items() if "cached" in k),
        "jobs": stats["batches"]["created"],
        "input": sum(p["input_tokens"] for p in paths),
        "cached": sum(p["cached_tokens"] for p in paths),
        "output": sum(p["output_tokens"] for p in paths),
        "hit_rate": round(result.cache_hit_rate(), 1),
        "tokens_usd": tokens_usd,
        "storage_usd": storage,
        "total_usd": tokens_usd + storage,
        "outputs": [r.output for r in result.results],
        "wall_s": round(wall, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--context-tokens", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--model", default="gemini-2.5-flash")
    parser.add_argument(
        "--legs", default=",".join(LEGS), help="comma-separated legs (shared is always run)"
    )
    args = parser.parse_args()
    legs = [leg for leg in LEGS if leg in {*args.legs.split(","), "shared"}]
    context = ("lorem " * (args.context_tokens * 4 // 6 + 1))[: args.context_tokens * 4]
    rows = [await leg(n, args.items, context, args.workers, args.model) for n in legs]
    base = next((r["total_usd"] for r in rows if r["leg"] == "no-cache"), None)
    shared = next(r for r in rows if r["leg"] == "shared")
    print(
        f"\n{args.items} items, {args.context_tokens}-token shared context, {args.model} "
        f"list prices, {args.workers} workers, storage billed until TTL ({TTL}s) expiry"
    )
    print(
        "command: python benchmarks/gemini_cache_billing.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    )
    head = (
        f"{'leg':<14}{'ok':>5}{'caches':>7}{'cache API':>10}{'input tok':>11}{'cached tok':>12}"
        f"{'hit %':>7}{'tokens $':>10}{'storage $':>10}{'total $':>9}{'vs no-cache':>12}"
        f"{'vs shared':>10}{'jobs':>5}{'same out':>9}{'wall s':>7}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['leg']:<14}{r['ok']:>5}{r['caches']:>7}{r['cache_calls']:>10}{r['input']:>11}"
            f"{r['cached']:>12}{r['hit_rate']:>7}{r['tokens_usd']:>10.4f}{r['storage_usd']:>10.4f}"
            f"{r['total_usd']:>9.4f}"
            + (f"{r['total_usd'] / base:>11.2f}x" if base else f"{'-':>12}")
            + f"{r['total_usd'] / shared['total_usd']:>9.2f}x{r['jobs']:>5}"
            f"{'yes' if r['outputs'] == shared['outputs'] else 'no':>9}{r['wall_s']:>7}"
        )


if __name__ == "__main__":
    asyncio.run(main())
