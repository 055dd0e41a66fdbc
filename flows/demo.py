"""Demo batch: 200 items through the processor on the built-in MockStrategy.

Run with `make demo`. Each item is a task run of the `demo-batch` flow run; a few items hit
a scripted rate limit (Retry-After 1 s) or a transient error and recover.
"""

from __future__ import annotations

import asyncio
import json

from prefect import flow

from prefect_batch_llm import (
    LLMWorkItem,
    ModelPricing,
    ParallelBatchProcessor,
    ProcessorConfig,
    RetryConfig,
)
from prefect_batch_llm.testing import MockFailure, MockStrategy

GEMINI_FLASH = ModelPricing(input_per_million=0.30, output_per_million=2.50)


@flow(name="demo-batch", log_prints=True)
async def demo_batch(items: int = 200, max_workers: int = 16) -> dict[str, object]:
    strategy = MockStrategy(
        latency=0.05,
        input_tokens=1200,
        cached_input_tokens=1000,
        output_tokens=80,
        failures=[
            MockFailure(kind="rate_limit", retry_after=1.0, prompt_contains="#7"),
            MockFailure(kind="transient", times=2, prompt_contains="#13"),
        ],
    )
    config = ProcessorConfig(
        max_workers=max_workers, retry=RetryConfig(initial_wait=0.2, max_wait=2.0)
    )
    async with ParallelBatchProcessor(config=config) as processor:
        for i in range(items):
            await processor.add_work(
                LLMWorkItem(item_id=f"doc-{i:04d}", strategy=strategy, prompt=f"Summarize #{i}")
            )
        result = await processor.process_all()
    summary = result.summary(pricing=GEMINI_FLASH)
    print(json.dumps(summary, indent=2))
    print(f"prepare() calls: {strategy.prepare_count}, cleanup() calls: {strategy.cleanup_count}")
    return summary


if __name__ == "__main__":
    asyncio.run(demo_batch())
