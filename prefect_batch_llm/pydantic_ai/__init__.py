"""pydantic-ai agents as strategies: `PydanticAIStrategy` and its error classifier."""

from prefect_batch_llm.pydantic_ai.errors import PydanticAIErrorClassifier
from prefect_batch_llm.pydantic_ai.strategy import PydanticAIStrategy

__all__ = ["PydanticAIErrorClassifier", "PydanticAIStrategy"]
