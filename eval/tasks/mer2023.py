"""Benchmark `mer2023`: a MER2023 label CSV `name,discrete[,valence]`.

The CSV is read without looking for media, with `read_mer2023`'s row rules (the same
`mer2023_label_rows`). Rows with an empty `discrete` are unlabelled: they are skipped (a warning counts
them) and need no prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.tasks.classification import Reference, score_classification
from eval.tasks.common import EvalOptions, listed_ids
from mllm_mer.data.readers import mer2023_label_rows
from mllm_mer.data.schema import MER2023_LABELS


def read_mer2023_references(path: Path, warnings: list[str]) -> list[Reference]:
    """Labelled rows of a MER2023 label CSV (`name,discrete[,valence]`), media not needed.

    Same row rules as `read_mer2023` (`readers.mer2023_label_rows`): header with `name` and `discrete`,
    field counts, non-empty unique names, labels in `MER2023_LABELS` after `.strip().lower()`.

    Args:
        path: the label CSV.
        warnings: receives one line when rows with an empty `discrete` are skipped.
    Returns:
        The labelled rows in file order.
    Raises:
        ValueError: a missing file or a bad row (naming the file and line).
    """
    refs, unlabelled = [], []
    for _, name, label in mer2023_label_rows(path):
        if label:
            refs.append(Reference(id=name, label=label))
        else:
            unlabelled.append(name)
    if unlabelled:
        warnings.append(
            f"{path}: skipped {len(unlabelled)} row(s) with an empty 'discrete': {listed_ids(unlabelled)}"
        )
    return refs


def evaluate_mer2023(opts: EvalOptions) -> dict[str, Any]:
    """Score predictions against a MER2023 label CSV.

    Returns:
        The classification result (weighted F1 is the MER2023 headline).
    """
    warnings: list[str] = []
    refs = read_mer2023_references(opts.references, warnings)
    return score_classification("mer2023", refs, MER2023_LABELS, opts, [opts.references], warnings)
