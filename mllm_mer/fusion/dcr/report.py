"""Fuse-or-drop report: the arbiter's arm choices and the baselines it is judged against, per subset.

From each sample's per-path predicted label (argmax of its probabilities), the ground truth and, when an
arbiter ran, the arm it chose:

- `always_fuse`: accuracy of the fused path;
- `best_single`: the unimodal path (text, audio or video) with the best accuracy over ALL samples, scored
  per subset with that one fixed path (a choice made with the labels, so an optimistic baseline);
- `oracle`: a sample counts as correct when any arm is (the ceiling of any per-sample choice);
- `arbiter`: accuracy of the chosen arms, and `arm_share` {arm: share of samples} (with arm choices only);
- `per_path`: accuracy of every arm.

Subsets come from the references (CA-MER / synthetic: consistent, video_aligned, audio_aligned); "all"
covers every sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mllm_mer.data.schema import SUBSETS
from mllm_mer.fusion.dcr.ada import ARMS

UNIMODAL: tuple[str, ...] = ARMS[1:]


def _accuracy(correct: Sequence[bool]) -> float | None:
    return sum(correct) / len(correct) if correct else None


def fuse_or_drop_report(
    y_true: Sequence[str],
    path_preds: Mapping[str, Sequence[str]],
    subsets: Sequence[str | None] | None = None,
    arms: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Arm-choice distribution and always-fuse / best-single / oracle / arbiter accuracy per subset.

    Args:
        y_true: ground-truth label per sample.
        path_preds: {arm: predicted label per sample} for every arm in `ARMS` (other keys ignored).
        subsets: optional subset per sample (None entries only count in "all").
        arms: optional arm chosen by the arbiter per sample (each in `ARMS`).
    Returns:
        `{"arms", "best_single", "subsets": {name: {"n", "always_fuse", "best_single", "oracle",
        "per_path": {arm: acc}, ["arbiter", "arm_share"]}}}` with "all" first, then the subsets in
        `SUBSETS` order, then any others.
    Raises:
        ValueError: a missing arm, mismatched lengths, or an unknown arm choice.
    """
    n = len(y_true)
    missing = [a for a in ARMS if a not in path_preds]
    if missing:
        raise ValueError(
            f"fuse_or_drop_report needs predictions of every path {list(ARMS)}; missing {missing}"
        )
    lengths = {a: len(path_preds[a]) for a in ARMS}
    if (
        any(v != n for v in lengths.values())
        or (subsets is not None and len(subsets) != n)
        or (arms is not None and len(arms) != n)
    ):
        raise ValueError(f"lengths differ: y_true {n}, paths {lengths}, subsets / arms must match too")
    if arms is not None:
        bad = sorted({a for a in arms if a not in ARMS})
        if bad:
            raise ValueError(f"arm choices {bad} are not arms; valid: {list(ARMS)}")
    correct = {a: [p == t for p, t in zip(path_preds[a], y_true, strict=True)] for a in ARMS}
    best = max(UNIMODAL, key=lambda a: (sum(correct[a]), -UNIMODAL.index(a)))  # ties: first in order
    groups: dict[str, list[int]] = {"all": list(range(n))}
    if subsets is not None:
        seen = [s for s in dict.fromkeys(subsets) if s is not None]
        for name in [s for s in SUBSETS if s in seen] + [s for s in seen if s not in SUBSETS]:
            groups[name] = [i for i, s in enumerate(subsets) if s == name]
    out: dict[str, Any] = {"arms": list(ARMS), "best_single": best, "subsets": {}}
    for name, idx in groups.items():
        row: dict[str, Any] = {
            "n": len(idx),
            "always_fuse": _accuracy([correct["fused"][i] for i in idx]),
            "best_single": _accuracy([correct[best][i] for i in idx]),
            "oracle": _accuracy([any(correct[a][i] for a in ARMS) for i in idx]),
            "per_path": {a: _accuracy([correct[a][i] for i in idx]) for a in ARMS},
        }
        if arms is not None:
            row["arbiter"] = _accuracy([correct[arms[i]][i] for i in idx])
            row["arm_share"] = {a: (sum(arms[i] == a for i in idx) / len(idx) if idx else None) for a in ARMS}
        out["subsets"][name] = row
    return out


def format_report(report: Mapping[str, Any]) -> str:
    """A plain-text table of `fuse_or_drop_report` output (one line per subset)."""
    has_arbiter = any("arbiter" in r for r in report["subsets"].values())
    head = f"{'subset':<15}{'n':>5}{'always_fuse':>13}{'best_single':>13}{'oracle':>8}"
    if has_arbiter:
        head += f"{'arbiter':>9}  arm share (" + "/".join(report["arms"]) + ")"
    lines = [head + f"   [best single = {report['best_single']}]"]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for name, r in report["subsets"].items():
        line = f"{name:<15}{r['n']:>5}{fmt(r['always_fuse']):>13}{fmt(r['best_single']):>13}"
        line += f"{fmt(r['oracle']):>8}"
        if has_arbiter:
            share = "/".join(f"{r['arm_share'][a]:.2f}" for a in report["arms"])
            line += f"{fmt(r['arbiter']):>9}  {share}"
        lines.append(line)
    return "\n".join(lines)
