"""The unit of work: one prompt, the strategy that answers it, and context passed through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from prefect_batch_llm.strategy import LLMCallStrategy

TInput = TypeVar("TInput")
TOutput = TypeVar("TOutput")
TContext = TypeVar("TContext")


@dataclass
class LLMWorkItem(Generic[TInput, TOutput, TContext]):
    """One item of a batch.

    Attributes:
        item_id: Unique, non-empty id within the batch; names the item's Prefect task run.
        strategy: The strategy that makes the call. Share one instance across items so it
            is prepared once (one client, one context cache).
        prompt: What the strategy sends (usually a string).
        context: Anything you want back in the item's result, untouched.
    """

    item_id: str
    strategy: LLMCallStrategy[TOutput]
    prompt: TInput
    context: TContext | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.item_id, str) or not self.item_id.strip():
            raise ValueError(
                f"item_id must be a non-empty string (got {type(self.item_id).__name__}: "
                f"{self.item_id!r}). Give each work item a unique string id, e.g. f'doc-{{i}}'."
            )
        if self.strategy is None:
            raise ValueError(
                f"strategy must not be None for item {self.item_id!r}. Pass an LLMCallStrategy "
                "instance (share one instance across items)."
            )
        if not isinstance(self.strategy, LLMCallStrategy):
            raise ValueError(
                f"strategy for item {self.item_id!r} is a {type(self.strategy).__name__}, not an "
                "LLMCallStrategy. Subclass LLMCallStrategy (or StrategyBlock) and implement "
                "execute()."
            )
