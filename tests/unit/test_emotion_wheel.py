"""Tests of the MER emotion-wheel (EMER / OV) score: a multi-wheel case worked by hand, parsing, errors, and
agreement with an independent restatement of MERTools' `wheel_metric_calculation` on random inputs."""

from __future__ import annotations

import csv
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eval.emotion_wheel import (  # noqa: E402
    LEVELS,
    WHEELS,
    WheelTables,
    emotion_wheel_score,
    load_wheel_tables,
    map_to_wheel,
    read_openset_csv,
    wheel_group,
)
from mllm_mer.data.readers import split_openset_cell  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# a tiny, hand-made table set


def _tiny_tables() -> WheelTables:
    """Wheels 1, 3, 4, 5 are identical; wheel 2 differs (no 'joyful'/'angry', has 'peaceful')."""
    wheel1 = {
        "level1": {
            "happy": "happy",
            "joyful": "happy",
            "content": "happy",
            "angry": "mad",
            "mad": "mad",
            "sad": "sad",
        },
        "level2": {
            "happy": "joyful",
            "joyful": "joyful",
            "content": "content",
            "angry": "angry",
            "mad": "angry",
            "sad": "lonely",
        },
    }
    wheel2 = {
        "level1": {"happy": "good", "content": "good", "mad": "bad", "sad": "bad", "peaceful": "good"},
        "level2": {"happy": "h2", "content": "c2", "mad": "m2", "sad": "s2", "peaceful": "p2"},
    }
    return WheelTables(
        format_mapping={
            "happy": ["happy"],
            "happiness": ["happy"],
            "joyful": ["joyful"],
            "glad": ["glad", "happy"],
            "angry": ["angry"],
            "furious": ["furious"],
            "sad": ["sad"],
            "calm": ["calm"],
        },
        raw_mapping={
            "happy": ["happy"],
            "joyful": ["joyful", "happy"],
            "glad": ["content"],
            "angry": ["angry", "mad"],
            "furious": ["mad"],
            "sad": ["sad"],
            "calm": ["peaceful"],
        },
        wheel_map_whole={
            "wheel1": wheel1,
            "wheel2": wheel2,
            "wheel3": wheel1,
            "wheel4": wheel1,
            "wheel5": wheel1,
        },
    )


def test_word_mapping_takes_alphabetically_first_candidate_on_the_wheel():
    t = _tiny_tables()
    # joyful -> canonical [joyful] -> wheel words [joyful, happy] -> sorted [happy, joyful] -> happy's group
    assert wheel_group("joyful", t, "wheel1", "level1") == "happy"
    # angry -> [angry, mad]: wheel1 has 'angry' -> mad; wheel2 lacks 'angry', next is 'mad' -> bad
    assert wheel_group("angry", t, "wheel1", "level1") == "mad"
    assert wheel_group("angry", t, "wheel2", "level1") == "bad"
    # glad -> canonical [glad, happy] -> wheel words [content, happy]: 'content' wins although 'happy' is there
    assert wheel_group("glad", t, "wheel1", "level2") == "content"
    # calm -> peaceful: not on wheel1 (dropped), on wheel2
    assert wheel_group("calm", t, "wheel1", "level1") == ""
    assert wheel_group("calm", t, "wheel2", "level1") == "good"
    assert wheel_group("unknownword", t, "wheel2", "level1") == ""
    # words are lower-cased and stripped before lookup; unmapped ones are dropped from the set
    assert map_to_wheel([" Happy ", "JOYFUL", "nope"], t, "wheel1", "level1") == {"happy"}


def test_multi_wheel_case_worked_by_hand():
    t = _tiny_tables()
    gt = {"a": ["Happy ", "angry"], "b": ["sad"], "c": ["unknownword"], "d": ["calm"]}
    pred = {"a": ["joyful", "furious", "sad"], "b": [], "c": ["happy"], "d": ["glad"], "extra": ["happy"]}
    # Level 1, wheel1 (= wheels 3, 4, 5):
    #   a: G={happy, mad}  P={happy (joyful), mad (furious), sad}  -> precision 2/3, recall 2/2
    #   b: G={sad}         P={} (empty prediction)                 -> 0, 0
    #   c: G={} (unknown word)  -> skipped;  d: G={} (calm -> peaceful is not on wheel1) -> skipped
    #   precision = (2/3 + 0)/2 = 1/3, recall = (1 + 0)/2 = 1/2, F = 2*(1/6)/(5/6) = 2/5
    # Level 1, wheel2:
    #   a: G={good, bad} (angry -> mad -> bad)  P={good, bad}  -> 1, 1
    #   b: G={bad} P={} -> 0, 0;  c: skipped
    #   d: G={good} (calm -> peaceful)  P={good} (glad -> content)  -> 1, 1
    #   precision = recall = 2/3, F = 2/3
    # Level 1 means over 5 wheels: F = (4*2/5 + 2/3)/5 = 34/75, P = (4/3 + 2/3)/5 = 2/5, R = (2 + 2/3)/5 = 8/15
    # Level 2, wheel1: a: G={joyful, angry} P={joyful, angry, lonely} -> 2/3, 1; b: 0, 0; c, d skipped
    #   -> P 1/3, R 1/2, F 2/5 (as level 1)
    # Level 2, wheel2: a: G={h2, m2} P={h2, m2, s2} -> 2/3, 1; b: 0, 0; d: G={p2} P={c2} -> 0, 0
    #   -> P = 2/9, R = 1/3, F = 2*(2/27)/(5/9) = 4/15
    # Level 2 means: F = (4*2/5 + 4/15)/5 = 28/75, P = (4/3 + 2/9)/5 = 14/45, R = (2 + 1/3)/5 = 7/15
    # 'extra' (no ground truth) is ignored.
    out = emotion_wheel_score(gt, pred, tables=t)
    assert set(out) == {"level1", "level2"}
    w1 = out["level1"]["per_wheel"]["wheel1"]
    assert w1 == pytest.approx({"fscore": 2 / 5, "precision": 1 / 3, "recall": 1 / 2}, abs=1e-12)
    assert out["level1"]["per_wheel"]["wheel2"] == pytest.approx(
        {"fscore": 2 / 3, "precision": 2 / 3, "recall": 2 / 3}, abs=1e-12
    )
    assert out["level1"]["fscore"] == pytest.approx(34 / 75, abs=1e-12)
    assert out["level1"]["precision"] == pytest.approx(2 / 5, abs=1e-12)
    assert out["level1"]["recall"] == pytest.approx(8 / 15, abs=1e-12)
    assert out["level2"]["per_wheel"]["wheel2"] == pytest.approx(
        {"fscore": 4 / 15, "precision": 2 / 9, "recall": 1 / 3}, abs=1e-12
    )
    assert out["level2"]["fscore"] == pytest.approx(28 / 75, abs=1e-12)
    assert out["level2"]["precision"] == pytest.approx(14 / 45, abs=1e-12)
    assert out["level2"]["recall"] == pytest.approx(7 / 15, abs=1e-12)
    assert list(out["level2"]["per_wheel"]) == list(WHEELS)


def test_no_scorable_sample_gives_zero():
    t = _tiny_tables()
    out = emotion_wheel_score({"a": ["unknownword"]}, {"a": ["happy"]}, tables=t)
    assert (
        out["level1"]["fscore"] == 0.0
        and out["level1"]["precision"] == 0.0
        and out["level1"]["recall"] == 0.0
    )


def test_missing_prediction_raises_and_strings_are_refused():
    t = _tiny_tables()
    with pytest.raises(ValueError, match=r"1 ground-truth name\(s\) have no prediction.*'b'"):
        emotion_wheel_score({"a": ["happy"], "b": ["sad"]}, {"a": ["happy"]}, tables=t)
    with pytest.raises(TypeError, match=r"pred\['a'\] must be a list of strings"):
        emotion_wheel_score({"a": ["happy"]}, {"a": "['happy']"}, tables=t)  # type: ignore[dict-item]


def test_inconsistent_tables_are_refused():
    t = _tiny_tables()
    with pytest.raises(ValueError, match="wheel5.level1"):
        WheelTables(t.format_mapping, t.raw_mapping, {w: t.wheel_map_whole[w] for w in WHEELS[:4]})
    with pytest.raises(ValueError, match="'ghost'"):
        WheelTables({"x": ["ghost"]}, t.raw_mapping, t.wheel_map_whole)


# ----------------------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("['excited', 'joyful']", ["excited", "joyful"]),
        ('["excited", "joyful"]', ["excited", "joyful"]),
        ("[]", []),
        ("", []),
        ("[happy, sad]", ["happy", "sad"]),  # not a Python literal: MERTools still splits it
        ("happy, sad", ["happy", "sad"]),
        ("['happy, excited']", ["happy", "excited"]),  # MERTools splits inside quotes too
        ('["don\'t know"]', ["don", "t know"]),  # ... and on apostrophes
        ("['don’t care']", ["don’t care"]),  # a typographic apostrophe is kept (the tables use it)
        (" ['a']", ["[", "a"]),  # no strip first: the "[" stays (then dropped by the tables), "]" goes
        ("]", []),
    ],
)
def test_split_openset_cell_follows_mertools(text, words):
    assert split_openset_cell(text) == words


@pytest.mark.parametrize("text", ["[1, 2]", "[['a'], ['b']]", "[None]", "["])
def test_split_openset_cell_rejects_malformed_lists(text):
    with pytest.raises(ValueError, match="unparseable list"):
        split_openset_cell(text)


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_read_openset_csv(tmp_path):
    path = _write_csv(
        tmp_path / "gt.csv",
        [["name", "extra", "openset"], ["s1", "x", "['happy', 'Sad ']"], ["s2", "", ""], ["s3", "", "[]"]],
    )
    assert read_openset_csv(path) == {"s1": ["happy", "Sad"], "s2": [], "s3": []}


def test_read_openset_csv_errors(tmp_path):
    p = _write_csv(tmp_path / "nocol.csv", [["name", "labels"], ["s1", "['a']"]])
    with pytest.raises(ValueError, match=r"nocol\.csv: missing column\(s\) \['openset'\]"):
        read_openset_csv(p)
    p = _write_csv(tmp_path / "dup.csv", [["name", "openset"], ["s1", "['a']"], ["s2", ""], ["s1", "['b']"]])
    with pytest.raises(ValueError, match=r"dup\.csv, line 4: duplicate name 's1' \(first on line 2\)"):
        read_openset_csv(p)
    p = _write_csv(tmp_path / "bad.csv", [["name", "openset"], ["s1", "['a']"], ["s2", "[1, 2]"]])
    with pytest.raises(ValueError, match=r"bad\.csv, line 3, name 's2': unparseable list"):
        read_openset_csv(p)
    p = _write_csv(tmp_path / "short.csv", [["name", "openset"], ["s1"]])
    with pytest.raises(ValueError, match=r"short\.csv, line 2: 1 fields, header has 2"):
        read_openset_csv(p)
    p = _write_csv(tmp_path / "noname.csv", [["name", "openset"], ["  ", "['a']"]])
    with pytest.raises(ValueError, match=r"noname\.csv, line 2: empty name"):
        read_openset_csv(p)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv: empty file"):
        read_openset_csv(tmp_path / "empty.csv")


# ----------------------------------------------------------------------------------------------------------
# shipped tables and agreement with MERTools


def test_shipped_tables_load():
    t = load_wheel_tables()
    assert len(t.format_mapping) == 7356 and len(t.raw_mapping) == 1255
    assert wheel_group("happy", t, "wheel1", "level1") == "happy"
    assert wheel_group("angry", t, "wheel2", "level2") == "aggressive"
    assert wheel_group("worried", t, "wheel4", "level2") == "worried"
    assert wheel_group("neutral", t, "wheel1", "level1") == ""  # neutral is on no wheel


def _reference_string_to_list(value):
    """Restatement of MERTools `string_to_list` (toolkit/utils/functions.py) for str / NaN / list inputs."""
    if isinstance(value, list):
        return value
    if value == "" or (isinstance(value, float) and np.isnan(value)):
        return []
    if value[0] == "[":
        value = value[1:]
    if value[-1] == "]":
        value = value[:-1]
    return [item.strip() for item in re.split("['\",]", value) if item.strip() not in ["", ","]]


def _reference_wheel_metric(name2gt, name2pred, mapping, level):
    """Restatement of MERTools `wheel_metric_calculation` -> `calculate_openset_overlap_rate` (metric
    'case3_<wheel>_<level>') -> `func_map_label_to_synonym` -> `func_backward_case3`, commit 1052cb82."""

    def backward_case3(label, wheel_map):
        if label not in mapping["format_mapping"]:
            return ""
        level1_whole = []
        for fmt in mapping["format_mapping"][label]:
            for raw in mapping["raw_mapping"][fmt]:
                level1_whole.append(raw)
        for level1 in sorted(level1_whole):
            if level1 in wheel_map:
                return wheel_map[level1]
        return ""

    def to_set(value, wheel_map):
        words = [item.lower().strip() for item in _reference_string_to_list(value)]
        return {g for g in (backward_case3(w, wheel_map) for w in words) if g != ""}

    whole_scores = []
    for wheel in ["wheel1", "wheel2", "wheel3", "wheel4", "wheel5"]:
        wheel_map = mapping["wheel_map_whole"][wheel][level]
        accuracy, recall = [], []
        for name in name2gt:
            gt = to_set(name2gt[name], wheel_map)
            pred = to_set(name2pred[name], wheel_map)
            if len(gt) == 0:
                continue
            if len(pred) == 0:
                accuracy.append(0)
                recall.append(0)
            else:
                accuracy.append(len(gt & pred) / len(pred))
                recall.append(len(gt & pred) / len(gt))
        avg_accuracy = np.mean(accuracy) if len(accuracy) != 0 else 0
        avg_recall = np.mean(recall) if len(recall) != 0 else 0
        if avg_accuracy + avg_recall == 0:
            fscore = 0
        else:
            fscore = 2 * (avg_accuracy * avg_recall) / (avg_accuracy + avg_recall)
        whole_scores.append([fscore, avg_accuracy, avg_recall])
    return np.mean(whole_scores, axis=0).tolist()


def _random_cell(rng: random.Random, vocab: list[str]) -> str:
    """A label cell in one of the shapes seen in MER submissions (or odder)."""
    words = []
    for _ in range(rng.randint(0, 6)):
        w = rng.choice(vocab)
        w = rng.choice([w, w.upper(), w.capitalize(), f" {w} "])
        words.append(w)
    kind = rng.randrange(7)
    if kind == 0:
        return str(words)  # "['happy', 'sad']"
    if kind == 1:
        return "[" + ", ".join(words) + "]"  # unquoted
    if kind == 2:
        return ", ".join(words)  # no brackets
    if kind == 3:
        return '["' + ", ".join(words) + '"]'  # one quoted string holding all words
    if kind == 4:
        return rng.choice(["", "[]", "NA", "None", "nan"])  # empties and pandas' NA spellings
    if kind == 5:
        return str(words) + " "  # trailing space: the closing bracket is not removed
    return str(tuple(words)) if words else "()"


def test_matches_mertools_reference_on_random_csvs(tmp_path):
    pd = pytest.importorskip("pandas")
    t = load_wheel_tables()
    mapping = {
        "format_mapping": t.format_mapping,
        "raw_mapping": t.raw_mapping,
        "wheel_map_whole": t.wheel_map_whole,
    }
    rng = random.Random(0)
    keys = sorted(t.format_mapping)
    vocab = rng.sample(keys, 150) + ["neutral", "xyzzy", "happy", "sad", "angry", "worried", "surprise"]
    for trial in range(8):
        names = [f"sample_{trial}_{i}" for i in range(rng.randint(1, 60))]
        gt_rows = [["name", "openset"]] + [[n, _random_cell(rng, vocab)] for n in names]
        pred_names = names + ["not_in_gt"]
        rng.shuffle(pred_names)
        pred_rows = [["name", "openset"]] + [[n, _random_cell(rng, vocab)] for n in pred_names]
        gt_path = _write_csv(tmp_path / f"gt{trial}.csv", gt_rows)
        pred_path = _write_csv(tmp_path / f"pred{trial}.csv", pred_rows)

        ours = emotion_wheel_score(read_openset_csv(gt_path), read_openset_csv(pred_path), tables=t)

        # upstream reads with pandas (func_read_key_from_csv: NaN -> "") and parses inside the metric
        def read(path):
            df = pd.read_csv(path)
            return {str(r["name"]): ("" if pd.isna(r["openset"]) else r["openset"]) for _, r in df.iterrows()}

        name2gt, name2pred = read(gt_path), read(pred_path)
        for level in LEVELS:
            f, p, r = _reference_wheel_metric(name2gt, name2pred, mapping, level)
            assert ours[level]["fscore"] == pytest.approx(f, abs=1e-12, rel=0)
            assert ours[level]["precision"] == pytest.approx(p, abs=1e-12, rel=0)
            assert ours[level]["recall"] == pytest.approx(r, abs=1e-12, rel=0)


def test_matches_mertools_reference_on_random_lists():
    t = load_wheel_tables()
    mapping = {
        "format_mapping": t.format_mapping,
        "raw_mapping": t.raw_mapping,
        "wheel_map_whole": t.wheel_map_whole,
    }
    rng = random.Random(1)
    keys = sorted(t.format_mapping)
    for _ in range(10):
        gt, pred = {}, {}
        for i in range(rng.randint(1, 80)):
            gt[f"n{i}"] = [rng.choice(keys) for _ in range(rng.randint(0, 5))] + rng.choice(
                [[], ["Unknown Thing"]]
            )
            pred[f"n{i}"] = [rng.choice(keys).upper() for _ in range(rng.randint(0, 7))]
        ours = emotion_wheel_score(gt, pred, tables=t)
        for level in LEVELS:
            f, p, r = _reference_wheel_metric(gt, pred, mapping, level)
            assert (ours[level]["fscore"], ours[level]["precision"], ours[level]["recall"]) == pytest.approx(
                (f, p, r), abs=1e-12, rel=0
            )
