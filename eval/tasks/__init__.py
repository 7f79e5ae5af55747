"""Benchmark drivers behind `scripts/evaluate.py`: read predictions and references, match ids, score.

`TASKS` maps each task name to one function `(EvalOptions) -> dict`; the dict is OUT.json, ready for
`json.dumps` and `eval.report.write_report`. One module per benchmark, on a shared base:

- `predictions.py`: the prediction files (JSONL as written by `scripts/generate.py`, or CSV);
- `common.py`: `EvalOptions`, the id matching rules every task applies (`match_ids`), input hashes;
- `classification.py`: `score_classification`, shared by the four classification tasks;
- `synthetic.py` (``synthetic``), `camer.py` (``ca-mer``), `mer2023.py` (``mer2023``), `dfew.py`
  (``dfew``), `emer.py` (``emer-ov``, ``emer-judge``): each docstring says what its references are.

The MER2023, DFEW and EMER CSVs are read with `mllm_mer.data.readers`' row readers
(`mer2023_label_rows`, `dfew_label_rows`, `named_csv_rows`; ids via `sample_name`) so the validation
rules cannot drift from the dataset readers.

All input problems raise `ValueError` (or `FileNotFoundError` for a missing file); the script turns
them into ``error: ...`` and exit code 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eval.tasks.camer import evaluate_camer
from eval.tasks.classification import Reference, score_classification
from eval.tasks.common import EMER_LANGUAGES, JUDGES, MAX_LISTED, EvalOptions, match_ids, sha256_file
from eval.tasks.dfew import evaluate_dfew, read_dfew_references
from eval.tasks.emer import build_scorer, evaluate_emer_judge, evaluate_emer_ov, read_emer_references
from eval.tasks.mer2023 import evaluate_mer2023, read_mer2023_references
from eval.tasks.predictions import PredictionRow, read_predictions
from eval.tasks.synthetic import evaluate_synthetic

TASKS: dict[str, Callable[[EvalOptions], dict[str, Any]]] = {
    "synthetic": evaluate_synthetic,
    "ca-mer": evaluate_camer,
    "emer-ov": evaluate_emer_ov,
    "emer-judge": evaluate_emer_judge,
    "mer2023": evaluate_mer2023,
    "dfew": evaluate_dfew,
}
"""Task name (the CLI's first argument) -> evaluation function."""


def run_task(task: str, opts: EvalOptions) -> dict[str, Any]:
    """Run one task by name.

    Raises:
        ValueError: unknown task name (listing the valid ones), or any input problem of the task.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} unknown; valid: {list(TASKS)}")
    return TASKS[task](opts)


__all__ = [
    "EMER_LANGUAGES",
    "JUDGES",
    "MAX_LISTED",
    "TASKS",
    "EvalOptions",
    "PredictionRow",
    "Reference",
    "build_scorer",
    "evaluate_camer",
    "evaluate_dfew",
    "evaluate_emer_judge",
    "evaluate_emer_ov",
    "evaluate_mer2023",
    "evaluate_synthetic",
    "match_ids",
    "read_dfew_references",
    "read_emer_references",
    "read_mer2023_references",
    "read_predictions",
    "run_task",
    "score_classification",
    "sha256_file",
]
