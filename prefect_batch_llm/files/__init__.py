"""Batch inputs and outputs as files: stream JSONL/CSV items in, write JSONL results out.

`input` reads items one line at a time (a bad line fails alone); `output` writes one result
line per item to `<output>.partial` and replaces the output only when the batch completes.
"""

from prefect_batch_llm.files.input import (
    InputRecord,
    InvalidInput,
    RejectedInput,
    count_items,
    input_exists,
    read_input,
)
from prefect_batch_llm.files.output import (
    ResultsWriteError,
    ResultsWriter,
    check_output_path,
    result_line,
)

__all__ = [
    "InputRecord",
    "InvalidInput",
    "RejectedInput",
    "ResultsWriteError",
    "ResultsWriter",
    "check_output_path",
    "count_items",
    "input_exists",
    "read_input",
    "result_line",
]
