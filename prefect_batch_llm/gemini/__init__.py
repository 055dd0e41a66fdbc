"""Gemini: credentials, strategies (plain and context-cached) and the error classifier."""

from prefect_batch_llm.gemini.cached import GeminiCachedStrategy
from prefect_batch_llm.gemini.credentials import GeminiCredentials
from prefect_batch_llm.gemini.errors import (
    GeminiContentBlockedError,
    GeminiEmptyResponseError,
    GeminiErrorClassifier,
)
from prefect_batch_llm.gemini.pricing import GEMINI_PRICES, gemini_pricing
from prefect_batch_llm.gemini.strategy import GeminiStrategy

__all__ = [
    "GEMINI_PRICES",
    "GeminiCachedStrategy",
    "GeminiContentBlockedError",
    "GeminiCredentials",
    "GeminiEmptyResponseError",
    "GeminiErrorClassifier",
    "GeminiStrategy",
    "gemini_pricing",
]
