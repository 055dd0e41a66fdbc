"""Demo batch: 200 questions over one shared Gemini context cache, on the bundled emulator.

Run with `make demo`. It starts the Gemini emulator on 127.0.0.1 (with 50 ms latency, one
scripted rate limit and one transient error), then runs the `demo-batch` flow on Prefect's
ephemeral server: one task run per item, one context cache for all of them. It prints the
batch summary and what the emulator billed.
"""

from __future__ import annotations

import asyncio
import json

from prefect import flow
from pydantic import SecretStr

from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig, RetryConfig
from prefect_batch_llm.gemini import GeminiCachedStrategy, GeminiCredentials, gemini_pricing
from prefect_batch_llm.testing import Fault, GeminiEmulator

HANDBOOK = " ".join(
    f"Section {i}: customers on plan {'ABC'[i % 3]} may return items within {14 + i} days."
    for i in range(120)
)


@flow(name="demo-batch")
async def demo_batch(base_url: str, items: int = 200, max_workers: int = 16) -> dict[str, object]:
    strategy = GeminiCachedStrategy(
        credentials=GeminiCredentials(api_key=SecretStr("demo-key"), base_url=base_url),
        model="gemini-2.5-flash",
        system_instruction="Answer customer questions from the returns handbook.",
        cached_documents=[HANDBOOK],
        cache_tags={"app": "demo"},
        delete_cache_on_cleanup=True,
    )
    config = ProcessorConfig(
        max_workers=max_workers, retry=RetryConfig(initial_wait=0.2, max_wait=2.0)
    )
    async with ParallelBatchProcessor(config=config) as processor:
        for i in range(items):
            question = f"Question #{i}: how long may a plan {'ABC'[i % 3]} customer return items?"
            await processor.add_work(
                LLMWorkItem(item_id=f"q-{i:04d}", strategy=strategy, prompt=question)
            )
        result = await processor.process_all()
    return result.summary(pricing=gemini_pricing(strategy.model))


def main() -> None:
    faults = [
        Fault(kind="429", prompt_contains="#7:", times=1, retry_after=1.0),
        Fault(kind="503", prompt_contains="#13:", times=1),
    ]
    with GeminiEmulator(latency=0.05, faults=faults) as emulator:
        print(f"Gemini emulator on {emulator.base_url}")
        summary = asyncio.run(demo_batch(emulator.base_url))
        stats = emulator.stats()
    print("Batch summary:", json.dumps(summary, indent=2))
    print("Emulator billed:", json.dumps(stats["billed"], indent=2))
    print("Emulator caches:", json.dumps(stats["caches"]))


if __name__ == "__main__":
    main()
