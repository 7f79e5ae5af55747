"""Benchmark `ca-mer`: the CA-MER conflict subsets (`video_aligned`, `audio_aligned`, `consistent`).

References: a CA-MER root folder (`read_camer`, which requires the media files to exist;
`EvalOptions.camer_layout` says where annotations and media are) or our JSONL with `subset` fields
(audio dominance too when its rows carry `cues`).
"""

from __future__ import annotations

from typing import Any

from eval.tasks.classification import Reference, jsonl_references, score_classification
from eval.tasks.common import EvalOptions
from mllm_mer.data.paths import resolve_inside
from mllm_mer.data.readers import read_camer
from mllm_mer.data.schema import MER2023_LABELS, SUBSETS


def evaluate_camer(opts: EvalOptions) -> dict[str, Any]:
    """Score predictions on CA-MER (references: a CA-MER root folder, or our JSONL with `subset` fields).

    Returns:
        The classification result; `metrics.per_subset` holds the conflict subsets.
    """
    warnings: list[str] = []
    ref_path = opts.references
    if ref_path.is_dir():
        samples = read_camer(ref_path, layout=opts.camer_layout)
        refs = [Reference(id=s.id, label=s.label, subset=s.subset) for s in samples]
        ref_files = [
            resolve_inside(ref_path, opts.camer_layout.annotation.format(subset=s), what="CA-MER annotation")
            for s in SUBSETS
        ]
    elif ref_path.is_file():
        refs = jsonl_references(ref_path, MER2023_LABELS)
        ref_files = [ref_path]
        if not any(r.subset for r in refs):
            warnings.append(f"{ref_path}: no row has a 'subset'; the per-subset table is empty")
    else:
        raise FileNotFoundError(
            f"CA-MER references not found (need a root folder or a JSONL file): {ref_path}"
        )
    return score_classification("ca-mer", refs, MER2023_LABELS, opts, ref_files, warnings)
