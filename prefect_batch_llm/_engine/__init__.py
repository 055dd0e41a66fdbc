"""The engine behind `ParallelBatchProcessor` (private: its names may change).

One path for every item, whatever the mode: `BatchRun` (batch_run.py) takes the item from
the `Source`, an item task or a chunk task (tasks.py, chunks.py) executes its attempts
through `ItemRun` (attempts.py), each failed attempt is judged by the pure `decide()`
(decision.py), and the final result comes back to `BatchRun`, which delivers it once.
"""

from prefect_batch_llm._engine.batch_run import BatchRun, ResultHandlerError
from prefect_batch_llm._engine.lifecycle import StrategyLifecycle, StrategyPrepareError
from prefect_batch_llm._engine.runtime import BatchRuntime, BatchStats
from prefect_batch_llm._engine.source import Source

__all__ = [
    "BatchRun",
    "BatchRuntime",
    "BatchStats",
    "ResultHandlerError",
    "Source",
    "StrategyLifecycle",
    "StrategyPrepareError",
]
