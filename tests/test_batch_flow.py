"""The deployable batch flow: files in, results out, bad input reported, subflow use."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
from pydantic import SecretStr

from prefect_batch_llm import ProcessorConfig
from prefect_batch_llm.flows import batch_llm
from prefect_batch_llm.gemini import GeminiCredentials, GeminiStrategy
from prefect_batch_llm.testing import GeminiEmulator

REPO = Path(__file__).resolve().parents[1]
CONFIG = ProcessorConfig(max_workers=4, report_artifacts=False)


@pytest.fixture
async def emulator():
    with GeminiEmulator() as running:
        await GeminiStrategy(
            credentials=GeminiCredentials(api_key=SecretStr("k"), base_url=running.base_url)
        ).save("flow-test", overwrite=True)
        yield running


def read_results(path: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == len(records), "exactly one result line per item"
    return by_id


async def test_jsonl_batch_writes_one_result_per_line_and_reports_bad_lines(emulator, tmp_path):
    source = tmp_path / "items.jsonl"
    source.write_text(
        "\n".join(
            [
                json.dumps({"id": "a", "prompt": "first question", "team": "x"}),
                '{"id": "b", "prompt": "broken',  # line 2: malformed
                json.dumps({"id": "a", "prompt": "same id again"}),  # line 3: duplicate
                json.dumps({"id": "c", "prompt": "   "}),  # line 4: empty prompt
                json.dumps({"prompt": "no id here"}),  # line 5: gets id line-5
                json.dumps(["not", "an", "object"]),  # line 6
                json.dumps({"id": "d", "prompt": "last question", "context": {"k": 1}}),
            ]
        )
        + "\n"
    )
    output = tmp_path / "out" / "results.jsonl"
    summary = await batch_llm(
        input=str(source), strategy="gemini-strategy/flow-test", output=str(output), config=CONFIG
    )
    results = read_results(output)
    assert {k for k, r in results.items() if r["success"]} == {"a", "line-5", "d"}
    invalid = {k: r["error"] for k, r in results.items() if r["category"] == "invalid_input"}
    assert set(invalid) == {"line-2", "a@line-3", "c", "line-6"}
    assert "line 2: not valid JSON" in invalid["line-2"] and "fix the line" in invalid["line-2"]
    assert "duplicate id 'a' (first used on line 1)" in invalid["a@line-3"]
    assert "prompt is empty" in invalid["c"]
    assert "expected a JSON object" in invalid["line-6"]
    assert all(r["attempts"] == 1 for r in results.values())
    assert summary["total_items"] == 7 and summary["failed"] == 4
    assert summary["errors_by_category"] == {"invalid_input": 4}
    assert summary["output"] == str(output)
    assert emulator.stats()["generate_calls"] == 3, "bad lines never reach the LLM"
    assert results["a"]["tokens"]["input_tokens"] > 0


async def test_csv_input_with_context_columns(emulator, tmp_path):
    source = tmp_path / "items.csv"
    source.write_text("id,prompt,customer\n1,hello there,acme\n2,second row,globex\n")
    output = tmp_path / "results.jsonl"
    summary = await batch_llm(
        input=str(source), strategy="gemini-strategy/flow-test", output=str(output), config=CONFIG
    )
    assert summary["succeeded"] == 2 and set(read_results(output)) == {"1", "2"}


async def test_csv_without_a_prompt_column_reports_every_row_with_the_fix(emulator, tmp_path):
    source = tmp_path / "items.csv"
    source.write_text("id,question\n1,hello\n2,there\n")
    output = tmp_path / "results.jsonl"
    state = await batch_llm(
        input=str(source),
        strategy="gemini-strategy/flow-test",
        output=str(output),
        config=CONFIG,
        return_state=True,
    )
    results = read_results(output)
    assert state.is_failed() and "2 of 2 items failed (every item failed)" in state.message
    assert emulator.stats()["generate_calls"] == 0
    assert "no 'prompt' column (columns: id, question)" in results["1"]["error"]
    assert "rename the column" in results["2"]["error"]


async def test_missing_input_file_fails_before_any_llm_call(emulator, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found\. Pass input="):
        await batch_llm(
            input=str(tmp_path / "nope.jsonl"), strategy="gemini-strategy/flow-test", config=CONFIG
        )
    assert emulator.stats()["calls"] == {}


async def test_missing_strategy_block_says_how_to_create_it(emulator, tmp_path):
    source = tmp_path / "items.jsonl"
    source.write_text(json.dumps({"id": "a", "prompt": "q"}) + "\n")
    with pytest.raises(
        ValueError, match=r"No strategy block .gemini-strategy/absent.*create_blocks"
    ):
        await batch_llm(input=str(source), strategy="gemini-strategy/absent", config=CONFIG)
    with pytest.raises(ValueError, match="block-type-slug/block-name"):
        await batch_llm(input=str(source), strategy="just-a-name", config=CONFIG)
    assert emulator.stats()["calls"] == {}


async def test_fsspec_urls_for_input_and_output(emulator):
    with fsspec.open("memory://batch/in.jsonl", "w") as handle:
        for i in range(5):
            handle.write(json.dumps({"id": f"m{i}", "prompt": f"question {i}"}) + "\n")
    summary = await batch_llm(
        input="memory://batch/in.jsonl",
        strategy="gemini-strategy/flow-test",
        output="memory://batch/out.jsonl",
        config=CONFIG,
    )
    with fsspec.open("memory://batch/out.jsonl", "r") as handle:
        lines = handle.read().splitlines()
    assert summary["succeeded"] == 5 and len(lines) == 5


async def test_pipeline_runs_the_batch_flow_as_a_subflow(emulator, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    import sys

    sys.path.insert(0, str(REPO))
    from flows.pipeline import summarize_documents

    source = tmp_path / "docs.txt"
    source.write_text("First paragraph about returns.\n\nSecond one about refunds.\n\nThird.")
    result = await summarize_documents(
        source=str(source), strategy="gemini-strategy/flow-test", workdir=str(tmp_path / "work")
    )
    assert result["documents"] == 3 and result["stored"] == 3
    stored = json.loads((tmp_path / "work" / "summaries.json").read_text())
    assert set(stored) == {"doc-000", "doc-001", "doc-002"}


@pytest.mark.parametrize(
    ("deployment_name", "input_path", "expected"),
    [
        ("file-batch", "flows/data/questions.jsonl", "batch-llm-file-batch"),
        ("Nightly Run #2", "x.csv", "batch-llm-nightly-run-2"),
        (None, "s3://bucket/dir/Q3 Questions.jsonl?v=1", "batch-llm-q3-questions"),
        (None, "/tmp/___.jsonl", "batch-llm"),
    ],
)
def test_artifact_keys_are_per_deployment_or_per_input(
    monkeypatch, deployment_name, input_path, expected
):
    from prefect_batch_llm import flows

    monkeypatch.setattr(flows, "deployment", type("D", (), {"name": deployment_name}))
    assert flows._artifact_key_for(input_path) == expected


def test_the_run_form_has_a_block_picker_and_no_library_settings_or_doc_markup():
    from prefect.utilities.callables import parameter_schema

    from prefect_batch_llm.flows import batch_llm

    schema = parameter_schema(batch_llm).model_dump(by_alias=True)
    choices = schema["properties"]["strategy"]["anyOf"]
    picked = [schema["definitions"][c["$ref"].split("/")[-1]] for c in choices if "$ref" in c]
    assert {d["block_type_slug"] for d in picked} == {
        "gemini-strategy",
        "gemini-cached-strategy",
        "pydantic-ai-strategy",
    }, "a block picker per strategy block type"
    assert {"type": "string"} in choices, "slug/name strings still work from the CLI"
    config = schema["definitions"]["BatchFlowConfig"]["properties"]
    assert not {"keep_results", "progress_bar"} & set(config)
    assert not {"keep_results", "progress_bar"} & set(schema["properties"]["config"]["default"])
    assert "][" not in json.dumps(schema), "no mkdocs cross-reference markup in descriptions"


def test_the_run_form_offers_the_execution_path_and_non_gemini_strategies_refuse_it():
    from helpers import ScriptedStrategy
    from prefect.utilities.callables import parameter_schema

    from prefect_batch_llm.flows import _on_path

    schema = parameter_schema(batch_llm).model_dump(by_alias=True)
    execution = schema["properties"]["execution"]
    assert {"enum": ["standard", "flex", "batch"], "type": "string"} in execution["anyOf"]
    assert execution["default"] is None, "empty: the strategy's own setting"
    saved = GeminiStrategy(execution="flex")
    assert _on_path(saved, "batch").execution == "batch"  # type: ignore[attr-defined]
    assert saved.execution == "flex", "the block itself is unchanged"
    assert _on_path(saved, None) is saved
    with pytest.raises(ValueError, match="only Gemini strategies run on the flex or batch path"):
        _on_path(ScriptedStrategy(), "batch")
