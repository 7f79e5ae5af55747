"""Tests of `mllm_mer.metrics` against hand-computed values and against scikit-learn."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.metrics import audio_dominance, classification_metrics

# labels order: neutral, angry, happy, sad, worried, surprise
Y_TRUE = ["happy", "happy", "sad", "angry", "neutral", "neutral", "sad"]
Y_PRED = ["happy", "sad", "sad", "disgust", "neutral", "happy", "sad"]
SUBSETS = ["consistent", "consistent", "audio_aligned", "video_aligned", None, "consistent", "audio_aligned"]


def test_classification_metrics_by_hand():
    # per label (support, TP, FP):   precision  recall  F1
    #   neutral (2, 1, 0)            1          1/2     2/3
    #   angry   (1, 0, 0)            0 (0/0)    0       0      ('disgust' is outside the label set: wrong)
    #   happy   (2, 1, 1)            1/2        1/2     1/2
    #   sad     (2, 2, 1)            2/3        1       4/5
    # accuracy = 4/7; weighted F1 = (2*2/3 + 0 + 2*1/2 + 2*4/5)/7 = (59/15)/7 = 59/105
    # weighted precision = (2*1 + 0 + 2*1/2 + 2*2/3)/7 = 13/21; weighted recall = 4/7 (= accuracy)
    # UAR over the 4 labels present = (1/2 + 0 + 1/2 + 1)/4 = 1/2
    out = classification_metrics(Y_TRUE, Y_PRED, MER2023_LABELS, SUBSETS)
    assert set(out) == {
        "n", "accuracy", "weighted_f1", "weighted_precision", "weighted_recall", "uar", "war", "confusion",
        "per_subset",
    }  # fmt: skip
    assert out["n"] == 7
    assert out["accuracy"] == pytest.approx(4 / 7)
    assert out["war"] == pytest.approx(4 / 7)
    assert out["weighted_f1"] == pytest.approx(59 / 105)
    assert out["weighted_precision"] == pytest.approx(13 / 21)
    assert out["weighted_recall"] == pytest.approx(4 / 7)
    assert out["uar"] == pytest.approx(1 / 2)
    # rows = truth, cols = prediction, order neutral, angry, happy, sad, worried, surprise, unknown
    assert out["confusion"] == [
        [1, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 2, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ]
    # consistent: (happy->happy, happy->sad, neutral->happy): acc 1/3;
    #   happy P=R=1/2 (F 1/2, support 2), neutral F 0 (support 1) -> weighted F1 = (2*1/2)/3 = 1/3
    # video_aligned: angry->disgust: 0, 0; audio_aligned: sad->sad twice: 1, 1; None: in no subset
    assert list(out["per_subset"]) == ["consistent", "video_aligned", "audio_aligned"]
    assert out["per_subset"]["consistent"] == pytest.approx({"n": 3, "accuracy": 1 / 3, "weighted_f1": 1 / 3})
    assert out["per_subset"]["video_aligned"] == pytest.approx({"n": 1, "accuracy": 0.0, "weighted_f1": 0.0})
    assert out["per_subset"]["audio_aligned"] == pytest.approx({"n": 2, "accuracy": 1.0, "weighted_f1": 1.0})


def test_no_unknown_column_when_all_predictions_are_labels():
    out = classification_metrics(["happy", "sad"], ["happy", "happy"], ["happy", "sad"])
    assert out["confusion"] == [[1, 0], [1, 0]]
    assert out["per_subset"] == {}
    # happy: P 1/2 R 1 F 2/3 (support 1); sad: 0 -> weighted F1 = 1/3; UAR = (1 + 0)/2
    assert out["weighted_f1"] == pytest.approx(1 / 3)
    assert out["uar"] == pytest.approx(1 / 2)
    assert isinstance(out["confusion"][0][0], int)


def test_subset_outside_known_names_is_kept_after_known_ones():
    out = classification_metrics(
        ["happy"] * 3, ["happy", "sad", "happy"], ["happy", "sad"], ["x", "consistent", "x"]
    )
    assert list(out["per_subset"]) == ["consistent", "x"]
    assert out["per_subset"]["x"]["accuracy"] == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn's note on one-label inputs
def test_scores_match_scikit_learn_on_random_labelings():
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for case in range(300):
        labels = list(MER2023_LABELS[: rng.randint(1, len(MER2023_LABELS))])
        n = rng.randint(1, 40)
        y_true = [rng.choice(labels) for _ in range(n)]
        # mostly labels, sometimes a value outside the set, sometimes one label never predicted
        y_pred = [rng.choice([*labels, "unknown", "disgust"]) if rng.random() < 0.2 else rng.choice(labels)
                  for _ in range(n)]  # fmt: skip
        out = classification_metrics(y_true, y_pred, labels)
        kw = {"labels": labels, "average": "weighted", "zero_division": 0}
        present = [label for label in labels if label in set(y_true)]
        expected = {
            "accuracy": sk.accuracy_score(y_true, y_pred),
            "weighted_f1": sk.f1_score(y_true, y_pred, **kw),
            "weighted_precision": sk.precision_score(y_true, y_pred, **kw),
            "weighted_recall": sk.recall_score(y_true, y_pred, **kw),
            "uar": sk.recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0),
        }
        for key, value in expected.items():
            assert out[key] == pytest.approx(float(value), rel=1e-12, abs=1e-15), (case, key)
        cm_labels = labels + ["unknown"] if any(p not in labels for p in y_pred) else labels
        y_pred_cm = [p if p in labels else "unknown" for p in y_pred]
        assert out["confusion"] == sk.confusion_matrix(y_true, y_pred_cm, labels=cm_labels).tolist()


def test_importing_metrics_loads_neither_scikit_learn_nor_scipy():
    code = "import sys, mllm_mer.metrics; print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("y_true", "y_pred", "labels", "subsets", "match"),
    [
        (["happy"], ["happy", "sad"], ["happy"], None, "y_true has 1 items but y_pred has 2"),
        ([], [], ["happy"], None, "at least one sample"),
        (["joy"], ["happy"], ["happy"], None, r"ground-truth values \['joy'\] are not in labels"),
        (["happy"], ["happy"], ["happy", "happy"], None, "without duplicates"),
        (["happy"], ["happy"], ["happy", "unknown"], None, "reserved"),
        (["happy"], ["happy"], ["happy"], ["consistent", None], "subsets has 2 items"),
    ],
)
def test_classification_metrics_errors(y_true, y_pred, labels, subsets, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y_true, y_pred, labels, subsets)


def test_audio_dominance_by_hand():
    y_pred = ["happy", "sad", "angry", "neutral", "sad", "happy", "sad"]
    audio = ["happy", "happy", "angry", "angry", None, "", "sad"]
    video = ["sad", "sad", "angry", "happy", "sad", "happy", "happy"]
    # conflicts: 0 (follows audio), 1 (video), 3 (neither), 6 (audio); 2 agrees; 4, 5 lack a cue
    out = audio_dominance(y_pred, audio, video)
    assert out == {"index": pytest.approx(2 / 3), "audio_follow": 2, "video_follow": 1, "n_conflict": 4}


def test_audio_dominance_without_followers_is_none():
    assert audio_dominance(["happy"], ["happy"], ["happy"]) == {
        "index": None, "audio_follow": 0, "video_follow": 0, "n_conflict": 0,
    }  # fmt: skip
    assert audio_dominance(["neutral"], ["happy"], ["sad"])["index"] is None
    with pytest.raises(ValueError, match="equal lengths"):
        audio_dominance(["happy"], ["happy", "sad"], ["sad"])


def test_cue_accuracy_by_hand():
    from mllm_mer.metrics import cue_accuracy

    preds = ["happy", "sad", "unknown", "angry", "happy"]
    cues = ["happy", "happy", "sad", None, "happy"]
    # known cues: 0, 1, 2, 4 -> correct 0 and 4
    assert cue_accuracy(preds, cues) == {"accuracy": 0.5, "correct": 2, "n": 4}
    # keep only 1 and 2 (and 3, whose cue is unknown) -> none correct
    assert cue_accuracy(preds, cues, [False, True, True, True, False]) == {"accuracy": 0.0, "correct": 0, "n": 2}
    assert cue_accuracy(preds, cues, [False] * 5) == {"accuracy": None, "correct": 0, "n": 0}
    with pytest.raises(ValueError, match="equal lengths"):
        cue_accuracy(preds, cues[:2])
    with pytest.raises(ValueError, match="equal lengths"):
        cue_accuracy(preds, cues, [True])
