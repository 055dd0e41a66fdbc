"""Run large batches of LLM calls as Prefect tasks.

Strategies (how a call is made) are Prefect blocks; each work item is a task run whose
retries follow an error classifier; a flow-level context manager prepares each shared
strategy once and cleans it up once; results account for every token billed.
"""

from importlib.metadata import PackageNotFoundError, version

from prefect_batch_llm._engine import ResultHandlerError
from prefect_batch_llm.batch_mode import BatchJobError, BatchJobs, JobState, JobStatus
from prefect_batch_llm.callable import CallableStrategy
from prefect_batch_llm.config import ProcessorConfig, RetryConfig
from prefect_batch_llm.errors import (
    CacheExpiredError,
    DefaultErrorClassifier,
    ErrorCategory,
    ErrorClassifier,
    ErrorInfo,
    FrameworkTimeoutError,
    LLMCallError,
    OutputValidationError,
    PermanentError,
    RateLimitError,
    TransientError,
)
from prefect_batch_llm.gemini import (
    GeminiCachedStrategy,
    GeminiCredentials,
    GeminiErrorClassifier,
    GeminiStrategy,
)
from prefect_batch_llm.items import LLMWorkItem
from prefect_batch_llm.preview import CostPreview, preview_cost, project_cost
from prefect_batch_llm.processor import ParallelBatchProcessor, ProcessingStats
from prefect_batch_llm.pydantic_ai import PydanticAIErrorClassifier, PydanticAIStrategy
from prefect_batch_llm.results import (
    BatchFailedError,
    BatchOutcome,
    BatchResult,
    ModelPricing,
    TokenUsage,
    WorkItemResult,
)
from prefect_batch_llm.strategy import PRICE_PATH, LLMCallStrategy, RetryState, StrategyBlock

try:
    __version__ = version("prefect-batch-llm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "PRICE_PATH",
    "BatchFailedError",
    "BatchJobError",
    "BatchJobs",
    "BatchOutcome",
    "BatchResult",
    "CacheExpiredError",
    "CallableStrategy",
    "CostPreview",
    "DefaultErrorClassifier",
    "ErrorCategory",
    "ErrorClassifier",
    "ErrorInfo",
    "FrameworkTimeoutError",
    "GeminiCachedStrategy",
    "GeminiCredentials",
    "GeminiErrorClassifier",
    "GeminiStrategy",
    "JobState",
    "JobStatus",
    "LLMCallError",
    "LLMCallStrategy",
    "LLMWorkItem",
    "ModelPricing",
    "OutputValidationError",
    "ParallelBatchProcessor",
    "PermanentError",
    "ProcessingStats",
    "ProcessorConfig",
    "PydanticAIErrorClassifier",
    "PydanticAIStrategy",
    "RateLimitError",
    "ResultHandlerError",
    "RetryConfig",
    "RetryState",
    "StrategyBlock",
    "TokenUsage",
    "TransientError",
    "WorkItemResult",
    "__version__",
    "preview_cost",
    "project_cost",
]
