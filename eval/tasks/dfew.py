"""Benchmark `dfew`: a DFEW split CSV `video_name,label` (label ids 1..7 = `DFEW_LABELS`).

The CSV is read without media, with `read_dfew`'s row rules (the same `dfew_label_rows`). Numeric
names are zero-padded to 5 digits on both sides (`dfew_id`: `1` and `00001` are the same clip, as in
`read_dfew`); a predicted label may be a name or an id 1..7.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.tasks.classification import Reference, score_classification
from eval.tasks.common import EvalOptions
from mllm_mer.data.readers import DFEW_LABELS, dfew_id, dfew_label_rows


def _dfew_label(raw: str) -> str:
    """A predicted DFEW label: a label name, or an id 1..7."""
    label = raw.strip().lower()
    if label.isdigit() and 1 <= int(label) <= len(DFEW_LABELS):
        return DFEW_LABELS[int(label) - 1]
    return label


def read_dfew_references(path: Path) -> list[Reference]:
    """Rows of a DFEW split CSV (`video_name,label`, ids 1..7), media not needed (`read_dfew`'s row rules).

    Raises:
        ValueError: a missing file or a bad row (naming the file and line).
    """
    return [Reference(id=sid, label=label) for _, _, sid, label in dfew_label_rows(path)]


def evaluate_dfew(opts: EvalOptions) -> dict[str, Any]:
    """Score predictions against a DFEW split CSV (UAR and WAR are the DFEW headline).

    Returns:
        The classification result over `DFEW_LABELS`.
    """
    refs = read_dfew_references(opts.references)
    return score_classification(
        "dfew", refs, DFEW_LABELS, opts, [opts.references], id_key=dfew_id, normalize=_dfew_label
    )
