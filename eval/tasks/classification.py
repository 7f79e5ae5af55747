"""Scoring shared by the classification benchmarks (synthetic, ca-mer, mer2023, dfew).

`score_classification` matches predictions to labelled `Reference`s and computes the metrics per
subset, audio dominance when the references carry cues, per-path metrics from `probs`, the DnR
component-ablation means and DCR's fuse-or-drop report. A row without `label` has its `text` parsed
with `parse_label` in `EvalOptions.labels_mode`; `EvalOptions.reparse` parses `text` even when `label`
is present. Predicted labels are compared after `.strip().lower()` unless the task passes its own
`normalize`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.tasks.common import MAX_LISTED, EvalOptions, match_ids, result_inputs
from eval.tasks.predictions import PredictionRow, read_predictions
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.fusion.dcr.ada import ARMS
from mllm_mer.fusion.dcr.report import fuse_or_drop_report
from mllm_mer.labels import UNKNOWN_LABEL, parse_label
from mllm_mer.metrics import audio_dominance, classification_metrics


@dataclass(frozen=True)
class Reference:
    """One labelled reference sample of a classification task.

    Attributes:
        id: sample id (matched against prediction ids).
        label: ground-truth label, a member of the task's label set.
        subset: conflict subset or None.
        cues: per-modality cue labels ({"video", "audio", "text"}) when known.
    """

    id: str
    label: str
    subset: str | None = None
    cues: Mapping[str, str] = field(default_factory=dict)


def jsonl_references(path: Path, labels: Sequence[str]) -> list[Reference]:
    """Labelled references from our sample JSONL (`check_files=False`: media need not exist)."""
    samples = read_jsonl(path, labels, check_files=False)
    return [Reference(id=s.id, label=s.label, subset=s.subset, cues=dict(s.cues)) for s in samples]


def _dnr_ablation_summary(rows: Sequence[PredictionRow]) -> dict[str, Any] | None:
    """Mean KL and mean predicted-class probability drop per DnR component over the rows that have them."""
    table = [row.dnr_ablation for row in rows if row.dnr_ablation]
    if not table:
        return None
    components = list(dict.fromkeys(c for t in table for c in t))
    means = {
        c: {k: sum(t[c][k] for t in table if c in t) / sum(c in t for t in table) for k in ("kl", "delta_p")}
        for c in components
    }
    return {"n": len(table), "components": means}


def _rekey(rows: Mapping[str, PredictionRow], key: Callable[[str], str]) -> dict[str, PredictionRow]:
    """Re-key predictions by a normalised id, refusing two rows that normalise to the same id."""
    out: dict[str, PredictionRow] = {}
    for sid, row in rows.items():
        new = key(sid)
        if new in out:
            raise ValueError(
                f"{row.where}: id {sid!r} is the same clip as {out[new].where} (both are {new!r})"
            )
        out[new] = row
    return out


def _predicted_label(
    row: PredictionRow, labels: Sequence[str], opts: EvalOptions, normalize: Callable[[str], str]
) -> str:
    """The row's label (normalised), or its `text` parsed in `opts.labels_mode`."""
    if row.label is not None and not opts.reparse:
        return normalize(row.label)
    if row.text is None:
        need = "'text' to re-parse (reparse is on)" if row.label is not None else "'label' or 'text'"
        raise ValueError(f"{row.where}: the row has no {need}")
    return parse_label(row.text, labels, opts.labels_mode)


def _argmax(dist: Mapping[str, float], labels: Sequence[str], where: str) -> str:
    """Label with the highest probability (first in `labels` order on ties)."""
    outside = sorted(set(dist) - set(labels))
    if outside:
        raise ValueError(f"{where}: probs name labels {outside} outside the label set {list(labels)}")
    return max((label for label in labels if label in dist), key=lambda label: dist[label])


def _fuse_or_drop(
    preds: Mapping[str, PredictionRow],
    refs: Sequence[Reference],
    labels: Sequence[str],
    subsets: list[str | None] | None,
    warnings: list[str],
) -> dict[str, Any] | None:
    """DCR's fuse-or-drop report (`mllm_mer.fusion.dcr.report`) when every reference has a prediction with
    probabilities of every arm (fused, text, audio, video); arm choices when every row has an `arm`."""
    rows = [preds.get(r.id) for r in refs]
    complete = [row is not None and bool(row.probs) and all(a in row.probs for a in ARMS) for row in rows]
    if not any(complete):
        return None
    if not all(complete):
        warnings.append(f"some predictions lack probs of the DCR paths {list(ARMS)}; no fuse-or-drop report")
        return None
    path_preds = {a: [_argmax(row.probs[a], labels, row.where) for row in rows] for a in ARMS}
    arms = [row.arm for row in rows]
    if any(a is None for a in arms):
        if any(a is not None for a in arms):
            warnings.append(
                "some predictions lack the arbiter's 'arm'; the fuse-or-drop report omits the arbiter"
            )
        arms = None
    return fuse_or_drop_report([r.label for r in refs], path_preds, subsets, arms)


def _per_path(
    preds: Mapping[str, PredictionRow],
    refs: Sequence[Reference],
    labels: Sequence[str],
    subsets: list[str | None] | None,
    warnings: list[str],
) -> dict[str, dict[str, Any]]:
    """Metrics of each `probs` path's argmax; paths not on every predicted row are skipped with a warning."""
    rows = [preds[r.id] for r in refs if r.id in preds]
    if not any(row.probs for row in rows):
        return {}
    all_paths = list(dict.fromkeys(p for row in rows for p in (row.probs or {})))
    common = [p for p in all_paths if all(row.probs and p in row.probs for row in rows)]
    skipped = [p for p in all_paths if p not in common]
    if skipped:
        warnings.append(
            f"probs path(s) {skipped} are missing on some predictions; no per-path metrics for them"
        )
    y_true = [r.label for r in refs]
    out: dict[str, dict[str, Any]] = {}
    for path_name in common:
        y_pred = []
        for r in refs:
            row = preds.get(r.id)
            dist = row.probs.get(path_name) if row is not None and row.probs else None
            y_pred.append(UNKNOWN_LABEL if dist is None else _argmax(dist, labels, row.where))
        out[path_name] = classification_metrics(y_true, y_pred, labels, subsets)
    return out


def _lower(label: str) -> str:
    return label.strip().lower()


def score_classification(
    task: str,
    refs: Sequence[Reference],
    labels: Sequence[str],
    opts: EvalOptions,
    ref_files: Sequence[Path],
    warnings: list[str] | None = None,
    *,
    id_key: Callable[[str], str] | None = None,
    normalize: Callable[[str], str] = _lower,
) -> dict[str, Any]:
    """Match predictions to labelled references and compute every classification number.

    Args:
        task: task name recorded in the result.
        refs: labelled references.
        labels: the task's label set (confusion-matrix order).
        opts: evaluation options.
        ref_files: the reference files read (hashed into `inputs.sha256`).
        warnings: warnings collected so far (reference reading); more are appended.
        id_key: normalises prediction ids before matching (DFEW zero-padding).
        normalize: maps a written predicted label to a label-set name.
    Returns:
        `{"task", "n", "labels", "labels_mode", "metrics", ["audio_dominance"], ["per_path"],
        ["dnr_ablation"], "inputs", "warnings"}`; see `classification_metrics` and `audio_dominance` for
        the inner dicts; `dnr_ablation` is `{"n", "components": {component: {"kl", "delta_p"}}}` (means).
    Raises:
        ValueError: bad prediction rows or ids (see the module docstring).
    """
    warnings = [] if warnings is None else warnings
    if not refs:
        raise ValueError(f"{opts.references}: no labelled reference samples to score")
    preds = read_predictions(opts.predictions)
    if id_key is not None:
        preds = _rekey(preds, id_key)
    missing = match_ids(preds, [r.id for r in refs], opts, warnings)
    y_true = [r.label for r in refs]
    y_pred = [
        UNKNOWN_LABEL if r.id in missing else _predicted_label(preds[r.id], labels, opts, normalize)
        for r in refs
    ]
    label_set = set(labels)
    outside = [
        (r.id, p) for r, p in zip(refs, y_pred, strict=True) if p not in label_set and r.id not in missing
    ]
    if outside:
        shown = ", ".join(f"{sid!r}: {p!r}" for sid, p in outside[:MAX_LISTED])
        warnings.append(f"{len(outside)} prediction(s) outside the label set, scored as wrong: {{{shown}}}")
    subsets = [r.subset for r in refs] if any(r.subset for r in refs) else None
    result: dict[str, Any] = {
        "task": task,
        "n": len(refs),
        "labels": list(labels),
        "labels_mode": opts.labels_mode,
        "metrics": classification_metrics(y_true, y_pred, labels, subsets),
    }
    if any(r.cues.get("audio") and r.cues.get("video") for r in refs):
        result["audio_dominance"] = audio_dominance(
            y_pred, [r.cues.get("audio") for r in refs], [r.cues.get("video") for r in refs]
        )
    per_path = _per_path(preds, refs, labels, subsets, warnings)
    if per_path:
        result["per_path"] = per_path
    dnr_ablation = _dnr_ablation_summary([preds[r.id] for r in refs if r.id in preds])
    if dnr_ablation:
        result["dnr_ablation"] = dnr_ablation
    fuse_or_drop = _fuse_or_drop(preds, refs, labels, subsets, warnings)
    if fuse_or_drop:
        result["fuse_or_drop"] = fuse_or_drop
    result["inputs"] = result_inputs(opts, ref_files)
    result["warnings"] = warnings
    return result
