"""Runs the batch flow once (a test kills it mid-run, then runs it again).

Arguments: input, strategy, output, and optionally a JSON object of further flow
arguments (`config` fields are merged into the script's config).
"""

import asyncio
import json
import sys

from prefect_batch_llm import ProcessorConfig
from prefect_batch_llm.flows import batch_llm

if __name__ == "__main__":
    source, strategy, output = sys.argv[1:4]
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    settings = {"max_workers": 4, "cache_results": True, "report_artifacts": False}
    config = ProcessorConfig(**(settings | extra.pop("config", {})))
    summary = asyncio.run(
        batch_llm(input=source, strategy=strategy, output=output, config=config, **extra)
    )
    print(json.dumps(summary))
