"""An example data pipeline that uses the batch flow as a subflow.

load documents  ->  batch-llm (subflow: one task run per document)  ->  store summaries

    prefect deployment run 'summarize-documents/summarize-documents' \
        --param source=flows/data/handbook.txt
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from prefect import flow, task

from prefect_batch_llm.flows import DEFAULT_FLOW_CONFIG, batch_llm


@task
def load_documents(source: str, workdir: str) -> str:
    """Split a text file into documents (one per paragraph) and write them as batch input."""
    paragraphs = [p.strip() for p in Path(source).read_text(encoding="utf-8").split("\n\n")]
    items = Path(workdir) / "documents.jsonl"
    items.parent.mkdir(parents=True, exist_ok=True)
    with items.open("w", encoding="utf-8") as out:
        for n, paragraph in enumerate(p for p in paragraphs if p):
            prompt = f"Summarize in one sentence:\n\n{paragraph}"
            out.write(json.dumps({"id": f"doc-{n:03d}", "prompt": prompt}) + "\n")
    return str(items)


@task
def store_summaries(results: str, destination: str) -> int:
    """Keep the successful summaries, keyed by document id."""
    summaries = {}
    for line in Path(results).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["success"]:
            summaries[record["id"]] = record["output"]
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    Path(destination).write_text(json.dumps(summaries, indent=2, sort_keys=True), encoding="utf-8")
    return len(summaries)


@flow(name="summarize-documents")
async def summarize_documents(
    source: str = "flows/data/handbook.txt",
    strategy: str = "gemini-strategy/gemini-flash",
    workdir: str = "results/pipeline",
) -> dict[str, object]:
    items = load_documents(source, workdir)
    summary = await batch_llm(
        input=items,
        strategy=strategy,
        output=f"{workdir}/summaries.results.jsonl",
        config=DEFAULT_FLOW_CONFIG,
    )
    stored = store_summaries(summary["output"], f"{workdir}/summaries.json")
    return {"documents": summary["total_items"], "stored": stored, "batch": summary}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(summarize_documents()), indent=2))
