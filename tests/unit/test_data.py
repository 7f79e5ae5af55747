"""JSONL reader, media decoding and the collator on real mp4 files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from mllm_mer.data.collate import IGNORE_INDEX, MerCollator
from mllm_mer.data.dataset import (
    DecodeOptions,
    DecodingDataset,
    MerDataset,
    build_media_dataset,
    check_share,
    load_media,
    streamed_media,
)
from mllm_mer.data.jsonl import DataError, read_jsonl
from mllm_mer.data.media import MediaError, decode_sample_media
from mllm_mer.data.schema import MER2023_LABELS, Modality
from mllm_mer.prompts import load_prompt

OPTS = DecodeOptions(fps=4.0, max_frames=32, sample_rate=16000, max_audio_seconds=30.0)


def row(**kw) -> dict:
    base = {
        "id": "s1",
        "video": "media/a.mp4",
        "audio": None,
        "subtitle": "hi",
        "label": "happy",
        "explanation": "",
        "subset": "consistent",
        "cues": {},
    }
    base.update(kw)
    return base


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def write_mp4(path: Path, seconds: float = 2.0, audio: bool = True, fps: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width = v.height = 56
        v.pix_fmt = "yuv420p"
        a = c.add_stream("aac", rate=16000, layout="mono") if audio else None
        for i in range(int(seconds * fps)):
            img = np.full((56, 56, 3), 20 * i % 255, np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        if a is not None:
            wav = (0.2 * np.sin(np.linspace(0, 2000, int(seconds * 16000)))).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(wav, format="flt", layout="mono")
            frame.sample_rate = 16000
            for p in a.encode(frame):
                c.mux(p)
            for p in a.encode():
                c.mux(p)
    return path


def test_reader_reads_synthetic_split(syn_dir):
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)
    assert len(samples) == 24
    s = samples[0]
    assert s.video.is_file() and s.video.is_relative_to(syn_dir.resolve()) and s.audio is None
    assert set(s.cues) == {"video", "audio", "text"}


def test_reader_collects_every_problem_with_line_and_id(tmp_path):
    write_mp4(tmp_path / "media" / "a.mp4", seconds=1)
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            row(),
            row(id="s2", video="media/missing.mp4"),
            row(id="s3", label="joy"),
            row(id="s1"),
            "{not json",
            row(id="s5", video="../outside.mp4"),
            row(id="s6", video="/etc/passwd"),
            row(id="s7", extra=1),
        ],
    )
    with pytest.raises(DataError) as exc:
        read_jsonl(p, MER2023_LABELS)
    msg = str(exc.value)
    assert "line 2 (id 's2'): video file not found" in msg and "missing.mp4" in msg
    assert "label 'joy' is not in the label set" in msg
    assert "line 4 (id 's1'): duplicate id, first seen on line 1" in msg
    assert "line 5: not valid JSON" in msg
    assert "escapes dataset root" in msg and "'../outside.mp4'" in msg and "'/etc/passwd'" in msg
    assert "unknown field(s) ['extra']" in msg
    assert len(exc.value.problems) == 7


def test_media_root_resolves_paths_against_a_named_folder_and_keeps_the_escape_check(tmp_path):
    write_mp4(tmp_path / "clips" / "media" / "a.mp4", seconds=1)
    p = write_jsonl(tmp_path / "ann" / "d.jsonl", [row()])  # media beside, not below, the file
    with pytest.raises(DataError, match="video file not found"):
        read_jsonl(p, MER2023_LABELS)
    (s,) = read_jsonl(p, MER2023_LABELS, media_root=tmp_path / "clips")
    assert s.video == (tmp_path / "clips" / "media" / "a.mp4").resolve()
    absolute = write_jsonl(tmp_path / "ann" / "abs.jsonl", [row(video=str(tmp_path / "clips" / "media" / "a.mp4"))])
    assert read_jsonl(absolute, MER2023_LABELS, media_root=tmp_path / "clips")[0].video == s.video
    write_mp4(tmp_path / "elsewhere" / "b.mp4", seconds=1)
    for bad in ("../elsewhere/b.mp4", str(tmp_path / "elsewhere" / "b.mp4")):
        p = write_jsonl(tmp_path / "ann" / "bad.jsonl", [row(video=bad)])
        with pytest.raises(DataError, match="escapes dataset root"):
            read_jsonl(p, MER2023_LABELS, media_root=tmp_path / "clips")


def test_decoded_media_arrays_are_writable(tmp_path):
    """The processor hands frames to torch.from_numpy, which warns on read-only arrays (the views
    np.frombuffer gives of the Arrow bytes): the dataset serves writable copies."""
    write_mp4(tmp_path / "media" / "a.mp4", seconds=1)
    samples = read_jsonl(write_jsonl(tmp_path / "d.jsonl", [row()]), MER2023_LABELS)
    _, media = MerDataset(samples, build_media_dataset(samples, OPTS, tmp_path / "cache"), OPTS)[0]
    assert media.frames.flags.writeable and media.audio.flags.writeable


def test_symlink_escaping_root_is_refused(tmp_path):
    outside = write_mp4(tmp_path / "outside" / "x.mp4", seconds=1)
    root = tmp_path / "root"
    (root / "media").mkdir(parents=True)
    (root / "media" / "a.mp4").symlink_to(outside)
    p = write_jsonl(root / "d.jsonl", [row()])
    with pytest.raises(DataError, match="escapes dataset root"):
        read_jsonl(p, MER2023_LABELS)


def test_decode_frames_and_audio_in_one_pass(tmp_path):
    f = write_mp4(tmp_path / "a.mp4", seconds=2.0)
    m = decode_sample_media("s", f, None, fps=4.0, max_frames=32, sample_rate=16000, max_audio_seconds=30)
    assert m.frames.shape == (8, 56, 56, 3) and m.frames.dtype == np.uint8
    assert abs(len(m.audio) / 16000 - 2.0) < 0.15  # AAC adds ~0.1 s of priming/padding
    assert m.audio.dtype == np.float32


def test_media_errors_name_sample_and_file(tmp_path):
    silent = write_mp4(tmp_path / "silent.mp4", audio=False)
    with pytest.raises(MediaError, match=r"sample 'x': .*silent.mp4: has no audio track"):
        decode_sample_media("x", silent, None, fps=4, max_frames=32, sample_rate=16000, max_audio_seconds=30)
    with pytest.raises(MediaError, match=r"sample 'y': .*nope.mp4: file not found"):
        decode_sample_media(
            "y", tmp_path / "nope.mp4", None, fps=4, max_frames=32, sample_rate=16000, max_audio_seconds=30
        )
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 100)
    with pytest.raises(MediaError, match=r"sample 'z': .*broken.mp4: cannot be decoded"):
        decode_sample_media("z", broken, None, fps=4, max_frames=32, sample_rate=16000, max_audio_seconds=30)


def test_long_audio_is_refused_not_cut(tmp_path):
    f = write_mp4(tmp_path / "long.mp4", seconds=3.0)
    with pytest.raises(MediaError, match=r"audio is 3\.\d+ s, longer than the 2 s window"):
        decode_sample_media("L", f, None, fps=4, max_frames=32, sample_rate=16000, max_audio_seconds=2.0)


def test_media_dataset_caches_and_invalidates(tmp_path):
    write_mp4(tmp_path / "media" / "a.mp4", seconds=1)
    samples = read_jsonl(write_jsonl(tmp_path / "d.jsonl", [row()]), MER2023_LABELS)
    ds = build_media_dataset(samples, OPTS, tmp_path / "cache")
    again = build_media_dataset(samples, OPTS, tmp_path / "cache")
    assert again._fingerprint == ds._fingerprint
    write_mp4(tmp_path / "media" / "a.mp4", seconds=2)  # changed file -> new fingerprint, re-decoded
    changed = build_media_dataset(samples, OPTS, tmp_path / "cache")
    assert changed._fingerprint != ds._fingerprint
    _, media = MerDataset(samples, changed, OPTS)[0]
    assert media.frames.shape[0] == 8


def test_media_dataset_lists_every_bad_sample(tmp_path):
    write_mp4(tmp_path / "media" / "a.mp4", seconds=1)
    write_mp4(tmp_path / "media" / "b.mp4", seconds=1, audio=False)
    shutil.copy(tmp_path / "media" / "b.mp4", tmp_path / "media" / "c.mp4")
    rows = [row(), row(id="b", video="media/b.mp4"), row(id="c", video="media/c.mp4")]
    samples = read_jsonl(write_jsonl(tmp_path / "d.jsonl", rows), MER2023_LABELS)
    with pytest.raises(MediaError) as exc:
        build_media_dataset(samples, OPTS, tmp_path / "cache")
    assert "2 sample(s)" in str(exc.value) and "'b'" in str(exc.value) and "'c'" in str(exc.value)


def test_media_dataset_sees_a_rewrite_that_restores_size_and_mtime(tmp_path):
    clip = write_mp4(tmp_path / "media" / "a.mp4", seconds=1)
    samples = read_jsonl(write_jsonl(tmp_path / "d.jsonl", [row()]), MER2023_LABELS)
    ds = build_media_dataset(samples, OPTS, tmp_path / "cache")
    st = clip.stat()
    data = bytearray(clip.read_bytes())
    data[data.index(b"Copyleft")] ^= 0x01  # x264's version SEI: still decodes
    clip.write_bytes(bytes(data))
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert build_media_dataset(samples, OPTS, tmp_path / "cache")._fingerprint != ds._fingerprint


def test_decoding_dataset_serves_what_the_decode_cache_serves(syn_dir, tmp_path):
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:3]
    streamed_samples, streamed, more = load_media(samples, OPTS, None)
    assert not any(tmp_path.iterdir())  # nothing written
    cached_samples, cached, problems = load_media(samples, OPTS, tmp_path / "cache")
    assert isinstance(streamed, DecodingDataset) and isinstance(cached, MerDataset)
    assert cached_samples == streamed_samples == samples and problems == more == []
    for i in range(3):
        (s1, m1), (s2, m2) = cached[i], streamed[i]
        assert s1 == s2
        np.testing.assert_array_equal(m1.frames, m2.frames)
        np.testing.assert_array_equal(m1.audio, m2.audio)


def test_decoding_dataset_checks_every_sample_before_serving(tmp_path):
    write_mp4(tmp_path / "media" / "a.mp4", seconds=1)
    write_mp4(tmp_path / "media" / "b.mp4", seconds=1, audio=False)
    (tmp_path / "media" / "c.mp4").write_bytes(b"not a video")
    rows = [row(), row(id="b", video="media/b.mp4"), row(id="c", video="media/c.mp4")]
    samples = read_jsonl(write_jsonl(tmp_path / "d.jsonl", rows), MER2023_LABELS)
    with pytest.raises(MediaError) as exc:
        load_media(samples, OPTS, None)
    assert "2 sample(s)" in str(exc.value) and "'b'" in str(exc.value) and "'c'" in str(exc.value)
    good, ds, problems = load_media(samples, OPTS, None, skip_bad=True)
    assert [s.id for s in good] == ["s1"] and len(ds) == 1 and len(problems) == 2
    assert ds[0][1].frames.shape[0] == 4
    # two ranks split the checking pass (rank 0: s1, c; rank 1: b) and serve the same samples
    shares = [check_share(samples, OPTS, rank, 2) for rank in (0, 1)]
    assert [[i for i, _ in share] for share in shares] == [["c"], ["b"]]
    split = streamed_media(samples, OPTS, shares[1] + shares[0], skip_bad=True)
    assert split[0] == good and split[2] == problems  # problems in sample order, whatever the gather order


@pytest.fixture()
def items(syn_dir, tmp_path):
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:3]
    ds = build_media_dataset(samples, OPTS, tmp_path / "cache")
    mds = MerDataset(samples, ds, OPTS)
    return [mds[i] for i in range(3)]


def make_collator(backbone, train: bool) -> MerCollator:
    return MerCollator(
        backbone.processor,
        backbone.token_ids,
        load_prompt("explain"),
        load_prompt("system", kind="free").text,
        MER2023_LABELS,
        train=train,
    )


def test_collator_training_batch(any_backbone, items):
    backbone = any_backbone
    batch = make_collator(backbone, True)(items)
    ids, labels, tm = batch["input_ids"], batch["labels"], batch["token_modality"]
    tok = backbone.processor.tokenizer
    assert batch["use_audio_in_video"] is True
    for i, (sample, _) in enumerate(items):
        answer = tok.decode(ids[i][labels[i] != IGNORE_INDEX])
        assert answer.endswith(f"Emotion: {sample.label}<|im_end|>")
        assert answer.startswith(sample.explanation)
        # the prompt mask never covers the answer, and covers no padding
        assert not (batch["prompt_mask"][i] & (labels[i] != IGNORE_INDEX)).any()
        assert not (batch["prompt_mask"][i] & ~batch["attention_mask"][i].bool()).any()
        assert batch["class_id"][i] == MER2023_LABELS.index(sample.label)
    # one video token per merged 2x2 patch group, one audio token per audio-tower output frame
    n_video = int(batch["video_grid_thw"].prod(-1).sum()) // 4
    assert int((tm == int(Modality.VIDEO)).sum()) == n_video
    n_audio = int((ids == backbone.token_ids.audio).sum())
    assert int((tm == int(Modality.AUDIO)).sum()) == n_audio > 0
    assert batch["attention_mask"][:, 0].all()  # right padding


def test_collator_inference_batch_is_left_padded(any_backbone, items):
    backbone = any_backbone
    batch = make_collator(backbone, False)(items)
    assert batch["labels"] is None
    assert batch["attention_mask"][:, -1].all()
    tail = backbone.processor.tokenizer.decode(batch["input_ids"][0, -12:])
    assert tail.endswith("assistant\n")


def test_collator_video_with_its_audio_has_the_layout_the_model_expects(any_backbone, items):
    """`<vision_bos><audio_bos> video/audio tokens <audio_eos><vision_eos>`, with each family's own tokens
    (get_rope_index of both families finds an audio-in-video block by vision_bos followed by audio_bos)."""
    ids_ = any_backbone.token_ids
    batch = make_collator(any_backbone, False)(items)
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    start = row.index(ids_.vision_bos)
    end = row.index(ids_.vision_eos)
    assert row[start + 1] == ids_.audio_bos and row[end - 1] == ids_.audio_eos
    assert set(row[start + 2 : end - 1]) == {ids_.video, ids_.audio}
    assert row.count(ids_.vision_bos) == row.count(ids_.audio_bos) == 1
