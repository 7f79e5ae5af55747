"""Prediction files for `scripts/evaluate.py`: JSONL as written by `scripts/generate.py`, or a CSV.

- JSONL (any suffix but `.csv`): one object per line with `id` (string, or integer) and at least one of
  `label` (the parsed label), `text` (raw generation), `labels_ov` (list of words); optional `probs`
  ``{path: {label: prob}}``, `dnr_ablation` ``{component: {"kl", "delta_p"}}`` and `arm` (the path
  DCR's arbiter chose).
- CSV with a header: id column `name` (or `names`), and `label` (or `discrete`), `openset` (a list
  string, split by `split_openset_cell`) and/or `text`.

The first bad line stops the read with a `ValueError` naming the file and line: bad JSON, a wrong
field type, a row with nothing to score, a duplicate id (both lines), a wrong field count.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_mer.data.jsonl import iter_json_lines
from mllm_mer.data.readers import sample_name, split_openset_cell


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

    ok = (
        isinstance(value, dict)
        and value
        and all(
            isinstance(v, dict) and set(v) == {"kl", "delta_p"} and all(number(x) for x in v.values())
            for v in value.values()
        )
    )
    if not ok:
        raise ValueError(f"{where}: 'dnr_ablation' must be {{component: {{'kl': x, 'delta_p': y}}}}")
    return {c: {k: float(x) for k, x in v.items()} for c, v in value.items()}


def _read_prediction_jsonl(path: Path) -> dict[str, PredictionRow]:
    rows: dict[str, PredictionRow] = {}
    for lineno, obj, error in iter_json_lines(path):
        where = f"{path}, line {lineno}"
        if error is not None:
            raise ValueError(f"{where}: invalid JSON ({error.msg} at column {error.colno})")
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        sid = _row_id(obj.get("id"), where)
        label, text = _optional_str(obj, "label", where), _optional_str(obj, "text", where)
        words = obj.get("labels_ov")
        if words is not None and (not isinstance(words, list) or not all(isinstance(w, str) for w in words)):
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
