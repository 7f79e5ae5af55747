"""The bad-input corpus: every broken file or row gives an error naming the sample and the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import numpy as np
import pytest

from mllm_mer.data.jsonl import DataError, read_jsonl
from mllm_mer.data.media import MediaError, decode_sample_media
from mllm_mer.data.schema import MER2023_LABELS
from tests.unit.test_data import row, write_jsonl, write_mp4


def write_audio_only(path: Path, seconds: float = 1.0, amplitude: float = 0.2) -> Path:
    with av.open(str(path), "w", format="mp4") as c:
        a = c.add_stream("aac", rate=16000, layout="mono")
        wav = (amplitude * np.sin(np.linspace(0, 900, int(seconds * 16000)))).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(wav, format="flt", layout="mono")
        frame.sample_rate = 16000
        for p in a.encode(frame):
            c.mux(p)
        for p in a.encode():
            c.mux(p)
    return path


def write_silent_mp4(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=4)
        v.width = v.height = 56
        v.pix_fmt = "yuv420p"
        a = c.add_stream("aac", rate=16000, layout="mono")
        for _ in range(4):
            for p in v.encode(av.VideoFrame.from_ndarray(np.zeros((56, 56, 3), np.uint8), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="flt", layout="mono")
        frame.sample_rate = 16000
        for p in a.encode(frame):
            c.mux(p)
        for p in a.encode():
            c.mux(p)
    return path


def decode(sid: str, path: Path, **kw):
    opts = {"fps": 4.0, "max_frames": 32, "sample_rate": 16000, "max_audio_seconds": 30.0, **kw}
    return decode_sample_media(sid, path, None, **opts)


@pytest.fixture()
def media(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "media"
    good = write_mp4(d / "good.mp4", seconds=1)
    files = {"good": good}
    files["zero"] = d / "zero.mp4"
    files["zero"].write_bytes(b"")
    files["truncated"] = d / "truncated.mp4"
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    files["no_audio"] = write_mp4(d / "no_audio.mp4", seconds=1, audio=False)
    files["silent"] = write_silent_mp4(d / "silent.mp4")
    files["audio_only"] = write_audio_only(d / "audio_only.mp4")
    files["long"] = write_mp4(d / "long.mp4", seconds=3)
    files["garbage"] = d / "garbage.mp4"
    files["garbage"].write_bytes(os.urandom(4096))
    return files


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("zero", {}, "file is empty (0 bytes)"),
        ("truncated", {}, "cannot be decoded"),
        ("no_audio", {}, "has no audio track"),
        ("silent", {}, "audio track is silent"),
        ("audio_only", {}, "has no video stream"),
        ("long", {"max_audio_seconds": 2.0}, "longer than the 2 s window"),
        ("garbage", {}, "cannot be decoded"),
    ],
)
def test_bad_media_named(media, name, kwargs, message):
    with pytest.raises(MediaError) as exc:
        decode(f"id_{name}", media[name], **kwargs)
    text = str(exc.value)
    assert f"sample 'id_{name}'" in text and str(media[name]) in text and message in text


def test_silent_audio_can_be_allowed_and_good_file_decodes(media):
    assert decode("s", media["silent"], allow_silent_audio=True).audio is not None
    assert decode("g", media["good"]).frames.shape[1:] == (56, 56, 3)


def test_bad_rows_named_and_skippable(tmp_path, media):
    outside = tmp_path.parent / f"{tmp_path.name}_outside.mp4"
    outside.write_bytes(media["good"].read_bytes())
    (tmp_path / "media" / "link.mp4").symlink_to(outside)
    rows = [
        row(id="ok", video="media/good.mp4"),
        row(id="ctrl", video="media/good.mp4", subtitle="hi\x07there"),
        row(id="huge", video="media/good.mp4", subtitle="x" * 100_000),
        row(id="badlabel", video="media/good.mp4", label="joyful"),
        row(id="ok", video="media/good.mp4"),
        "this is not json",
        row(id="dotdot", video="../../etc/passwd"),
        row(id="abs", video="/etc/passwd"),
        row(id="link", video="media/link.mp4"),
        row(id="missing", video="media/missing.mp4"),
    ]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as exc:
        read_jsonl(path, MER2023_LABELS)
    problems = exc.value.problems
    expected = {
        "ctrl": "control characters", "huge": "100000 characters", "badlabel": "label 'joyful'",
        "dotdot": "escapes dataset root", "abs": "escapes dataset root", "link": "escapes dataset root",
        "missing": "video file not found",
    }
    for sid, what in expected.items():
        assert any(f"'{sid}'" in p and what in p for p in problems), (sid, problems)
    assert any("line 5 (id 'ok'): duplicate id" in p for p in problems)
    assert any(p.startswith("line 6: not valid JSON") for p in problems)
    assert len(problems) == 9
    skipped: list[str] = []
    good = read_jsonl(path, MER2023_LABELS, skipped=skipped)
    assert [s.id for s in good] == ["ok"] and len(skipped) == 9 and all(str(path) in p for p in skipped)
    assert json.dumps(skipped)  # serialisable for data_report.json


def test_nonfinite_loss_policy(tmp_path):
    from mllm_mer.config import load_config
    from mllm_mer.training.checkpoint import TrainState
    from mllm_mer.training.loop import NonFiniteLossError, handle_nonfinite

    state = TrainState(step=7, epoch=1, batch_in_epoch=3)
    stop = load_config(None, ["data.train=x", f"train.output_dir={tmp_path}"])
    with pytest.raises(NonFiniteLossError, match=r"loss=nan at step 8 .*\['a', 'b'\].*last good checkpoint: none"):
        handle_nonfinite(stop, state, ["a", "b"], 1, float("nan"))
    skip = load_config(None, ["data.train=x", f"train.output_dir={tmp_path}", "train.nan_policy=skip",
                              "train.max_nonfinite_skips=2"])
    handle_nonfinite(skip, state, ["a"], 2, float("inf"))  # skipped, logged
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_skips=2"):
        handle_nonfinite(skip, state, ["a"], 3, float("inf"))
