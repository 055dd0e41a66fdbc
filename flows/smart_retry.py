"""Example: per-item recovery with a pydantic-ai agent (validation feedback, model escalation).

    .venv/bin/python flows/smart_retry.py

Runs on the bundled Gemini emulator, which answers the first request about "Atlantis" with
output that fails validation. That item's second attempt (and only that item's) carries the
validation errors as feedback and runs on the stronger model; the others run once on Flash.
"""

from __future__ import annotations

import asyncio

from prefect import flow
from pydantic import BaseModel, SecretStr

from prefect_batch_llm import LLMWorkItem, ParallelBatchProcessor, ProcessorConfig, RetryConfig
from prefect_batch_llm.gemini import GeminiCredentials
from prefect_batch_llm.pydantic_ai import PydanticAIStrategy
from prefect_batch_llm.testing import Fault, GeminiEmulator


class City(BaseModel):
    name: str
    population: int


@flow(name="smart-retry-example")
async def smart_retry(base_url: str) -> list[tuple[str, str, int]]:
    strategy = PydanticAIStrategy(
        credentials=GeminiCredentials(api_key=SecretStr("example"), base_url=base_url),
        model="google:gemini-2.5-flash",
        output_type="__main__:City",
        instructions="Name the city and its population.",
        retry_feedback=True,  # the failed item's next attempt sees its validation errors
        escalation_model="google:gemini-2.5-pro",  # ...and runs on a stronger model
        escalate_on_attempt=2,
    )
    config = ProcessorConfig(max_workers=4, retry=RetryConfig(max_attempts=3))
    async with ParallelBatchProcessor(config=config) as processor:
        for place in ["Paris", "Atlantis", "Rome", "Lagos"]:
            await processor.add_work(
                LLMWorkItem(
                    item_id=place.lower(), strategy=strategy, prompt=f"Tell me about {place}"
                )
            )
        result = await processor.process_all()
    return [(r.item_id, r.metadata.get("model", "-"), r.attempts) for r in result.results]


if __name__ == "__main__":
    with GeminiEmulator(
        faults=[Fault(kind="invalid_output", prompt_contains="Atlantis", times=1)]
    ) as emulator:
        for item_id, model, attempts in asyncio.run(smart_retry(emulator.base_url)):
            print(f"{item_id:<10} {model:<26} attempts={attempts}")
