"""Runs the batch flow once (a test kills it mid-run, then runs it again)."""

import asyncio
import json
import sys

from prefect_batch_llm import ProcessorConfig
from prefect_batch_llm.flows import batch_llm

if __name__ == "__main__":
    source, strategy, output = sys.argv[1:4]
    config = ProcessorConfig(max_workers=4, cache_results=True, report_artifacts=False)
    summary = asyncio.run(batch_llm(input=source, strategy=strategy, output=output, config=config))
    print(json.dumps(summary))
