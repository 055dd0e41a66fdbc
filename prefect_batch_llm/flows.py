"""`batch_llm`: the deployable flow that runs a file of prompts through a saved strategy."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.blocks.core import Block
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.runtime import deployment, flow_run
from pydantic import BeforeValidator, Field
from pydantic.json_schema import SkipJsonSchema

from prefect_batch_llm._engine.lifecycle import StrategyLifecycle
from prefect_batch_llm.config import ProcessorConfig
from prefect_batch_llm.errors import describe
from prefect_batch_llm.files import (
    InvalidInput,
    RejectedInput,
    ResultsWriter,
    check_output_path,
    count_items,
    input_exists,
    read_input,
)
from prefect_batch_llm.gemini import GeminiCachedStrategy, GeminiStrategy
from prefect_batch_llm.gemini.pricing import gemini_pricing
from prefect_batch_llm.items import LLMWorkItem
from prefect_batch_llm.preview import preview_cost
from prefect_batch_llm.processor import ParallelBatchProcessor
from prefect_batch_llm.pydantic_ai import PydanticAIStrategy
from prefect_batch_llm.results import BatchFailedError, BatchResult, ModelPricing
from prefect_batch_llm.strategy import LLMCallStrategy

#: Stored results of the deployable flow are reused for 12 hours: long enough to resume a
#: crashed or killed run the same day, short enough that a nightly run recomputes.
DEFAULT_RESULT_TTL_SECONDS = 12 * 3600.0
#: The deployable flow fails a run when more than 5% of its items fail.
DEFAULT_MAX_FAILED_FRACTION = 0.05


class BatchFlowConfig(ProcessorConfig):
    """`ProcessorConfig` with the deployable flow's defaults: resumable for 12 hours, a run
    fails when more than 5% of its items fail, artifacts keyed per deployment.

    A partial `config` parameter (`--param config='{"max_workers": 4}'`) changes only the
    fields it names; every other field keeps these defaults.
    """

    max_workers: int = Field(8, ge=1, le=4096, description="Items in flight at once.")
    cache_results: bool = Field(
        True,
        description="Skip items an earlier run completed with the same prompt, context and "
        "strategy settings (resume after a crash).",
    )
    result_ttl_seconds: float | None = Field(
        DEFAULT_RESULT_TTL_SECONDS,
        gt=0,
        description="How long a stored result may be reused, in seconds (default 12 hours).",
    )
    max_failed_fraction: float = Field(
        DEFAULT_MAX_FAILED_FRACTION,
        ge=0.0,
        le=1.0,
        description="Fail the run when more than this fraction of items fail (default 0.05). "
        "A run in which every item failed always fails.",
    )
    artifact_key: str | None = Field(
        None,
        pattern=r"^[a-z0-9-]+$",
        description="Key prefix of the artifacts (lowercase letters, digits, dashes). Empty: "
        "batch-llm-<deployment>, or batch-llm-<input file name> outside a deployment, so "
        "each deployment has its own artifact timeline.",
    )
    # Library settings with no use in a deployment: not in the run form, nor in the
    # parameter's default value the form sends back (the schema forbids unknown keys).
    keep_results: SkipJsonSchema[bool] = Field(False, exclude=True)
    progress_bar: SkipJsonSchema[bool | None] = Field(None, exclude=True)


DEFAULT_FLOW_CONFIG = BatchFlowConfig()


def _as_flow_config(value: Any) -> Any:
    """A whole `ProcessorConfig` object is taken as it is (every field, its defaults too);
    a mapping (CLI, UI, API) only overrides the flow's defaults for the fields it names."""
    if isinstance(value, ProcessorConfig) and not isinstance(value, BatchFlowConfig):
        return value.model_dump()
    return value


FlowConfig = Annotated[BatchFlowConfig, BeforeValidator(_as_flow_config)]


#: The strategy parameter: a block picker in the run form (one per strategy block type),
#: or `block-type-slug/block-name` from the CLI and the API (any strategy block type).
StrategyParameter = GeminiCachedStrategy | GeminiStrategy | PydanticAIStrategy | str


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


async def _chosen_strategy(strategy: StrategyParameter) -> tuple[LLMCallStrategy[Any], str]:
    """The strategy to run and how the report names it (`slug/name` of its block document)."""
    if isinstance(strategy, str):
        return await load_strategy(strategy), strategy
    name = getattr(strategy, "_block_document_name", None) or "(unsaved block)"
    return strategy, f"{strategy.get_block_type_slug()}/{name}"


Execution = Literal["standard", "flex", "batch"]


def _on_path(strategy: LLMCallStrategy[Any], execution: Execution | None) -> LLMCallStrategy[Any]:
    """The strategy with its execution path replaced for this run (the block is unchanged)."""
    if execution is None:
        return strategy
    if not isinstance(strategy, GeminiStrategy):
        if execution == "standard":
            return strategy
        raise ValueError(
            f"execution={execution!r}: only Gemini strategies run on the flex or batch path; "
            f"{type(strategy).__name__} calls online. Leave execution empty."
        )
    return strategy.model_copy(update={"execution": execution})


SHARD_TAG = "batch-llm-shard"
"""The tag of a shard run of `batch-llm-sharded`: its parent owns the shared resources."""


def _for_this_run(strategy: LLMCallStrategy[Any]) -> LLMCallStrategy[Any]:
    """A shard run leaves the context cache in place: the sharded parent made it before the
    shards and deletes it after the last one (with `delete_cache_on_cleanup`), so one shard
    that finishes early cannot delete the cache the others are still using."""
    if SHARD_TAG not in flow_run.tags:
        return strategy
    if isinstance(strategy, GeminiCachedStrategy):
        return strategy.model_copy(update={"delete_cache_on_cleanup": False})
    if isinstance(strategy, PydanticAIStrategy) and strategy.context_cache is not None:
        cache = strategy.context_cache.model_copy(update={"delete_cache_on_cleanup": False})
        return strategy.model_copy(update={"context_cache": cache})
    return strategy


def _artifact_key_for(input: str) -> str:
    """`batch-llm-<deployment name>`, or `batch-llm-<input file name>` outside a deployment."""
    name = deployment.name or PurePosixPath(input.split("?", 1)[0]).stem
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60].strip("-")
    return f"batch-llm-{slug}" if slug else "batch-llm"


def _absolute(location: str) -> str:
    """A local path made absolute (where the flow runs); URLs are kept as they are."""
    return location if "://" in location else os.path.abspath(location)


def _pricing_for(strategy: LLMCallStrategy[Any]) -> ModelPricing | None:
    model = getattr(strategy, "model", None)
    if isinstance(model, str) and "gemini" in model:
        return gemini_pricing(model.split(":", 1)[-1])
    return None


def _work_items(path: str, strategy: LLMCallStrategy[Any]) -> Iterator[LLMWorkItem[Any, Any, Any]]:
    """One work item per input line; an invalid line fails alone, without a call."""
    for record in read_input(path):
        if isinstance(record, InvalidInput):
            yield LLMWorkItem(record.item_id, RejectedInput(record.error), "")
        else:
            yield LLMWorkItem(record.item_id, strategy, record.prompt, record.context)


def _default_output(path: str) -> str:
    stem = PurePosixPath(path.split("?", 1)[0]).stem
    return f"results/{stem}-{flow_run.get_name() or 'local'}.results.jsonl"


def _conclude(batch: BatchResult[Any, Any], where: str) -> None:
    """Log the counts; fail the run (after every result is written) when the batch failed."""
    get_run_logger().info(
        "%d items: %d succeeded, %d failed; results in %s",
        batch.total_items,
        batch.succeeded,
        batch.failed,
        where,
    )
    if batch.outcome.failed:
        raise BatchFailedError(f"{batch.outcome.message}; results in {where}")


@flow(name="batch-llm")
async def batch_llm(
    input: str,
    strategy: StrategyParameter = "gemini-cached-strategy/handbook-qa",
    output: str | None = None,
    config: FlowConfig = DEFAULT_FLOW_CONFIG,
    fresh: bool = False,
    preview: bool = False,
    execution: Execution | None = None,
) -> dict[str, Any]:
    """Run every line of a JSONL or CSV file through a saved strategy block.

    Args:
        input: Path or fsspec URL of the items: a `.jsonl` file of `{"id", "prompt", ...}`
            objects or a `.csv` file with a `prompt` column. Read line by line.
        strategy: The saved strategy block: pick one in the form, or name it as
            `block-type-slug/block-name` (e.g. `gemini-cached-strategy/handbook-qa`).
        output: Where to write one JSONL result per item (id, success, output, error,
            category, tokens, attempts), as each finishes. Default:
            `results/<input>-<flow run>.results.jsonl`.
        config: Processor settings; fields not given keep the flow's defaults
            (`BatchFlowConfig`): items completed by an earlier run within 12 hours with the
            same prompt, context and strategy settings are not called again, and the run
            fails when more than 5% of its items fail.
        fresh: Recompute every item even if an earlier run completed it.
        preview: Only project the cost (prompt tokens counted, sampled above 200 items; with
            and without the context cache) and return it: no generate call, nothing billed.
        execution: How the calls are made for this run: standard (online, full price), flex
            (online on Gemini's Flex tier, half price, best effort) or batch (Gemini Batch
            Mode jobs, half price, results within 24 hours). Empty: the strategy's setting.

    Returns:
        A compact summary: counts, tokens, cache hit rate, cost, duration, output path.

    Raises:
        BatchFailedError: after the results file and artifacts are complete, when more items
            failed than `config.max_failed_fraction` allows, or every item failed.
    """
    if not input_exists(input):
        raise FileNotFoundError(
            f"Input file {input!r} not found. Pass input= a path or fsspec URL of a .jsonl or "
            ".csv file readable by the flow's process (nothing was sent to the LLM)."
        )
    destination = output or _default_output(input)
    check_output_path(input, destination)
    total = count_items(input)
    if total == 0:
        raise BatchFailedError(
            f"Input {input!r} has no items (no non-empty line). Nothing was sent to the LLM; "
            "check the path and the file's contents."
        )
    chosen, strategy_name = await _chosen_strategy(strategy)
    chosen = _for_this_run(_on_path(chosen, execution))
    updates: dict[str, Any] = {"artifact_key": config.artifact_key or _artifact_key_for(input)}
    if fresh:
        updates["refresh_cache"] = True
    config = config.model_copy(update=updates)
    pricing = _pricing_for(chosen)
    if preview:
        found = await preview_cost(
            input,
            chosen,
            pricing=pricing,
            concurrency=config.max_workers,
            artifact_key=config.artifact_key,
            artifacts=config.report_artifacts,
        )
        return found.summary()
    where = _absolute(destination)
    details = {
        "Input": _absolute(input),
        "Strategy": strategy_name,
        "Model": str(getattr(chosen, "model", None) or type(chosen).__name__),
        "Execution": str(getattr(chosen, "execution", "standard")),
        "Output": where,
    }
    started = time.monotonic()
    with ResultsWriter(destination) as writer:
        processor: ParallelBatchProcessor[Any, Any, Any] = ParallelBatchProcessor(
            config=config,
            on_result=writer.write,
            pricing=pricing,
            destination=where,
            report_details=details,
        )
        async with processor:
            batch = await processor.process_stream(_work_items(input, chosen), total=total)
    summary = batch.summary(pricing)
    summary["duration_seconds"] = round(time.monotonic() - started, 3)
    summary["output"] = destination
    _conclude(batch, where)
    return summary


async def _prepare_for_shards(lifecycle: StrategyLifecycle, strategy: LLMCallStrategy[Any]) -> None:
    """Prepare the shards' strategy once, retried as a batch retries it (a Gemini context
    cache is created here, and every shard run adopts it). A failure is logged, not raised:
    each shard then prepares it itself and gives every item its result, as a batch whose
    preparation failed does."""
    try:
        await lifecycle.ensure_prepared(strategy)
    except Exception as exc:  # the shards report it per item
        get_run_logger().warning(
            "Preparing %s before the shards failed (%s); each shard prepares it itself",
            type(strategy).__name__,
            describe(exc),
        )


async def _check_deployment(name: str) -> None:
    """The shard deployment exists (checked before anything is prepared or billed)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        async with get_client() as client:
            await client.read_deployment_by_name(name)
    except (ObjectNotFound, ValueError):
        raise ValueError(
            f"shard_deployment={name!r}: no such deployment. Name a deployment of the "
            "batch-llm flow as 'flow-name/deployment-name' (see `prefect deployment ls`), "
            "e.g. 'batch-llm/file-batch' from prefect.yaml (`prefect deploy --all`)."
        ) from None


@flow(name="batch-llm-sharded")
async def batch_llm_sharded(
    input: str,
    strategy: StrategyParameter = "gemini-cached-strategy/handbook-qa",
    output: str | None = None,
    shards: Annotated[int, Field(ge=1)] = 2,
    shard_deployment: str = "batch-llm/file-batch",
    config: FlowConfig = DEFAULT_FLOW_CONFIG,
    fresh: bool = False,
    execution: Execution | None = None,
) -> dict[str, Any]:
    """Run one batch as `shards` runs of a batch deployment, on the work pool's workers.

    The input is dealt into shard files beside the output (`<output>.shards/`), each shard
    runs as a child run of this one (`run_deployment(..., as_subflow=True)`), and the shards'
    results become one results file and one report here, with one outcome. Shard files and
    results must be where the workers can read and write them (one machine, a shared disk or
    an fsspec URL). Running the flow again re-runs every shard, and each resumes: completed
    items are not billed again.

    Args:
        input: The items (as for `batch-llm`).
        strategy: The saved strategy block (`block-type-slug/block-name`, or picked).
        output: The combined results file (default `results/<input>-<flow run>.results.jsonl`).
        shards: How many shard runs (e.g. the number of worker processes).
        shard_deployment: The `batch-llm` deployment that runs each shard.
        config: Processor settings for every shard (as for `batch-llm`).
        fresh: Recompute every item.
        execution: The execution path for every shard (as for `batch-llm`).

    Raises:
        BatchFailedError: after the combined results and report are written, when more items
            failed than `config.max_failed_fraction` allows.
    """
    from prefect.artifacts import acreate_markdown_artifact

    from prefect_batch_llm._reporting import markdown_report
    from prefect_batch_llm.files.shards import shard_results, split_input
    from prefect_batch_llm.results import ResultTotals

    logger = get_run_logger()
    if not input_exists(input):
        raise FileNotFoundError(f"Input file {input!r} not found (nothing was sent to the LLM).")
    destination = output or _default_output(input)
    check_output_path(input, destination)
    chosen, strategy_name = await _chosen_strategy(strategy)
    if strategy_name.endswith("/(unsaved block)"):
        raise ValueError(
            "Shard runs load the strategy by its block name: save the block first "
            "(`strategy.save('my-strategy')`) and pass 'block-type-slug/block-name', e.g. "
            "'gemini-cached-strategy/handbook-qa'."
        )
    await _check_deployment(shard_deployment)
    parts, invalid = split_input(input, f"{destination}.shards", shards)
    if not parts and not invalid:
        raise BatchFailedError(
            f"Input {input!r} has no items (no non-empty line). Nothing was sent to the LLM; "
            "check the path and the file's contents."
        )
    key = config.artifact_key or _artifact_key_for(input)
    logger.info(
        "%d item(s) in %d shard(s) of %s", sum(len(p.ids) for p in parts), len(parts), input
    )
    started = time.monotonic()
    shared = config.model_dump(mode="json", exclude_unset=True)

    async def run_shard(number: int, shard_input: str, shard_output: str) -> str:
        parameters = {
            "input": _absolute(shard_input),
            "strategy": strategy_name,
            "output": _absolute(shard_output),
            "config": {**shared, "artifact_key": f"{key}-shard-{number}"},
            "fresh": fresh,
            "execution": execution,
        }
        child: FlowRun = await run_deployment(  # type: ignore[misc]
            shard_deployment,
            parameters=parameters,
            as_subflow=True,
            timeout=None,
            tags=[SHARD_TAG],
        )
        state = child.state
        return f"{child.name}: {state.name if state else 'unknown'}"

    lost: list[str] = []

    async def follow_shard(number: int, shard_input: str, shard_output: str) -> str:
        """The shard run's outcome; if it cannot be followed to its end (the Prefect server
        unreachable), its items get resume results and the run may still be going."""
        try:
            return await run_shard(number, shard_input, shard_output)
        except Exception as exc:
            lost.append(f"shard {number}")
            logger.error("Lost track of shard %d's run: %s", number, describe(exc))
            return f"shard {number}: not followed to its end ({describe(exc)})"

    # Prepared once here, before any shard starts, so the shards adopt one context cache
    # instead of racing to create one each; cleaned up after every shard has ended.
    shared_strategy = _on_path(chosen, execution)
    lifecycle = StrategyLifecycle(config.retry)
    try:
        if parts:
            await _prepare_for_shards(lifecycle, shared_strategy)
        outcomes = await asyncio.gather(*(follow_shard(p.number, p.input, p.output) for p in parts))
    finally:
        if lost:  # their runs may still use the cache: leave it (and its TTL) to them
            logger.warning("Not cleaning up %s: %s may still be running", strategy_name, lost)
        else:
            await lifecycle.cleanup_all()  # logs a failed cleanup; the results still get written
    totals = ResultTotals()
    with ResultsWriter(destination) as writer:
        for result in invalid:
            totals.add(result)
            writer.write(result)
        for part, outcome in zip(parts, outcomes, strict=True):
            for result in shard_results(part, outcome):
                totals.add(result)
                writer.write(result)
    batch: BatchResult[Any, Any] = BatchResult(results=[], totals=totals)
    batch.duration = time.monotonic() - started
    batch.max_failed_fraction = config.max_failed_fraction
    pricing = _pricing_for(shared_strategy)
    where = _absolute(destination)
    details = {
        "Input": _absolute(input),
        "Strategy": strategy_name,
        "Shards": "; ".join(outcomes),
        "Output": where,
    }
    if config.report_artifacts:
        await acreate_markdown_artifact(
            markdown_report(batch, pricing, details),
            key=f"{key}-report",
            description="LLM batch report (every shard)",
        )
    summary = batch.summary(pricing)
    summary["output"] = destination
    summary["shards"] = outcomes
    unfinished = [outcome for outcome in outcomes if not outcome.endswith(": Completed")]
    for outcome in unfinished:
        logger.warning("Shard run %s", outcome)
    try:
        _conclude(batch, where)
    except BatchFailedError as exc:
        if not unfinished:
            raise
        raise BatchFailedError(
            f"{exc}. Shard run(s) that did not complete: {'; '.join(unfinished)}. Run this "
            "flow again with the same input and output to resume (completed items are not "
            "billed again)."
        ) from None
    return summary
