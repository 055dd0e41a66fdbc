"""Deployment entrypoint of the general batch flow (defined in `prefect_batch_llm.flows`).

prefect deployment run 'batch-llm/file-batch' --param input=flows/data/questions.jsonl
python flows/batch.py flows/data/questions.jsonl     # run once, locally
"""

from __future__ import annotations

import asyncio
import json
import sys

from prefect_batch_llm.flows import batch_llm, batch_llm_sharded

__all__ = ["batch_llm", "batch_llm_sharded"]

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python flows/batch.py INPUT [STRATEGY_BLOCK]")
    parameters = {"input": sys.argv[1]}
    if len(sys.argv) > 2:
        parameters["strategy"] = sys.argv[2]
    print(json.dumps(asyncio.run(batch_llm(**parameters)), indent=2))
