"""A flow process that a test interrupts mid-batch; cleanup calls are appended to a file."""

import asyncio
import sys
from pathlib import Path

from prefect import flow

from prefect_batch_llm import LLMCallStrategy, LLMWorkItem, ParallelBatchProcessor, ProcessorConfig

marker = Path(sys.argv[1])


class Hanging(LLMCallStrategy[str]):
    async def prepare(self) -> None:
        with marker.open("a") as f:
            f.write("prepare\n")

    async def execute(self, prompt, attempt, timeout, state=None):
        with marker.open("a") as f:
            f.write("execute\n")
        await asyncio.sleep(120)
        return "never", {}

    async def cleanup(self) -> None:
        with marker.open("a") as f:
            f.write("cleanup\n")


@flow
async def interrupted_batch() -> None:
    strategy = Hanging()
    async with ParallelBatchProcessor(config=ProcessorConfig(max_workers=4)) as processor:
        for i in range(8):
            await processor.add_work(LLMWorkItem(item_id=f"i{i}", strategy=strategy, prompt="x"))
        await processor.process_all()


if __name__ == "__main__":
    asyncio.run(interrupted_batch())
