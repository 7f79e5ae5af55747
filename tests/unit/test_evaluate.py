"""`scripts/evaluate.py`, `eval/tasks/` and `eval/report.py` on tiny hand-made files, one per task.

Expected numbers are worked by hand in the comments; the judge is a scripted `Judge` subclass (no network).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from eval.judge import JudgeResult
from eval.report import report_paths, write_report
from eval.tasks import EvalOptions, emer, read_predictions, run_task
from mllm_mer.labels import LABEL_MODES
from tests.unit.test_judge import ScriptedJudge

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "evaluate.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def evaluate(task: str, pred: Path, ref: Path, out: Path, **options: Any) -> dict[str, Any]:
    """Run a task, write OUT.json + report like the script does, and return the JSON round-tripped result."""
    result = run_task(task, EvalOptions(predictions=pred, references=ref, **options))
    out.write_text(json.dumps(result), encoding="utf-8")
    written = write_report(result, out)
    assert written[0] == report_paths(out)["markdown"] and all(p.is_file() for p in written)
    for png in written[1:]:
        assert png.read_bytes()[:8] == PNG_MAGIC
    return json.loads(out.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------
# synthetic: refs with cues; predictions with label / text / probs

SYN_REFS = [
    # id, subset, label, video cue, audio cue
    ("s1", "consistent", "happy", "happy", "happy"),
    ("s2", "video_aligned", "sad", "sad", "angry"),
    ("s3", "audio_aligned", "angry", "happy", "angry"),
    ("s4", "audio_aligned", "worried", "neutral", "worried"),
]


def syn_refs(tmp_path: Path) -> Path:
    rows = [
        {
            "id": sid,
            "video": f"media/{sid}.mp4",  # never opened: check_files=False
            "audio": None,
            "subtitle": "",
            "label": label,
            "explanation": "",
            "subset": subset,
            "cues": {"video": video, "audio": audio, "text": label},
        }
        for sid, subset, label, video, audio in SYN_REFS
    ]
    return write_jsonl(tmp_path / "test.jsonl", rows)


def onehot(label: str) -> dict[str, float]:
    return {
        "neutral": 0.1,
        "angry": 0.1,
        "happy": 0.1,
        "sad": 0.1,
        "worried": 0.1,
        "surprise": 0.1,
        label: 0.5,
    }


def syn_preds(tmp_path: Path) -> Path:
    # predicted: happy (ok), sad (ok, follows video), angry (ok, follows audio), neutral (parsed from text,
    # wrong, follows video). Paths: audio = the audio cue, video = the video cue.
    rows = [
        {"id": "s1", "label": "happy", "text": "She looks joyful."},
        {"id": "s2", "label": "sad", "text": "sad"},
        {"id": "s3", "label": "angry", "text": "angry"},
        {"id": "s4", "text": "The face looks calm. Emotion: neutral"},
    ]
    for row, (_, _, _, video, audio) in zip(rows, SYN_REFS, strict=True):
        row["probs"] = {"audio": onehot(audio), "video": onehot(video)}
    return write_jsonl(tmp_path / "pred.jsonl", rows)


def test_synthetic_metrics_dominance_paths_and_report(tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    result = evaluate("synthetic", syn_preds(tmp_path), syn_refs(tmp_path), out)
    m = result["metrics"]
    assert result["task"] == "synthetic" and result["n"] == 4 and result["labels_mode"] == "strict"
    # 3 of 4 correct; per class (support 1 each): happy, sad, angry F1 = 1, worried F1 = 0 -> weighted 3/4
    assert m["accuracy"] == m["war"] == pytest.approx(0.75)
    assert m["weighted_f1"] == m["uar"] == m["weighted_precision"] == pytest.approx(0.75)
    assert m["per_subset"] == {
        "consistent": {"n": 1, "accuracy": 1.0, "weighted_f1": 1.0},
        "video_aligned": {"n": 1, "accuracy": 1.0, "weighted_f1": 1.0},
        "audio_aligned": {"n": 2, "accuracy": 0.5, "weighted_f1": pytest.approx(0.5)},
    }
    labels = result["labels"]
    assert labels == ["neutral", "angry", "happy", "sad", "worried", "surprise"]
    assert m["confusion"][labels.index("worried")][labels.index("neutral")] == 1
    # conflicts s2, s3, s4: predictions sad (video), angry (audio), neutral (video) -> A = 1, V = 2
    assert result["audio_dominance"] == {
        "index": pytest.approx(1 / 3),
        "audio_follow": 1,
        "video_follow": 2,
        "n_conflict": 3,
    }
    # audio path: happy, angry, angry, worried -> 3/4; video path: happy, sad, happy, neutral -> 2/4
    assert result["per_path"]["audio"]["accuracy"] == pytest.approx(0.75)
    assert result["per_path"]["video"]["accuracy"] == pytest.approx(0.5)
    assert result["warnings"] == []
    assert set(result["inputs"]["sha256"]) == {str(tmp_path / "pred.jsonl"), str(tmp_path / "test.jsonl")}

    paths = report_paths(out)
    md = paths["markdown"].read_text()
    assert paths["markdown"].name == "res.md" and paths["confusion"].name == "res.confusion.png"
    for heading in (
        "## Overall",
        "## Per subset",
        "## Per-class recall",
        "## Audio dominance",
        "## Per path",
    ):
        assert heading in md
    assert "| worried | 1 | 0 | 0.0000 |" in md and "| 0.3333 | 1 | 2 | 3 |" in md
    assert paths["confusion"].is_file() and paths["subsets"].is_file()


@pytest.mark.parametrize("mode", LABEL_MODES)
def test_reparse_uses_labels_mode(tmp_path: Path, mode: str) -> None:
    # s1's text "She looks joyful." is happy for the strict parser (synonym); the Emotion-LLaMA rules know
    # no synonyms and fall back to neutral: 3/4 -> 2/4.
    accuracy = 0.75 if mode == "strict" else 0.5
    opts = EvalOptions(syn_preds(tmp_path), syn_refs(tmp_path), labels_mode=mode, reparse=True)
    assert run_task("synthetic", opts)["metrics"]["accuracy"] == pytest.approx(accuracy)


# ----------------------------------------------------------------------------------------------------------
# CA-MER root (read_camer checks media, so placeholder clips are created), MER2023, DFEW


def camer_root(tmp_path: Path) -> Path:
    root = tmp_path / "CA-MER"
    entries = {
        "video_aligned": [{"file_name": "v1.mp4", "label": "happy"}, {"file_name": "v2", "label": "Sad"}],
        "audio_aligned": [{"file_name": "a1", "label": "angry"}],
        "consistent": [{"file_name": "c1", "label": "neutral"}],
    }
    for subset, items in entries.items():
        (root / subset).mkdir(parents=True)
        (root / f"{subset}.json").write_text(json.dumps(items))
        for item in items:
            (root / subset / Path(item["file_name"]).with_suffix(".mp4").name).write_bytes(b"placeholder")
    return root


def test_camer_root(tmp_path: Path) -> None:
    pred = write_csv(
        tmp_path / "pred.csv",
        ["name", "label"],
        [["v1", "happy"], ["v2", "happy"], ["a1", "angry"], ["c1", " Neutral "]],
    )
    result = evaluate("ca-mer", pred, camer_root(tmp_path), tmp_path / "camer.json")
    assert result["metrics"]["accuracy"] == pytest.approx(0.75)  # v2 wrong
    per_subset = {k: v["accuracy"] for k, v in result["metrics"]["per_subset"].items()}
    assert per_subset == {"consistent": 1.0, "video_aligned": 0.5, "audio_aligned": 1.0}
    assert "audio_dominance" not in result  # CA-MER annotations carry no cues
    assert len(result["inputs"]["sha256"]) == 4  # predictions + three annotation files
    assert (tmp_path / "camer.subsets.png").is_file()


def test_camer_jsonl_without_subsets_warns(tmp_path: Path) -> None:
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": "x", "video": "x.mp4", "label": "sad"}])
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"id": "x", "label": "sad"}])
    result = evaluate("ca-mer", pred, refs, tmp_path / "out.json")
    assert result["metrics"]["accuracy"] == 1.0 and result["metrics"]["per_subset"] == {}
    assert "no row has a 'subset'" in result["warnings"][0]
    assert not (tmp_path / "out.subsets.png").exists()


def test_mer2023_csv_without_media(tmp_path: Path) -> None:
    refs = write_csv(
        tmp_path / "test1-label.csv",
        ["name", "discrete", "valence"],
        [
            ["m1", "happy", "1.2"],
            ["m2", "sad", "-1"],
            ["m3", "", ""],
            ["m4", "Worried", "0"],
            ["m5", "neutral", "0"],
        ],
    )
    pred = write_csv(
        tmp_path / "pred.csv",
        ["name", "discrete"],
        [["m1", "Happy"], ["m2", "sad"], ["m4", "surprise"], ["m5", "neutral"]],
    )
    result = evaluate("mer2023", pred, refs, tmp_path / "mer.json")
    # truth happy sad worried neutral, pred happy sad surprise neutral: F1 1,1,0,1 with support 1 each
    assert result["n"] == 4
    assert result["metrics"]["accuracy"] == result["metrics"]["weighted_f1"] == pytest.approx(0.75)
    assert (
        "skipped 1 row(s) with an empty 'discrete'" in result["warnings"][0]
        and "'m3'" in result["warnings"][0]
    )


def test_mer2023_bad_label_names_line(tmp_path: Path) -> None:
    refs = write_csv(tmp_path / "l.csv", ["name", "discrete"], [["m1", "happy"], ["m2", "joyful"]])
    pred = write_csv(tmp_path / "p.csv", ["name", "label"], [["m1", "happy"]])
    with pytest.raises(ValueError, match=r"l\.csv, line 3: label 'joyful' not in label set"):
        run_task("mer2023", EvalOptions(pred, refs))


def test_dfew_ids_and_numeric_labels(tmp_path: Path) -> None:
    refs = write_csv(
        tmp_path / "set_1.csv", ["video_name", "label"], [["1", "1"], ["2", "2"], ["3", "7"], ["00004", "3"]]
    )
    pred = write_jsonl(
        tmp_path / "pred.jsonl",
        [
            {"id": "00001", "label": "happy"},
            {"id": "2", "label": "2"},  # id 2 = sad
            {"id": 3, "label": "disgust"},  # truth fear
            {"id": "4", "text": "She seems calm, so the emotion is neutral."},
        ],
    )
    result = evaluate("dfew", pred, refs, tmp_path / "dfew.json")
    # recalls happy 1, sad 1, fear 0, neutral 1 -> UAR = WAR = 0.75
    assert result["labels"] == ["happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"]
    assert result["metrics"]["uar"] == result["metrics"]["war"] == pytest.approx(0.75)


def test_dfew_same_clip_twice(tmp_path: Path) -> None:
    refs = write_csv(tmp_path / "set_1.csv", ["video_name", "label"], [["1", "1"]])
    pred = write_csv(tmp_path / "pred.csv", ["name", "label"], [["1", "happy"], ["00001", "sad"]])
    with pytest.raises(ValueError, match=r"same clip as .*line 2 \(both are '00001'\)"):
        run_task("dfew", EvalOptions(pred, refs))


# ----------------------------------------------------------------------------------------------------------
# emer-ov and emer-judge


def ov_refs(tmp_path: Path) -> Path:
    return write_csv(
        tmp_path / "gt.csv",
        ["name", "openset"],
        [["a", "['happy']"], ["b", "['angry']"], ["c", "['happy', 'sad']"]],
    )


def test_emer_ov_csv(tmp_path: Path) -> None:
    pred = write_csv(
        tmp_path / "pred.csv", ["name", "openset"], [["a", "['happy']"], ["b", "[]"], ["c", "[happy]"]]
    )
    result = evaluate("emer-ov", pred, ov_refs(tmp_path), tmp_path / "ov.json")
    # per sample (P, R): a (1, 1), b (0, 0), c (1, 1/2) -> P = 2/3, R = 1/2, F = 2PR/(P+R) = 4/7 on every wheel
    for level in ("level1", "level2"):
        assert result[level]["precision"] == pytest.approx(2 / 3)
        assert result[level]["recall"] == pytest.approx(0.5)
        assert result[level]["fscore"] == pytest.approx(4 / 7)
        assert result[level]["per_wheel"]["wheel3"]["fscore"] == pytest.approx(4 / 7)
    assert result["n"] == 3 and (tmp_path / "ov.wheels.png").is_file()
    assert "## Per wheel, level1" in (tmp_path / "ov.md").read_text()


def test_emer_ov_jsonl_and_allow_missing(tmp_path: Path) -> None:
    pred = write_jsonl(
        tmp_path / "pred.jsonl", [{"id": "a", "labels_ov": ["happy"]}, {"id": "c", "text": "Happy."}]
    )
    with pytest.raises(ValueError, match=r"no prediction for 1 of 3 reference id\(s\).*\['b'\]"):
        run_task("emer-ov", EvalOptions(pred, ov_refs(tmp_path)))
    result = evaluate("emer-ov", pred, ov_refs(tmp_path), tmp_path / "ov.json", allow_missing=True)
    assert result["level1"]["fscore"] == pytest.approx(4 / 7)  # b scored as an empty prediction
    assert "1 of 3 reference id(s) have no prediction" in result["warnings"][0]


def emer_v1(tmp_path: Path) -> Path:
    return write_csv(
        tmp_path / "gt-eng.csv",
        ["names", "emotions", "subtitles", "reasons"],
        [
            ["e1", "happy", "hi", "reason one"],
            ["e2", "sad", "oh", "reason two"],
            ["e3", "angry", "no", "reason three"],
        ],
    )


def test_emer_judge_scripted(tmp_path: Path) -> None:
    pred = write_jsonl(
        tmp_path / "pred.jsonl",
        [
            {"id": "e1", "text": "p1"},
            {"id": "e2", "text": "p2"},
            {"id": "e3", "label": "angry", "text": "p3"},
        ],
    )
    judge = ScriptedJudge({"p1": "Score: 8", "p2": "Score: 6", "p3": "I cannot tell."})
    result = evaluate("emer-judge", pred, emer_v1(tmp_path), tmp_path / "judge.json", scorer=judge)
    assert result["mean_score"] == pytest.approx(7.0)  # (8 + 6) / 2; e3 has no score line
    assert (result["n"], result["n_scored"], result["n_failed"], result["proxy"]) == (3, 2, 1, False)
    assert result["scores"] == {"e1": 8.0, "e2": 6.0} and result["failures"][0]["id"] == "e3"
    assert result["judge"]["model"] == "scripted"
    assert "judge failed on 1 sample(s)" in result["warnings"][0]
    assert (tmp_path / "judge.scores.png").is_file() and "## Failures" in (tmp_path / "judge.md").read_text()


class FakeProxy:
    """Stands in for EmbeddingSimilarity (no weights loaded): cosine from a fixed table."""

    def __init__(self, model_path: str | None = None, device: str = "cpu") -> None:
        self.table = {("p1", "ref one"): 0.5, ("p2", "ref two"): 0.25}

    def score(self, explanation: str, reference: str) -> JudgeResult:
        value = self.table[(explanation, reference)]
        return JudgeResult(value, f"cosine={value}", None)

    def describe(self) -> dict[str, Any]:
        return {"kind": "FakeProxy", "protocol": "PROXY: sentence-embedding cosine"}


def test_emer_judge_embedding_proxy_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emer, "EmbeddingSimilarity", FakeProxy)
    refs = write_csv(
        tmp_path / "v2.csv",
        ["name", "chinese", "english"],
        [["e1", "一", "ref one"], ["e2", "二", "ref two"], ["e3", "三", ""]],
    )
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"id": "e1", "text": "p1"}, {"id": "e2", "text": "p2"}])
    result = evaluate("emer-judge", pred, refs, tmp_path / "judge.json", judge="embedding")
    assert result["proxy"] is True and result["mean_score"] == pytest.approx(0.375)
    assert (
        result["n"] == 2 and "empty 'english'" in result["warnings"][0] and "PROXY" in result["warnings"][1]
    )
    assert "PROXY" in (tmp_path / "judge.md").read_text().splitlines()[0]


def test_emer_judge_needs_backend_and_text(tmp_path: Path) -> None:
    pred = write_jsonl(
        tmp_path / "pred.jsonl",
        [{"id": "e1", "text": "p1"}, {"id": "e2", "text": "p2"}, {"id": "e3", "label": "angry"}],
    )
    with pytest.raises(ValueError, match=r"line 3: emer-judge needs the generated 'text'"):
        run_task("emer-judge", EvalOptions(pred, emer_v1(tmp_path), judge="openai", judge_model="m"))
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"id": e, "text": "x"} for e in ("e1", "e2", "e3")])
    with pytest.raises(ValueError, match="emer-judge needs --judge"):
        run_task("emer-judge", EvalOptions(pred, emer_v1(tmp_path)))
    with pytest.raises(ValueError, match="--judge openai needs --judge-model"):
        run_task("emer-judge", EvalOptions(pred, emer_v1(tmp_path), judge="openai"))
    with pytest.raises(ValueError, match="--judge-cache applies to the openai and local judges"):
        run_task("emer-judge", EvalOptions(pred, emer_v1(tmp_path), judge="embedding", judge_cache=tmp_path))


# ----------------------------------------------------------------------------------------------------------
# bad inputs


def test_extra_prediction_ids_name_file_and_lines(tmp_path: Path) -> None:
    pred = write_jsonl(
        tmp_path / "pred.jsonl", [{"id": "s1", "label": "happy"}, {"id": "zz", "label": "sad"}]
    )
    with pytest.raises(
        ValueError,
        match=r"pred\.jsonl: 1 prediction id\(s\) are not in the references .*"
        r"\['zz' \(line 2\)\]",
    ):
        run_task("synthetic", EvalOptions(pred, syn_refs(tmp_path)))


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (
            ['{"id": "s1", "label": "happy"}', '{"id": "s1", "label": "sad"}'],
            r"line 2: duplicate id 's1' \(first at .*line 1\)",
        ),
        (['{"id": "s1", "label": "happy"}', "{oops"], r"pred\.jsonl, line 2: invalid JSON"),
        (['{"id": "s1"}'], r"line 1: id 's1' has none of 'label', 'text', 'labels_ov'"),
        (['{"label": "happy"}'], r"line 1: 'id' must be a non-empty string"),
        (['["s1", "happy"]'], r"line 1: expected a JSON object"),
        (['{"id": "s1", "label": "happy", "probs": {"fused": {"joy": 1.0}}}'], r"outside the label set"),
        (['{"id": "s1", "label": "happy", "probs": {"fused": {"happy": "x"}}}'], r"finite numbers"),
    ],
)
def test_bad_jsonl_rows(tmp_path: Path, lines: list[str], match: str) -> None:
    pred = write_jsonl(tmp_path / "pred.jsonl", lines)
    with pytest.raises(ValueError, match=match):
        run_task("synthetic", EvalOptions(pred, syn_refs(tmp_path), allow_missing=True))


@pytest.mark.parametrize(
    ("header", "rows", "match"),
    [
        (["name", "emotion"], [["s1", "happy"]], r"needs a 'label' \(or 'discrete'\)"),
        (["id", "label"], [["s1", "happy"]], r"missing column 'name'"),
        (["name", "label"], [["s1", "happy", "extra"]], r"pred\.csv, line 2: 3 fields, header has 2"),
        (["name", "label"], [["s1", "happy"], ["s1", "sad"]], r"line 3: duplicate id 's1'"),
    ],
)
def test_bad_csv_predictions(tmp_path: Path, header: list[str], rows: list[list[str]], match: str) -> None:
    pred = write_csv(tmp_path / "pred.csv", header, rows)
    with pytest.raises(ValueError, match=match):
        read_predictions(pred)


def test_missing_predictions_error_lists_ten_then_allow_missing(tmp_path: Path) -> None:
    refs = write_csv(tmp_path / "refs.csv", ["name", "discrete"], [[f"m{i:02d}", "happy"] for i in range(12)])
    pred = write_csv(tmp_path / "pred.csv", ["name", "label"], [["m00", "happy"]])
    with pytest.raises(ValueError) as info:
        run_task("mer2023", EvalOptions(pred, refs))
    message = str(info.value)
    assert "no prediction for 11 of 12 reference id(s)" in message and "(11 in all)" in message
    assert "'m10'" in message and "'m11'" not in message and "--allow-missing" in message
    out = tmp_path / "res.json"
    result = evaluate("mer2023", pred, refs, out, allow_missing=True)
    assert result["metrics"]["accuracy"] == pytest.approx(1 / 12)
    assert "11 of 12 reference id(s) have no prediction" in result["warnings"][0]
    assert result["metrics"]["confusion"][2][-1] == 11  # happy row, "unknown" column
    assert (
        "| truth \\ pred | neutral | angry | happy | sad | worried | surprise | unknown |"
        in out.with_suffix(".md").read_text()
    )


def test_out_of_set_predictions_warned(tmp_path: Path) -> None:
    refs = write_csv(tmp_path / "refs.csv", ["name", "discrete"], [["m1", "happy"], ["m2", "sad"]])
    pred = write_csv(tmp_path / "pred.csv", ["name", "label"], [["m1", "happy"], ["m2", "bored"]])
    result = run_task("mer2023", EvalOptions(pred, refs))
    assert (
        result["metrics"]["accuracy"] == 0.5
        and "1 prediction(s) outside the label set" in result["warnings"][0]
    )


def test_unknown_task_and_options() -> None:
    with pytest.raises(ValueError, match=r"task 'iemocap' unknown; valid: \['synthetic'"):
        run_task("iemocap", EvalOptions(Path("p"), Path("r")))
    with pytest.raises(ValueError, match="labels_mode='loose' unknown"):
        EvalOptions(Path("p"), Path("r"), labels_mode="loose")


# ----------------------------------------------------------------------------------------------------------
# the script itself


def run_script(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_script_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "eval" / "syn.json"
    proc = run_script(
        "synthetic", "--predictions", syn_preds(tmp_path), "--references", syn_refs(tmp_path), "--output", out
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "synthetic: n=4 accuracy=0.7500 weighted_f1=0.7500 uar=0.7500 audio_dominance=0.3333" in proc.stdout
    )
    result = json.loads(out.read_text())
    assert set(result) == {
        "task",
        "n",
        "labels",
        "labels_mode",
        "metrics",
        "audio_dominance",
        "per_path",
        "inputs",
        "warnings",
        "explanations",  # the rows carry generated text
    }
    for name in ("syn.md", "syn.confusion.png", "syn.subsets.png"):
        assert (out.parent / name).is_file(), name


def test_script_bad_input_exits_2_without_traceback(tmp_path: Path) -> None:
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"id": "s1", "label": "happy"}])
    out = tmp_path / "o.json"
    proc = run_script("synthetic", "--predictions", pred, "--references", syn_refs(tmp_path), "--output", out)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {pred}: no prediction for 3 of 4 reference id(s)")
    assert "['s2', 's3', 's4']; pass --allow-missing" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def load_script_main() -> Any:
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("case", ["missing_file", "bad_json", "bad_references"])
def test_script_main_bad_input_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    refs = syn_refs(tmp_path)
    pred = tmp_path / "pred.jsonl"
    if case == "missing_file":
        expected = f"error: predictions file not found: {pred}"
    elif case == "bad_json":
        write_jsonl(pred, ['{"id": "s1", "label": "happy"}', "not json"])
        expected = f"error: {pred}, line 2: invalid JSON"
    else:
        write_jsonl(pred, [{"id": "s1", "label": "happy"}])
        write_jsonl(refs, [{"id": "s1", "video": "a.mp4", "label": "joy"}])
        expected = (
            f"error: 1 problem(s) in {refs}:\n  - line 1 (id 's1'): label 'joy' is not in the label set"
        )
    out = tmp_path / "o.json"
    code = load_script_main()(
        ["synthetic", "--predictions", str(pred), "--references", str(refs), "--output", str(out)]
    )
    assert code == 2 and capsys.readouterr().err.startswith(expected) and not out.exists()


def test_synthetic_scores_explanation_quality_on_hand_made_rows(tmp_path: Path) -> None:
    """Generated explanations are read back per display: cue emotion, intensity word, parseable label."""
    refs = [json.loads(line) for line in syn_refs(tmp_path).read_text().splitlines()]
    refs[0]["explanation"] = "The face is a strong display and the voice a strong one. The face shows a smile (happy)."
    refs[1]["explanation"] = "The face is a strong display and the voice a faint one. The face shows tears (sad)."
    ref = write_jsonl(tmp_path / "refs.jsonl", refs)
    texts = [
        "The face is a strong display and the voice a strong one. The face shows a smile (happy). "
        "The voice is bright (happy). Emotion: happy",  # all right
        "The face is a strong display and the voice a strong one. The face shows tears (sad). "
        "The voice is loud (angry). Emotion: sad",  # cues right, the voice's intensity wrong
        "The face shows a frown (angry). The voice is loud (angry). Emotion: angry",  # face cue wrong
        "I cannot tell.",  # nothing parses
    ]
    pred = write_jsonl(tmp_path / "pred_expl.jsonl", [{"id": sid, "text": t} for (sid, *_), t in zip(SYN_REFS, texts,
                                                                                                     strict=True)])
    out = tmp_path / "expl.json"
    quality = evaluate("synthetic", pred, ref, out)["explanations"]
    assert quality["n"] == 4 and quality["parse_rate"] == pytest.approx(0.75)
    assert quality["video_cue_accuracy"] == pytest.approx(0.5) and quality["audio_cue_accuracy"] == pytest.approx(0.75)
    assert quality["video_intensity_n"] == quality["audio_intensity_n"] == 2  # only s1, s2 have reference words
    assert quality["video_intensity_accuracy"] == 1.0 and quality["audio_intensity_accuracy"] == 0.5
    assert quality["per_subset"]["audio_aligned"]["audio_cue_accuracy"] == 0.5
    assert "mentions" not in quality
    md = report_paths(out)["markdown"].read_text()
    assert "## Explanation quality" in md and "| all | 4 | 0.7500 |" in md
