"""Benchmark `synthetic`: our synthetic conflict set.

References: our sample JSONL (media need not exist), MER2023 labels. Per-subset scores come from the
rows' `subset`, audio dominance from their `cues`. When the predictions carry generated text (`text`), the
explanation quality is scored too (`mllm_mer.explanations.explanation_quality`: did each explanation name
the clip's designed face cue and voice cue, their intensity words, and a label that parses), overall and
per subset: a deterministic stand-in for EMER's clue overlap, possible because the clips have designed cues.
"""

from __future__ import annotations

from typing import Any

from eval.tasks.classification import jsonl_references, score_classification
from eval.tasks.common import EvalOptions
from eval.tasks.predictions import read_predictions
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.explanations import explanation_quality


def evaluate_synthetic(opts: EvalOptions) -> dict[str, Any]:
    """Score predictions on our synthetic conflict set (references: its JSONL, media not needed).

    Returns:
        The classification result (see `score_classification`), with `audio_dominance` from the cues and,
        when rows have generated `text`, `explanations` (`explanation_quality` without its per-text
        mentions, over the references that have a prediction with text).
    """
    refs = jsonl_references(opts.references, MER2023_LABELS)
    result = score_classification("synthetic", refs, MER2023_LABELS, opts, [opts.references])
    preds = read_predictions(opts.predictions)
    samples = [s for s in read_jsonl(opts.references, MER2023_LABELS, check_files=False)
               if s.id in preds and preds[s.id].text]
    if samples:
        quality = explanation_quality([preds[s.id].text for s in samples], samples, MER2023_LABELS)
        quality.pop("mentions")
        result["explanations"] = quality
    return result
