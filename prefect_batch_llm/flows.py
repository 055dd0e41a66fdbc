"""`batch_llm`: the deployable flow that runs a file of prompts through a saved strategy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from prefect import flow, get_run_logger
from prefect.blocks.core import Block
from prefect.runtime import flow_run

from prefect_batch_llm.config import ProcessorConfig
from prefect_batch_llm.files import (
    InvalidInput,
    RejectedInput,
    ResultsWriter,
    count_items,
    input_exists,
    read_input,
)
from prefect_batch_llm.gemini.pricing import gemini_pricing
from prefect_batch_llm.items import LLMWorkItem
from prefect_batch_llm.processor import ParallelBatchProcessor
from prefect_batch_llm.results import ModelPricing
from prefect_batch_llm.strategy import LLMCallStrategy

#: The settings a deployment starts from: resumable, reported under the `batch-llm` keys.
DEFAULT_FLOW_CONFIG = ProcessorConfig(
    max_workers=8, cache_results=True, keep_results=False, artifact_key="batch-llm"
)


async def load_strategy(name: str) -> LLMCallStrategy[Any]:
    """Load a saved strategy block by `block-type-slug/block-name`, explaining what is wrong."""
    if "/" not in name:
        raise ValueError(
            f"strategy={name!r}: name the block as 'block-type-slug/block-name', e.g. "
            "'gemini-cached-strategy/handbook-qa' (see `prefect block ls`)."
        )
    try:
        block = await Block.aload(name)
    except ValueError as exc:
        raise ValueError(
            f"No strategy block {name!r}: {exc}. Create it with `python blocks/create_blocks.py`, "
            "in the UI (Blocks), or with `YourStrategy(...).save(name)`."
        ) from None
    if not isinstance(block, LLMCallStrategy):
        raise ValueError(
            f"Block {name!r} is a {type(block).__name__}, not a strategy. Pass a strategy "
            "block such as a gemini-strategy or gemini-cached-strategy document."
        )
    return block


def _pricing_for(strategy: LLMCallStrategy[Any]) -> ModelPricing | None:
    model = getattr(strategy, "model", None)
    if isinstance(model, str) and "gemini" in model:
        return gemini_pricing(model.split(":", 1)[-1])
    return None


def _work_items(path: str, strategy: LLMCallStrategy[Any]) -> Iterator[LLMWorkItem[Any, Any, Any]]:
    for record in read_input(path):
        if isinstance(record, InvalidInput):
            yield LLMWorkItem(record.item_id, RejectedInput(record.error), "")
        else:
            yield LLMWorkItem(record.item_id, strategy, record.prompt, record.context)


def _default_output(path: str) -> str:
    stem = PurePosixPath(path.split("?", 1)[0]).stem
    return f"results/{stem}-{flow_run.get_name() or 'local'}.results.jsonl"


@flow(name="batch-llm")
async def batch_llm(
    input: str,
    strategy: str = "gemini-cached-strategy/handbook-qa",
    output: str | None = None,
    config: ProcessorConfig = DEFAULT_FLOW_CONFIG,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run every line of a JSONL or CSV file through a saved strategy block.

    Args:
        input: Path or fsspec URL of the items: a `.jsonl` file of `{"id", "prompt", ...}`
            objects or a `.csv` file with a `prompt` column. Read line by line.
        strategy: The strategy block document, as `block-type-slug/block-name`.
        output: Where to write one JSONL result per item (id, success, output, error,
            category, tokens, attempts), as each finishes. Default:
            `results/<input>-<flow run>.results.jsonl`.
        config: Processor settings. By default items completed by an earlier run with the
            same prompt, context and strategy configuration are not called again.
        fresh: Recompute every item even if an earlier run completed it.

    Returns:
        A compact summary: counts, tokens, cache hit rate, cost, duration, output path.
    """
    logger = get_run_logger()
    if not input_exists(input):
        raise FileNotFoundError(
            f"Input file {input!r} not found. Pass input= a path or fsspec URL of a .jsonl or "
            ".csv file readable by the flow's process (nothing was sent to the LLM)."
        )
    chosen = await load_strategy(strategy)
    if fresh:
        config = config.model_copy(update={"refresh_cache": True})
    destination = output or _default_output(input)
    started = time.monotonic()
    with ResultsWriter(destination) as writer:
        processor: ParallelBatchProcessor[Any, Any, Any] = ParallelBatchProcessor(
            config=config, on_result=writer.write, pricing=_pricing_for(chosen)
        )
        async with processor:
            batch = await processor.process_stream(
                _work_items(input, chosen), total=count_items(input)
            )
    summary = batch.summary(_pricing_for(chosen))
    summary["duration_seconds"] = round(time.monotonic() - started, 3)
    summary["output"] = destination
    logger.info(
        "%d items: %d succeeded, %d failed; results in %s",
        batch.total_items,
        batch.succeeded,
        batch.failed,
        destination,
    )
    return summary
