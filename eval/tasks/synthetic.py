"""Benchmark `synthetic`: our synthetic conflict set.

References: our sample JSONL (media need not exist), MER2023 labels. Per-subset scores come from the
rows' `subset`, audio dominance from their `cues`.
"""

from __future__ import annotations

from typing import Any

from eval.tasks.classification import jsonl_references, score_classification
from eval.tasks.common import EvalOptions
from mllm_mer.data.schema import MER2023_LABELS


def evaluate_synthetic(opts: EvalOptions) -> dict[str, Any]:
    """Score predictions on our synthetic conflict set (references: its JSONL, media not needed).

    Returns:
        The classification result (see `score_classification`), with `audio_dominance` from the cues.
    """
    refs = jsonl_references(opts.references, MER2023_LABELS)
    return score_classification("synthetic", refs, MER2023_LABELS, opts, [opts.references])
