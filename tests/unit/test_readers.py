"""Tests of the dataset readers and the dataset-root path check, on small files written in tmp_path."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from mllm_mer.data.paths import resolve_inside
from mllm_mer.data.readers import (
    DFEW_LABELS,
    CAMERLayout,
    label_from_answer,
    mer2023_label_rows,
    named_csv_rows,
    read_camer,
    read_dfew,
    read_emer_v1,
    read_emer_v2,
    read_mer2023,
    read_ov_labels,
    read_sharegpt,
    read_swift_jsonl,
)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _csv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


# ----------------------------------------------------------------------------------------------------------
# resolve_inside


def test_resolve_inside_accepts_paths_under_root(tmp_path):
    _touch(tmp_path / "a" / "b.mp4")
    assert resolve_inside(tmp_path, "a/b.mp4", what="clip") == (tmp_path / "a" / "b.mp4").resolve()
    assert resolve_inside(tmp_path, "a/../a/b.mp4", what="clip") == (tmp_path / "a" / "b.mp4").resolve()
    assert (
        resolve_inside(tmp_path, str(tmp_path / "a" / "b.mp4"), what="clip")
        == (tmp_path / "a/b.mp4").resolve()
    )
    assert resolve_inside(tmp_path, "not/yet/there.mp4", what="clip").name == "there.mp4"  # need not exist


@pytest.mark.parametrize("rel", ["../x.mp4", "a/../../x.mp4", "/etc/passwd"])
def test_resolve_inside_refuses_escapes(tmp_path, rel):
    (tmp_path / "root").mkdir()
    with pytest.raises(ValueError, match=r"row 7 video: path .* escapes dataset root"):
        resolve_inside(tmp_path / "root", rel, what="row 7 video")


def test_resolve_inside_follows_symlinks(tmp_path):
    root = tmp_path / "root"
    _touch(tmp_path / "outside.mp4")
    _touch(root / "real.mp4")
    os.symlink(tmp_path / "outside.mp4", root / "link_out.mp4")
    os.symlink(root / "real.mp4", root / "link_in.mp4")
    with pytest.raises(ValueError, match="escapes dataset root"):
        resolve_inside(root, "link_out.mp4", what="clip")
    assert resolve_inside(root, "link_in.mp4", what="clip") == (root / "real.mp4").resolve()


@pytest.mark.parametrize(
    ("rel", "match"), [("", "empty path"), (".", "dataset root itself"), ("a\x00b", "NUL")]
)
def test_resolve_inside_refuses_degenerate_paths(tmp_path, rel, match):
    with pytest.raises(ValueError, match=match):
        resolve_inside(tmp_path, rel, what="clip")


# ----------------------------------------------------------------------------------------------------------
# MER2023


def _mer2023(root: Path, rows: list[list[str]]) -> Path:
    _csv(root / "train-label.csv", [["name", "discrete", "valence"], *rows])
    return root


def test_read_mer2023(tmp_path):
    _touch(tmp_path / "train" / "s1.mp4")
    _touch(tmp_path / "train" / "s2.avi")
    _touch(tmp_path / "train" / "s3.mp4")
    _mer2023(tmp_path, [["s1", "happy", "1.5"], ["s2", " Worried ", "-2"], ["s3", "", ""]])
    samples = read_mer2023(tmp_path, "train")
    assert [(s.id, s.label, s.video.name) for s in samples] == [
        ("s1", "happy", "s1.mp4"),
        ("s2", "worried", "s2.avi"),
        ("s3", "", "s3.mp4"),
    ]
    assert samples[0].video.is_absolute() and samples[0].audio is None and samples[0].subset is None


def test_read_mer2023_errors(tmp_path):
    _touch(tmp_path / "train" / "s1.mp4")
    with pytest.raises(ValueError, match="split 'dev' unknown"):
        read_mer2023(tmp_path, "dev")
    with pytest.raises(ValueError, match=r"train-label\.csv: annotation file not found"):
        read_mer2023(tmp_path, "train")
    _csv(tmp_path / "train-label.csv", [["name", "valence"], ["s1", "0"]])
    with pytest.raises(ValueError, match=r"train-label\.csv: missing column 'discrete'"):
        read_mer2023(tmp_path, "train")
    _mer2023(tmp_path, [["s1", "happy", "0"], ["s2", "joy", "0"]])
    with pytest.raises(ValueError, match=r"train-label\.csv, line 3: label 'joy' not in label set"):
        read_mer2023(tmp_path, "train")
    _mer2023(tmp_path, [["s1", "happy", "0"], ["s1", "sad", "0"]])
    with pytest.raises(ValueError, match=r"line 3: duplicate sample id 's1' \(first at .*line 2\)"):
        read_mer2023(tmp_path, "train")
    _mer2023(tmp_path, [["s9", "happy", "0"]])
    with pytest.raises(
        ValueError, match=r"line 2 \(video of 's9'\): media file not found; tried .*s9\.mp4.*s9\.avi"
    ):
        read_mer2023(tmp_path, "train")
    _mer2023(tmp_path, [["../../secret", "happy", "0"]])
    with pytest.raises(
        ValueError, match=r"line 2 \(video of '\.\./\.\./secret'\): path .* escapes dataset root"
    ):
        read_mer2023(tmp_path, "train")
    _mer2023(tmp_path, [["s1", "happy"]])
    with pytest.raises(ValueError, match=r"line 2: 2 fields, header has 3"):
        read_mer2023(tmp_path, "train")


def test_mer2023_label_rows_need_no_media(tmp_path):
    path = _mer2023(tmp_path, [["s1", " Happy ", "0"], ["s2", "", ""]]) / "train-label.csv"
    assert list(mer2023_label_rows(path)) == [
        (f"{path}, line 2", "s1", "happy"),
        (f"{path}, line 3", "s2", ""),
    ]
    _mer2023(tmp_path, [["s1", "happy", "0"], ["s1", "sad", "0"]])
    with pytest.raises(ValueError, match=r"line 3: duplicate sample id 's1' \(first at .*line 2\)"):
        list(mer2023_label_rows(path))


def test_named_csv_rows(tmp_path):
    path = _csv(tmp_path / "a.csv", [["names", "text", "extra"], [" n1 ", "t1", "x"], ["n2", "", "y"]])
    rows = list(named_csv_rows(path, [("name", "names"), "text"]))
    assert rows == [(f"{path}, line 2", "n1", {"name": " n1 ", "text": "t1"}),
                    (f"{path}, line 3", "n2", {"name": "n2", "text": ""})]  # fmt: skip
    _csv(path, [["name", "text"], ["n1", "a"], [" ", "b"]])
    with pytest.raises(ValueError, match=r"a\.csv, line 3: empty name"):
        list(named_csv_rows(path, ["name", "text"]))
    _csv(path, [["name", "text"], ["n1", "a"], ["n1", "b"]])
    with pytest.raises(ValueError, match=r"line 3: duplicate sample id 'n1' \(first at .*line 2\)"):
        list(named_csv_rows(path, ["name", "text"]))


# ----------------------------------------------------------------------------------------------------------
# DFEW


def _dfew_csv(root: Path, rows: list[list[str]], split: str = "train", fold: int = 1) -> Path:
    return _csv(
        root / "EmoLabel_DataSplit" / f"{split}(single-labeled)" / f"set_{fold}.csv",
        [["video_name", "label"], *rows],
    )


def test_read_dfew_handles_padded_and_unpadded_names(tmp_path):
    _touch(tmp_path / "videos" / "00001.mp4")  # file padded, CSV not
    _touch(tmp_path / "videos" / "2.avi")  # file unpadded, CSV padded
    _touch(tmp_path / "videos" / "clip_x.mp4")
    _dfew_csv(tmp_path, [["1", "5"], ["00002", "3"], ["clip_x", "7"]])
    samples = read_dfew(tmp_path, "train", 1)
    assert [(s.id, s.label, s.video.name) for s in samples] == [
        ("00001", "surprise", "00001.mp4"),
        ("00002", "neutral", "2.avi"),
        ("clip_x", "fear", "clip_x.mp4"),
    ]
    assert DFEW_LABELS[0] == "happy" and DFEW_LABELS[6] == "fear"


def test_read_dfew_custom_video_dir_and_errors(tmp_path):
    _touch(tmp_path / "Clip" / "clip_224x224" / "00003.mp4")
    _dfew_csv(tmp_path, [["3", "1"]], split="test", fold=5)
    assert read_dfew(tmp_path, "test", 5, video_dir="Clip/clip_224x224")[0].label == "happy"
    with pytest.raises(ValueError, match=r"fold 6 unknown"):
        read_dfew(tmp_path, "test", 6)
    with pytest.raises(ValueError, match=r"split 'val' unknown"):
        read_dfew(tmp_path, "val", 1)
    _dfew_csv(tmp_path, [["3", "8"]], split="test", fold=5)
    with pytest.raises(ValueError, match=r"set_5\.csv, line 2: label '8' is not an integer in 1\.\.7"):
        read_dfew(tmp_path, "test", 5, video_dir="Clip/clip_224x224")
    _dfew_csv(tmp_path, [["3", "1"], ["003", "2"]], split="test", fold=5)
    with pytest.raises(ValueError, match=r"line 3: duplicate sample id '00003'"):
        read_dfew(tmp_path, "test", 5, video_dir="Clip/clip_224x224")
    _dfew_csv(tmp_path, [["4", "1"]], split="test", fold=5)
    with pytest.raises(
        ValueError, match=r"line 2 \(video of '4'\): media file not found; tried .*/4\.mp4.*00004\.avi"
    ):
        read_dfew(tmp_path, "test", 5, video_dir="Clip/clip_224x224")
    root = tmp_path / "dfew"
    _dfew_csv(root, [["3", "1"]], split="test", fold=5)
    _touch(tmp_path / "outside" / "00003.mp4")
    with pytest.raises(ValueError, match="escapes dataset root"):
        read_dfew(root, "test", 5, video_dir="../outside")


# ----------------------------------------------------------------------------------------------------------
# EMER v1 / v2, OV labels


def test_read_emer_v1_v2_and_ov(tmp_path):
    media = tmp_path / "video"
    _touch(media / "n1.mp4")
    _touch(media / "n2.avi")
    v1 = _csv(
        tmp_path / "gt-eng.csv",
        [
            ["names", "emotions", "subtitles", "reasons"],
            ["n1", "Sad", "I lost it.", "Tears and a low voice."],
        ],
    )
    (s,) = read_emer_v1(v1, media)
    assert (s.id, s.label, s.subtitle, s.explanation, s.video.name) == (
        "n1", "sad", "I lost it.", "Tears and a low voice.", "n1.mp4",
    )  # fmt: skip
    v2 = _csv(
        tmp_path / "v2.csv",
        [["name", "chinese", "english"], ["n1", "中文描述", "English text."], ["n2", "", "x"]],
    )
    samples = read_emer_v2(v2, media)
    assert [(s.id, s.label, s.explanation) for s in samples] == [("n1", "", "English text."), ("n2", "", "x")]
    assert read_emer_v2(v2, media, language="chinese")[0].explanation == "中文描述"
    ov = _csv(tmp_path / "ov.csv", [["name", "openset"], ["n1", "['happy', 'Excited ']"], ["n2", "[]"]])
    assert [(s.id, s.label) for s in read_ov_labels(ov, media)] == [("n1", "happy, Excited"), ("n2", "")]


def test_emer_and_ov_errors(tmp_path):
    media = tmp_path / "video"
    _touch(media / "n1.mp4")
    v1 = _csv(tmp_path / "v1.csv", [["names", "emotions", "subtitles", "reasons"], ["n1", "joy", "", ""]])
    with pytest.raises(ValueError, match=r"v1\.csv, line 2: label 'joy' not in label set"):
        read_emer_v1(v1, media)
    v1 = _csv(tmp_path / "v1.csv", [["names", "emotions", "reasons"], ["n1", "sad", ""]])
    with pytest.raises(ValueError, match=r"v1\.csv: missing column 'subtitles'"):
        read_emer_v1(v1, media)
    v2 = _csv(tmp_path / "v2.csv", [["name", "chinese", "english"], ["n1", "", "x"]])
    with pytest.raises(ValueError, match="language 'french' unknown"):
        read_emer_v2(v2, media, language="french")
    v2 = _csv(tmp_path / "v2.csv", [["id", "chinese", "english"], ["n1", "", "x"]])
    with pytest.raises(ValueError, match=r"missing column 'name' or 'names'"):
        read_emer_v2(v2, media)
    ov = _csv(tmp_path / "ov.csv", [["name", "openset"], ["n1", "['a']"], ["n2", "[1, 2]"]])
    with pytest.raises(ValueError, match=r"ov\.csv, line 3: unparseable list '\[1, 2\]'"):
        read_ov_labels(ov, media)
    ov = _csv(tmp_path / "ov.csv", [["name", "openset"], [str(tmp_path / "secret"), "['a']"]])
    with pytest.raises(ValueError, match="escapes dataset root"):
        read_ov_labels(ov, media)


# ----------------------------------------------------------------------------------------------------------
# CA-MER


def test_read_camer_json_default_layout(tmp_path):
    _touch(tmp_path / "video_aligned" / "v1.mp4")
    _touch(tmp_path / "audio_aligned" / "a1.avi")
    _touch(tmp_path / "consistent" / "c1.mp4")
    (tmp_path / "video_aligned.json").write_text(json.dumps([{"file_name": "v1", "label": "Happy"}]))
    (tmp_path / "audio_aligned.json").write_text(json.dumps([{"file_name": "a1.avi", "label": "sad"}]))
    (tmp_path / "consistent.json").write_text(json.dumps([{"file_name": "c1", "label": "angry", "extra": 1}]))
    samples = read_camer(tmp_path)
    assert [(s.id, s.label, s.subset, s.video.name) for s in samples] == [
        ("c1", "angry", "consistent", "c1.mp4"),
        ("v1", "happy", "video_aligned", "v1.mp4"),
        ("a1", "sad", "audio_aligned", "a1.avi"),
    ]
    only = read_camer(tmp_path, ["audio_aligned"])
    assert [s.id for s in only] == ["a1"]


def test_read_camer_text_lines_custom_layout(tmp_path):
    layout = CAMERLayout(annotation="ann/{subset}.txt", media="media/{subset}/{name}")
    _touch(tmp_path / "media" / "consistent" / "sample_00000001.mp4")
    _touch(tmp_path / "media" / "consistent" / "sample_00000002.avi")
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "consistent.txt").write_text(
        "sample_00000001 120 worried\n\nsample_00000002 87 neutral\n"
    )
    samples = read_camer(tmp_path, ["consistent"], layout=layout)
    assert [(s.id, s.label, s.subset, s.video.name) for s in samples] == [
        ("sample_00000001", "worried", "consistent", "sample_00000001.mp4"),
        ("sample_00000002", "neutral", "consistent", "sample_00000002.avi"),
    ]


def test_read_camer_errors(tmp_path):
    layout = CAMERLayout(annotation="{subset}.txt")
    _touch(tmp_path / "consistent" / "x.mp4")
    (tmp_path / "consistent.txt").write_text("x 10 happy\nx happy\n")
    with pytest.raises(ValueError, match=r"consistent\.txt, line 2: expected 'name <frames> label'"):
        read_camer(tmp_path, ["consistent"], layout=layout)
    (tmp_path / "consistent.txt").write_text("x 10 joy\n")
    with pytest.raises(ValueError, match=r"consistent\.txt, line 1: label 'joy' not in label set"):
        read_camer(tmp_path, ["consistent"], layout=layout)
    (tmp_path / "consistent.txt").write_text("../../x 10 happy\n")
    with pytest.raises(ValueError, match="escapes dataset root"):
        read_camer(tmp_path, ["consistent"], layout=layout)
    (tmp_path / "consistent.json").write_text(json.dumps([{"file_name": "x"}]))
    with pytest.raises(
        ValueError, match=r"consistent\.json, record 1: expected an object with string 'file_name'"
    ):
        read_camer(tmp_path, ["consistent"])
    (tmp_path / "consistent.json").write_text('[{"file_name": "x", "label": "happy"},\n oops]')
    with pytest.raises(ValueError, match=r"consistent\.json, line 2: invalid JSON"):
        read_camer(tmp_path, ["consistent"])
    (tmp_path / "consistent.json").write_text(json.dumps([{"file_name": "x", "label": "happy"}]))
    _touch(tmp_path / "video_aligned" / "x.mp4")
    (tmp_path / "video_aligned.json").write_text(json.dumps([{"file_name": "x", "label": "sad"}]))
    with pytest.raises(ValueError, match=r"video_aligned\.json, record 1: duplicate sample id 'x'"):
        read_camer(tmp_path, ["consistent", "video_aligned"])
    with pytest.raises(ValueError, match=r"subsets \['conflict'\] unknown"):
        read_camer(tmp_path, ["conflict"])
    with pytest.raises(ValueError, match=r"annotation='anns\.json' must contain '\{subset\}'"):
        CAMERLayout(annotation="anns.json")
    with pytest.raises(ValueError, match=r"media='\{subset\}/\{name\}/\{frame\}' is not a valid pattern"):
        CAMERLayout(media="{subset}/{name}/{frame}")
    with pytest.raises(ValueError, match="annotation file not found"):
        read_camer(tmp_path, ["audio_aligned"])


# ----------------------------------------------------------------------------------------------------------
# LLaMA-Factory sharegpt and ms-swift


def test_label_from_answer_takes_last_mention():
    labels = ("neutral", "angry", "happy", "sad", "worried", "surprise")
    assert label_from_answer("The face looks sad at first, but overall she is HAPPY.", labels) == "happy"
    assert label_from_answer("Not sadness, not surprised: neutral", labels) == "neutral"  # whole words only
    assert label_from_answer("no emotion word here", labels) is None


def test_read_sharegpt(tmp_path):
    _touch(tmp_path / "clips" / "a.mp4")
    _touch(tmp_path / "clips" / "b.mp4")
    _touch(tmp_path / "clips" / "b.wav")
    records = [
        {
            "messages": [
                {"role": "system", "content": "You recognise emotions."},
                {"role": "user", "content": "<video>What emotion is shown?"},
                {"role": "assistant", "content": "The voice sounds sad, yet the smile says happy."},
            ],
            "videos": ["clips/a.mp4"],
        },
        {
            "id": "clip-b",
            "conversations": [
                {"from": "human", "value": "<video><audio>Emotion?"},
                {"from": "gpt", "value": "Angry."},
            ],
            "videos": ["clips/b.mp4"],
            "audios": ["clips/b.wav"],
        },
        {"id": 7, "messages": [{"role": "user", "content": "<video>Emotion?"}], "videos": ["clips/a.mp4"]},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    samples = read_sharegpt(path)
    assert [(s.id, s.label, s.explanation) for s in samples] == [
        ("a", "happy", "The voice sounds sad, yet the smile says happy."),
        ("clip-b", "angry", ""),  # the answer is just the label
        ("7", "", ""),  # no assistant turn: unlabelled
    ]
    assert samples[0].audio is None and samples[1].audio == (tmp_path / "clips" / "b.wav").resolve()
    # label from a field, media relative to another root
    records = [{"emotion": "Sad", "messages": [{"role": "user", "content": "<audio>?"}], "audios": ["b.wav"]}]
    path.write_text(json.dumps(records))
    (s,) = read_sharegpt(path, media_root=tmp_path / "clips", label_field="emotion")
    assert (s.id, s.label, s.video, s.audio.name) == ("b", "sad", None, "b.wav")


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (
            {"messages": [{"role": "user", "content": "Emotion?"}], "videos": ["a.mp4"]},
            r"0 <video> tag\(s\).*1 path",
        ),
        (
            {"messages": [{"role": "user", "content": "<video><video>"}], "videos": ["a.mp4", "a.mp4"]},
            "at most one of each",
        ),
        (
            {"messages": [{"role": "user", "content": "<video>"}], "videos": ["../a.mp4"]},
            "escapes dataset root",
        ),
        (
            {"messages": [{"role": "user", "content": "<video>"}], "videos": ["nope.mp4"]},
            "media file 'nope.mp4' not found",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "<video>"},
                    {"role": "assistant", "content": "I see joy."},
                ],
                "videos": ["a.mp4"],
            },
            "names no label",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no video and no audio"),
        ({"conversation": []}, "expected a list under 'messages' or 'conversations'"),
        ({"messages": [{"role": "user"}], "videos": []}, "message 1 must be an object"),
    ],
)
def test_read_sharegpt_errors(tmp_path, record, match):
    _touch(tmp_path / "a.mp4")
    (tmp_path / "d.json").write_text(
        json.dumps([{"messages": [{"role": "user", "content": "<video>"}], "videos": ["a.mp4"]}, record])
    )
    with pytest.raises(ValueError, match=r"d\.json, record 2.*" + match):
        read_sharegpt(tmp_path / "d.json")


def test_read_sharegpt_label_field_errors(tmp_path):
    _touch(tmp_path / "a.mp4")
    rec = {"messages": [{"role": "user", "content": "<video>"}], "videos": ["a.mp4"], "emotion": "joy"}
    (tmp_path / "d.json").write_text(json.dumps([rec]))
    with pytest.raises(ValueError, match=r"record 1: label 'joy' not in label set"):
        read_sharegpt(tmp_path / "d.json", label_field="emotion")
    with pytest.raises(ValueError, match=r"record 1: label field 'label' missing"):
        read_sharegpt(tmp_path / "d.json", label_field="label")


def test_read_swift_jsonl(tmp_path):
    _touch(tmp_path / "v" / "x.mp4")
    _touch(tmp_path / "v" / "x.wav")
    lines = [
        {"id": "x", "messages": [{"role": "user", "content": "<video><audio>Which emotion?"},
                                 {"role": "assistant", "content": "worried"}],
         "videos": ["v/x.mp4"], "audios": ["v/x.wav"]},
    ]  # fmt: skip
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    (s,) = read_swift_jsonl(path)
    assert (s.id, s.label, s.video.name, s.audio.name, s.explanation) == (
        "x",
        "worried",
        "x.mp4",
        "x.wav",
        "",
    )
    path.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"train\.jsonl, line 2: invalid JSON"):
        read_swift_jsonl(path)
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[0]) + "\n")
    with pytest.raises(
        ValueError, match=r"train\.jsonl, line 2: duplicate sample id 'x' \(first at .*line 1\)"
    ):
        read_swift_jsonl(path)
    conv = {"conversations": [{"from": "human", "value": "<video>"}], "videos": ["v/x.mp4"]}
    path.write_text(json.dumps(conv) + "\n")
    with pytest.raises(ValueError, match=r"line 1: expected a list under 'messages'"):
        read_swift_jsonl(path)


def test_chat_jsonl_lines_split_on_newlines_only(tmp_path):
    """A U+2028 or U+0085 inside a JSON string stays in its line (str.splitlines would cut the record)."""
    _touch(tmp_path / "v" / "x.mp4")
    record = {"id": "x", "messages": [{"role": "user", "content": "<video>Calm\u2028or\x85not?"},
                                      {"role": "assistant", "content": "neutral"}],
              "videos": ["v/x.mp4"]}  # fmt: skip
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\r\n\r\n" + "{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.jsonl, line 3: invalid JSON"):
        read_swift_jsonl(path)
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    (s,) = read_swift_jsonl(path)
    assert (s.id, s.label) == ("x", "neutral")
