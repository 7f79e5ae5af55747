"""Classification metrics for discrete emotion labels, and the audio-dominance index on conflict samples.

`classification_metrics` reports what MER papers report: accuracy, weighted F1 (the MER2023 / MERTools
headline, `sklearn.metrics.f1_score(average="weighted")`), UAR (macro recall) and WAR (= accuracy),
plus a confusion matrix and per-subset numbers for the CA-MER conflict subsets. Predictions outside
the label set (an unparseable generation, "unknown") always count as wrong. The scores are computed in
numpy with scikit-learn's definitions (`tests/unit/test_metrics.py` checks them against scikit-learn), so
training never imports scikit-learn or SciPy.

`audio_dominance` measures, on samples whose audio and video cues disagree, how often the prediction
follows the audio cue rather than the video cue. `cue_accuracy` scores predictions against one modality's
own cue (e.g. audio-only answers against the audio cue, on clips whose voice display is at full intensity).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mllm_mer.data.schema import SUBSETS

UNKNOWN = "unknown"
"""Confusion-matrix column for predictions outside the label set."""


def _check_inputs(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> None:
    """Validate lengths, the label list and the ground truth vocabulary.

    Raises:
        ValueError: on empty input, length mismatch, duplicate labels, "unknown" in `labels`, or a
            ground-truth value outside `labels`.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}; they must match")
    if len(y_true) == 0:
        raise ValueError("classification_metrics needs at least one sample, got 0")
    if len(set(labels)) != len(labels) or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty list without duplicates, got {list(labels)}")
    if UNKNOWN in labels:
        raise ValueError(
            f"labels contains {UNKNOWN!r}, which is reserved for predictions outside the label set; "
            "rename that class"
        )
    label_set = set(labels)
    bad = sorted({t for t in y_true if t not in label_set})
    if bad:
        raise ValueError(f"ground-truth values {bad} are not in labels {list(labels)}")


def _confusion(y_true: list[str], y_pred: list[str], labels: list[str]) -> np.ndarray:
    """Confusion counts, shape (L, L) over `labels` order: [i, j] = #(true == labels[i], pred == labels[j]).

    Pairs whose truth or prediction is outside `labels` are not counted."""
    index = {label: i for i, label in enumerate(labels)}
    n = len(labels)
    t = np.array([index.get(v, -1) for v in y_true], dtype=np.int64)
    p = np.array([index.get(v, -1) for v in y_pred], dtype=np.int64)
    keep = (t >= 0) & (p >= 0)
    return np.bincount(t[keep] * n + p[keep], minlength=n * n).reshape(n, n)


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0.0 where den == 0 (scikit-learn's `zero_division=0`); float64 arrays."""
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _prf(y_true: list[str], y_pred: list[str], labels: list[str]) -> tuple[np.ndarray, ...]:
    """Per-label precision, recall, F1 and support over `labels`, each shape (L,), as scikit-learn's
    `precision_recall_fscore_support(labels=labels, zero_division=0)` computes them."""
    cm = _confusion(y_true, y_pred, labels)
    tp = np.diag(cm).astype(np.float64)
    true_sum = np.array([sum(v == label for v in y_true) for label in labels], dtype=np.float64)
    pred_sum = np.array([sum(v == label for v in y_pred) for label in labels], dtype=np.float64)
    precision = _divide(tp, pred_sum)
    recall = _divide(tp, true_sum)
    f1 = _divide(2 * tp, true_sum + pred_sum)
    return precision, recall, f1, true_sum


def _weighted(scores: np.ndarray, support: np.ndarray) -> float:
    """Support-weighted mean (scikit-learn's `average="weighted"`); 0.0 when no label has support."""
    if support.sum() == 0:
        return 0.0
    return float(np.average(scores, weights=support))


def _core_scores(y_true: list[str], y_pred: list[str], labels: list[str]) -> tuple[float, float]:
    """Accuracy and weighted F1 over `labels` (predictions outside `labels` are wrong)."""
    accuracy = float(np.mean([t == p for t, p in zip(y_true, y_pred, strict=True)]))
    _, _, f1, support = _prf(y_true, y_pred, labels)
    return accuracy, _weighted(f1, support)


def classification_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str],
    subsets: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Accuracy, weighted P/R/F1, UAR, WAR, confusion matrix and per-subset scores.

    Weighted averages weight each label by its support in `y_true` (scikit-learn's
    `average="weighted"`, `zero_division=0`), computed over `labels` only, so a prediction outside
    `labels` is a false negative for its true class and no class's false positive.

    Args:
        y_true: ground-truth labels, each a member of `labels`.
        y_pred: predicted labels, same length; any string (values outside `labels` count as wrong).
        labels: the label set, in the order used for the confusion matrix.
        subsets: optional subset name per sample (e.g. "consistent", "video_aligned", "audio_aligned");
            None entries belong to no subset.
    Returns:
        `{"n", "accuracy", "weighted_f1", "weighted_precision", "weighted_recall", "uar", "war",
        "confusion", "per_subset"}`. `uar` is the macro recall over the labels present in `y_true`;
        `war` equals `accuracy`. `confusion[i][j]` counts samples of true label `i` predicted as `j`,
        in `labels` order, with a last column (and an all-zero last row) `"unknown"` only when some
        prediction is outside `labels`. `per_subset` maps each subset that occurs to
        `{"n", "accuracy", "weighted_f1"}` (known subsets in `SUBSETS` order first, others after,
        in order of first appearance).
    Raises:
        ValueError: on empty input, mismatched lengths, bad `labels`, ground truth outside `labels`,
            or `subsets` of the wrong length.
    """
    y_true_l = list(y_true)
    y_pred_l = list(y_pred)
    labels_l = list(labels)
    _check_inputs(y_true_l, y_pred_l, labels_l)
    if subsets is not None and len(subsets) != len(y_true_l):
        raise ValueError(f"subsets has {len(subsets)} items but y_true has {len(y_true_l)}; they must match")

    accuracy, weighted_f1 = _core_scores(y_true_l, y_pred_l, labels_l)
    precision, recall, _, support = _prf(y_true_l, y_pred_l, labels_l)
    weighted_precision = _weighted(precision, support)
    weighted_recall = _weighted(recall, support)
    uar = float(np.mean(recall[support > 0]))  # macro recall over the labels present in y_true

    label_set = set(labels_l)
    has_unknown = any(p not in label_set for p in y_pred_l)
    cm_labels = labels_l + [UNKNOWN] if has_unknown else labels_l
    y_pred_cm = [p if p in label_set else UNKNOWN for p in y_pred_l]
    confusion = _confusion(y_true_l, y_pred_cm, cm_labels).tolist()

    per_subset: dict[str, dict[str, Any]] = {}
    if subsets is not None:
        seen = [s for s in dict.fromkeys(subsets) if s is not None]
        ordered = [s for s in SUBSETS if s in seen] + [s for s in seen if s not in SUBSETS]
        for name in ordered:
            idx = [i for i, s in enumerate(subsets) if s == name]
            sub_true = [y_true_l[i] for i in idx]
            sub_pred = [y_pred_l[i] for i in idx]
            sub_acc, sub_f1 = _core_scores(sub_true, sub_pred, labels_l)
            per_subset[name] = {"n": len(idx), "accuracy": sub_acc, "weighted_f1": sub_f1}

    return {
        "n": len(y_true_l),
        "accuracy": accuracy,
        "weighted_f1": weighted_f1,
        "weighted_precision": weighted_precision,
        "weighted_recall": weighted_recall,
        "uar": uar,
        "war": accuracy,
        "confusion": [[int(c) for c in row] for row in confusion],
        "per_subset": per_subset,
    }


def audio_dominance(
    y_pred: Sequence[str],
    audio_cues: Sequence[str | None],
    video_cues: Sequence[str | None],
) -> dict[str, Any]:
    """How often predictions follow the audio cue rather than the video cue when the two conflict.

    A conflict sample has both cues known (not None / "") and different. Among them,
    A = #(prediction == audio cue), V = #(prediction == video cue); predictions matching neither
    count in `n_conflict` only.

    Args:
        y_pred: predicted labels.
        audio_cues: the emotion the audio shows, per sample (None or "" when unknown).
        video_cues: the emotion the video shows, per sample (None or "" when unknown).
    Returns:
        `{"index": A / (A + V) or None when A + V == 0, "audio_follow": A, "video_follow": V,
        "n_conflict": number of conflict samples}`. 1.0 means fully audio-dominated, 0.0 fully
        video-dominated.
    Raises:
        ValueError: if the three sequences differ in length.
    """
    if not len(y_pred) == len(audio_cues) == len(video_cues):
        raise ValueError(
            f"y_pred, audio_cues and video_cues must have equal lengths, got "
            f"{len(y_pred)}, {len(audio_cues)}, {len(video_cues)}"
        )
    audio_follow = video_follow = n_conflict = 0
    for pred, audio, video in zip(y_pred, audio_cues, video_cues, strict=True):
        if not audio or not video or audio == video:
            continue
        n_conflict += 1
        audio_follow += int(pred == audio)
        video_follow += int(pred == video)
    total = audio_follow + video_follow
    return {
        "index": audio_follow / total if total else None,
        "audio_follow": audio_follow,
        "video_follow": video_follow,
        "n_conflict": n_conflict,
    }


def cue_accuracy(
    y_pred: Sequence[str],
    cues: Sequence[str | None],
    keep: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Accuracy of predictions against each sample's own cue of one modality (e.g. audio-only answers vs
    the audio cue), on the samples whose cue is known and, with `keep`, selected.

    Args:
        y_pred: predicted labels (anything outside the cues counts as wrong, "unknown" included).
        cues: that modality's cue per sample (None or "" when unknown: left out).
        keep: optional per-sample selection, e.g. only clips whose display of that modality is at full
            intensity (`mllm_mer.explanations.cue_mentions` of the reference explanation).
    Returns:
        `{"accuracy": correct / n or None when n == 0, "correct", "n"}`.
    Raises:
        ValueError: the sequences differ in length.
    """
    if len(y_pred) != len(cues) or (keep is not None and len(keep) != len(cues)):
        raise ValueError(
            f"y_pred, cues and keep must have equal lengths, got {len(y_pred)}, {len(cues)}"
            + (f", {len(keep)}" if keep is not None else "")
        )
    selected = [i for i, c in enumerate(cues) if c and (keep is None or keep[i])]
    correct = sum(y_pred[i] == cues[i] for i in selected)
    return {"accuracy": correct / len(selected) if selected else None, "correct": correct, "n": len(selected)}
