"""EMER / OV-MER open-vocabulary emotion score on the five emotion wheels, as the MER challenge computes it.

This is a port of MERTools' `wheel_metric_calculation`
(zeroQiaoba/MERTools, `MER2026/MER2026_Track2/my_affectgpt/evaluation/wheel.py`, commit 1052cb82) and of
the `string_to_list` parser it uses. Per wheel (`wheel1` ... `wheel5`) and ring level (`level1`, `level2`):

1. every word of a sample's ground-truth and predicted list is lower-cased and stripped;
2. it is looked up in `format_mapping` (exact match; unknown words are dropped) -> canonical words;
3. the union of `raw_mapping[c]` over those canonical words gives candidate wheel words, which are
   sorted alphabetically; the first one present in `wheel_map_whole[wheel][level]` gives the word's
   group on that ring (no candidate on the wheel -> the word is dropped);
4. per sample, over the mapped *sets* G (truth) and P (prediction): precision |G&P|/|P| and recall
   |G&P|/|G|; samples whose G is empty are skipped; an empty P scores precision 0 and recall 0;
5. precision and recall are averaged over the remaining samples (0 when none remain) and
   F = 2PR/(P+R) (0 when P+R == 0);
6. the reported F, P and R of a level are the means over the five wheels. Level 1 is the headline.

MERTools quirks reproduced on purpose:
- List strings are split the MERTools way, not by Python syntax (`split_openset_cell`, shared with the
  dataset readers in `mllm_mer.data.readers`): one leading "[" and one trailing "]" are removed and the
  rest is split on every `'`, `"` and `,`. So "['happy, excited']" gives ["happy", "excited"] and
  "[happy, sad]" (no quotes) is accepted. `ast.literal_eval` is used only to reject well-formed
  literals that are not a flat list of strings ("[1, 2]", "[['a'], ['b']]").
- The wheel group of a word is decided by the alphabetically first candidate on that wheel, even when
  later candidates belong to other groups.
- Ground-truth names define the sample set: predictions for names not in the ground truth are ignored.
  A ground-truth name with no prediction makes MERTools fail (KeyError); here it raises ValueError
  listing the missing names. To score missing predictions as wrong, pass an empty list for them
  (an empty prediction scores precision 0 and recall 0 on every wheel).
- pandas' NA spellings ("NA", "None", "nan", ...) become empty lists in MERTools; here they are kept
  as words, which no table maps, so scores are identical (tested).

The tables (`wheel_mapping.json`, CC BY-NC 4.0, see its README) ship in `mllm_mer/resources/emotion_wheel/`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from mllm_mer.data.readers import split_openset_cell

WHEELS: tuple[str, ...] = ("wheel1", "wheel2", "wheel3", "wheel4", "wheel5")
"""The five emotion wheels, in MERTools' order."""

LEVELS: tuple[str, ...] = ("level1", "level2")
"""Ring levels scored: level1 (innermost groups, the headline score) and level2."""

_RESOURCE = ("resources", "emotion_wheel", "wheel_mapping.json")


@dataclass(frozen=True)
class WheelTables:
    """The three lookup tables of the emotion-wheel metric.

    Attributes:
        format_mapping: lower-case surface form -> canonical words (e.g. "abandons" -> ["abandoned"]).
        raw_mapping: canonical word -> emotion-wheel words it is a synonym of.
        wheel_map_whole: wheel name -> level name -> wheel word -> group on that ring.
    """

    format_mapping: Mapping[str, list[str]]
    raw_mapping: Mapping[str, list[str]]
    wheel_map_whole: Mapping[str, Mapping[str, Mapping[str, str]]]

    def __post_init__(self) -> None:
        missing_wheels = [
            f"{w}.{lv}" for w in WHEELS for lv in LEVELS if lv not in self.wheel_map_whole.get(w, {})
        ]
        if missing_wheels:
            raise ValueError(f"wheel tables lack wheel_map_whole entries {missing_wheels}")
        dangling = sorted({c for cs in self.format_mapping.values() for c in cs if c not in self.raw_mapping})
        if dangling:
            raise ValueError(
                f"wheel tables: canonical words {dangling[:10]} (of {len(dangling)}) appear in format_mapping "
                "but not in raw_mapping"
            )


def load_wheel_tables() -> WheelTables:
    """Load the MER2026 emotion-wheel tables shipped with `mllm_mer`.

    Returns:
        The tables from `mllm_mer/resources/emotion_wheel/wheel_mapping.json`.
    Raises:
        ValueError: if the resource lacks a table or is inconsistent.
    """
    text = resources.files("mllm_mer").joinpath(*_RESOURCE).read_text(encoding="utf-8")
    data = json.loads(text)
    missing = [k for k in ("format_mapping", "raw_mapping", "wheel_map_whole") if k not in data]
    if missing:
        raise ValueError(f"{'/'.join(_RESOURCE)} lacks tables {missing}")
    return WheelTables(data["format_mapping"], data["raw_mapping"], data["wheel_map_whole"])


def read_openset_csv(path: str | Path) -> dict[str, list[str]]:
    """Read a `name,openset` CSV (ground truth or predictions) into name -> word list.

    Other columns are ignored. Cells are split with `split_openset_cell`; an empty cell gives [].

    Args:
        path: CSV file with a header containing `name` and `openset`.
    Returns:
        name -> list of words, in file order.
    Raises:
        ValueError: naming the file (and line) for a missing file header or column, a row with the
            wrong number of fields, an empty or duplicate name, or an unparseable list.
    """
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header with columns 'name' and 'openset'")
        missing = [c for c in ("name", "openset") if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} in header {header}")
        i_name, i_set = header.index("name"), header.index("openset")
        out: dict[str, list[str]] = {}
        first_line: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}, line {line}: {len(row)} fields, header has {len(header)}")
            name = row[i_name]
            if not name.strip():
                raise ValueError(f"{path}, line {line}: empty name")
            if name in out:
                raise ValueError(
                    f"{path}, line {line}: duplicate name {name!r} (first on line {first_line[name]})"
                )
            try:
                out[name] = split_openset_cell(row[i_set])
            except ValueError as err:
                raise ValueError(f"{path}, line {line}, name {name!r}: {err}") from None
            first_line[name] = line
    return out


def wheel_group(word: str, tables: WheelTables, wheel: str, level: str) -> str:
    """The group of one normalised word on one wheel ring, or "" when it has none.

    Args:
        word: a lower-cased, stripped label word.
        tables: the wheel tables.
        wheel: "wheel1" ... "wheel5".
        level: "level1" or "level2".
    Returns:
        The group name, or "" if the word is unknown or none of its synonyms is on the wheel.
    """
    canonical = tables.format_mapping.get(word)
    if canonical is None:
        return ""
    ring = tables.wheel_map_whole[wheel][level]
    candidates = sorted(w for c in canonical for w in tables.raw_mapping[c])
    for candidate in candidates:
        if candidate in ring:
            return ring[candidate]
    return ""


def map_to_wheel(words: Iterable[str], tables: WheelTables, wheel: str, level: str) -> set[str]:
    """Map a sample's label words to the set of their groups on one wheel ring (unmapped words dropped).

    Args:
        words: raw label words (any case, surrounding spaces allowed).
        tables: the wheel tables.
        wheel: "wheel1" ... "wheel5".
        level: "level1" or "level2".
    Returns:
        The set of groups.
    """
    groups = {wheel_group(w.lower().strip(), tables, wheel, level) for w in words}
    groups.discard("")
    return groups


def _check_lists(name2words: Mapping[str, list[str]], what: str) -> None:
    """Refuse plain strings where word lists are expected (iterating a str would score its characters)."""
    for name, words in name2words.items():
        if isinstance(words, str) or not all(isinstance(w, str) for w in words):
            raise TypeError(
                f"{what}[{name!r}] must be a list of strings, got {words!r}; parse list strings with "
                "split_openset_cell / read_openset_csv first"
            )


def _wheel_rates(
    gt: Mapping[str, list[str]], pred: Mapping[str, list[str]], tables: WheelTables, wheel: str, level: str
) -> tuple[float, float]:
    """Mean per-sample precision and recall on one wheel ring (MERTools' calculate_openset_overlap_rate)."""
    precisions: list[float] = []
    recalls: list[float] = []
    for name, gt_words in gt.items():
        g = map_to_wheel(gt_words, tables, wheel, level)
        if not g:
            continue
        p = map_to_wheel(pred[name], tables, wheel, level)
        if not p:
            precisions.append(0.0)
            recalls.append(0.0)
        else:
            precisions.append(len(g & p) / len(p))
            recalls.append(len(g & p) / len(g))
    precision = float(np.mean(precisions)) if precisions else 0.0
    recall = float(np.mean(recalls)) if recalls else 0.0
    return precision, recall


def emotion_wheel_score(
    gt: Mapping[str, list[str]],
    pred: Mapping[str, list[str]],
    tables: WheelTables | None = None,
) -> dict[str, dict]:
    """The MER emotion-wheel score of open-vocabulary predictions, at ring levels 1 and 2.

    Args:
        gt: name -> ground-truth words; its names (in order) are the samples scored.
        pred: name -> predicted words; must contain every name of `gt` (extra names are ignored).
        tables: wheel tables; None loads the MER2026 tables shipped with the package.
    Returns:
        `{"level1": {"fscore", "precision", "recall", "per_wheel": {"wheel1": {"fscore", "precision",
        "recall"}, ...}}, "level2": {...}}`; the level values are the means over the five wheels.
    Raises:
        ValueError: if `pred` lacks names of `gt` (MERTools fails there too).
        TypeError: if a value is a string instead of a list of strings.
    """
    tables = load_wheel_tables() if tables is None else tables
    _check_lists(gt, "gt")
    _check_lists(pred, "pred")
    missing = [name for name in gt if name not in pred]
    if missing:
        raise ValueError(
            f"{len(missing)} ground-truth name(s) have no prediction, e.g. {missing[:5]}; pass an empty list "
            "for a sample to score it as wrong"
        )
    out: dict[str, dict] = {}
    for level in LEVELS:
        per_wheel: dict[str, dict[str, float]] = {}
        rows: list[list[float]] = []
        for wheel in WHEELS:
            precision, recall = _wheel_rates(gt, pred, tables, wheel, level)
            fscore = 0.0 if precision + recall == 0 else 2 * (precision * recall) / (precision + recall)
            per_wheel[wheel] = {"fscore": fscore, "precision": precision, "recall": recall}
            rows.append([fscore, precision, recall])
        f_mean, p_mean, r_mean = (float(v) for v in np.mean(rows, axis=0))
        out[level] = {"fscore": f_mean, "precision": p_mean, "recall": r_mean, "per_wheel": per_wheel}
    return out
