"""Tests of the synthetic conflict media set: decoding, determinism, balance, construction, noise, CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

import mllm_mer
from mllm_mer.data.schema import CUE_KEYS, MER2023_LABELS, SUBSETS
from mllm_mer.data.synthetic import (
    _PHRASES,
    _VOICE,
    SyntheticConfig,
    _explain,
    _plan_split,
    ensure_synthetic_set,
    explanation_corpus,
    intensity_word,
    make_synthetic_set,
    render_face_frames,
    render_voice,
    write_clip,
)
from mllm_mer.labels import parse_label

REPO = Path(__file__).resolve().parents[2]
SMALL = SyntheticConfig(seed=5, train_size=12, dev_size=12, test_size=12)
FIELDS = ["id", "video", "audio", "subtitle", "label", "explanation", "subset", "cues"]


def _rows(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def _decode(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(T, H, W, 3) uint8 frames, (N,) float32 mono audio, audio sample rate."""
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(path)) as container:
        rate = container.streams.audio[0].codec_context.sample_rate
        audio = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    assert audio.shape[0] == 1, "mono"
    return frames, audio[0], rate


def _pitch(audio: np.ndarray, sample_rate: int) -> float:
    """Median spectral-peak frequency (60-700 Hz) over the loud frames: a crude F0 estimate in Hz."""
    n, hop = 1024, 256
    frames = np.lib.stride_tricks.sliding_window_view(audio, n)[::hop] * np.hanning(n)
    energy = (frames**2).mean(1)
    spec = np.abs(np.fft.rfft(frames[energy > 0.25 * energy.max()], 4 * n, axis=1))
    freqs = np.fft.rfftfreq(4 * n, 1 / sample_rate)
    band = (freqs > 60) & (freqs < 700)
    return float(np.median(freqs[band][spec[:, band].argmax(1)]))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_set(tmp_path_factory.mktemp("syn") / "set", SMALL)


def test_layout_fields_and_manifest(small_set: Path):
    assert sorted(p.name for p in small_set.iterdir()) == [
        "dev.jsonl",
        "manifest.json",
        "media",
        "test.jsonl",
        "train.jsonl",
    ]
    ids = []
    for split in ("train", "dev", "test"):
        for row in _rows(small_set, split):
            assert list(row) == FIELDS
            assert row["video"] == f"media/{row['id']}.mp4" and (small_set / row["video"]).is_file()
            assert row["audio"] is None
            assert row["label"] in MER2023_LABELS and row["subset"] in SUBSETS
            assert sorted(row["cues"]) == sorted(CUE_KEYS)
            assert row["explanation"].endswith(f"Overall the emotion is {row['label']}.")
            assert row["subtitle"] in _PHRASES[row["cues"]["text"]]
            ids.append(row["id"])
    assert len(ids) == len(set(ids)) == 36
    assert len(list((small_set / "media").iterdir())) == 36
    manifest = json.loads((small_set / "manifest.json").read_text())
    assert manifest["config"] == SMALL.to_dict()
    assert manifest["config_hash"] == SMALL.config_hash()
    assert manifest["version"] == mllm_mer.__version__
    assert manifest["counts"]["dev"]["subset"] == {"consistent": 4, "video_aligned": 4, "audio_aligned": 4}
    assert sum(manifest["counts"]["train"]["label"].values()) == 12
    assert not [p for p in small_set.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_clips_decode_with_right_shapes_and_lengths(small_set: Path):
    for row in _rows(small_set, "dev")[:4]:
        path = small_set / row["video"]
        frames, audio, rate = _decode(path)
        assert frames.shape == (SMALL.num_frames, SMALL.frame_size, SMALL.frame_size, 3) == (8, 56, 56, 3)
        assert rate == SMALL.sample_rate
        # AAC pads up to a whole 1024-sample frame; the priming delay is removed by the demuxer.
        assert SMALL.num_samples <= audio.shape[0] < SMALL.num_samples + 1024
        assert np.abs(audio[: SMALL.num_samples]).max() > 0.05
        with av.open(str(path)) as container:
            assert container.duration / 1e6 == pytest.approx(SMALL.clip_seconds, abs=0.07)
            assert container.streams.video[0].codec_context.name == "h264"
            assert container.streams.video[0].format.name == "yuv420p"
            assert container.streams.audio[0].codec_context.name == "aac"


def test_same_seed_same_files_other_seed_other_rows(small_set: Path, tmp_path: Path):
    again = make_synthetic_set(tmp_path / "again", SMALL)
    for split in ("train", "dev", "test"):
        assert (again / f"{split}.jsonl").read_bytes() == (small_set / f"{split}.jsonl").read_bytes()
    for name in (
        "dev_00000.mp4",
        "train_00003.mp4",
        "test_00011.mp4",
    ):  # libx264 is deterministic as configured
        a, b = (again / "media" / name).read_bytes(), (small_set / "media" / name).read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    other = _plan_split(SyntheticConfig(seed=6, train_size=12, dev_size=12, test_size=12), "dev")
    assert [(c.label, c.subset) for c in other] != [(c.label, c.subset) for c in _plan_split(SMALL, "dev")]


def test_dev_test_balanced_and_train_conflict_rate():
    cfg = SyntheticConfig(seed=0, train_size=480, dev_size=96, test_size=96, train_conflict_rate=0.2)
    for split in ("dev", "test"):
        clips = _plan_split(cfg, split)
        assert Counter(c.subset for c in clips) == {s: 32 for s in SUBSETS}
        assert Counter(c.label for c in clips) == {label: 16 for label in MER2023_LABELS}
        for subset in SUBSETS:
            per_label = Counter(c.label for c in clips if c.subset == subset)
            assert (
                set(per_label) == set(MER2023_LABELS)
                and max(per_label.values()) - min(per_label.values()) <= 1
            )
    train = Counter(c.subset for c in _plan_split(cfg, "train"))
    assert train == {"consistent": 384, "video_aligned": 48, "audio_aligned": 48}


def _check_construction(label: str, subset: str, video: str, audio: str) -> None:
    if subset == "consistent":
        assert video == audio == label
    elif subset == "video_aligned":
        assert video == label != audio
    else:
        assert audio == label != video


def test_cues_follow_the_conflict_construction(small_set: Path):
    for split in ("train", "dev", "test"):
        for row in _rows(small_set, split):
            _check_construction(row["label"], row["subset"], row["cues"]["video"], row["cues"]["audio"])
        for row in _rows(small_set, split):
            if row["subset"] == "video_aligned":  # the masking voice is named with its faint intensity
                assert row["explanation"].startswith("The face is a strong display and the voice a faint one.")
                assert f"({row['cues']['audio']})." in row["explanation"]
    cfg = SyntheticConfig(seed=1, train_size=300, dev_size=30, test_size=30, train_conflict_rate=0.5)
    for split in ("train", "dev", "test"):
        for c in _plan_split(cfg, split):
            _check_construction(c.label, c.subset, c.video_cue, c.audio_cue)
            genuine, masked = (c.video_intensity, c.audio_intensity)
            if c.subset == "audio_aligned":
                genuine, masked = masked, genuine
            assert genuine >= 0.9
            if c.subset != "consistent":
                assert masked == pytest.approx(cfg.masking_intensity, abs=0.051)
                assert c.audio_cue != c.video_cue


def test_intensity_words():
    assert [intensity_word(s) for s in (0.0, 0.35, 0.549, 0.55, 0.7, 0.849, 0.85, 0.95, 1.0)] == [
        "faint", "faint", "faint", "clear", "clear", "clear", "strong", "strong", "strong",
    ]  # fmt: skip


def test_weak_displays_vary_consistent_clips_only():
    base = dict(seed=4, train_size=1200, dev_size=0, test_size=0, train_conflict_rate=0.2)
    plain = _plan_split(SyntheticConfig(**base), "train")
    varied = _plan_split(SyntheticConfig(**base, weak_display_rate=0.5), "train")
    # Without weak displays every consistent display is strong (the plan is the one from before the field).
    assert {intensity_word(c.video_intensity) for c in plain if c.subset == "consistent"} == {"strong"}
    for modality in ("video", "audio"):
        words = Counter(intensity_word(getattr(c, f"{modality}_intensity")) for c in varied if c.subset == "consistent")
        n = sum(words.values())  # r = 0.5: half strong, a quarter clear, a quarter faint
        assert abs(words["strong"] / n - 0.5) < 0.05
        assert abs(words["clear"] / n - 0.25) < 0.05 and abs(words["faint"] / n - 0.25) < 0.05
    both_weak = np.mean([c.video_intensity < 0.85 and c.audio_intensity < 0.85 for c in varied if c.subset == "consistent"])
    assert abs(both_weak - 0.25) < 0.05  # independent per modality
    for c in varied:  # cues, labels and conflicts are untouched; conflicts keep genuine vs masking
        _check_construction(c.label, c.subset, c.video_cue, c.audio_cue)
        if c.subset == "consistent":
            assert c.video_cue == c.audio_cue == c.label
        else:
            genuine, masked = (c.video_intensity, c.audio_intensity)
            if c.subset == "audio_aligned":
                genuine, masked = masked, genuine
            assert genuine >= 0.9 and abs(masked - 0.4) <= 0.051
        for s in (c.video_intensity, c.audio_intensity):
            assert 0.3 <= s <= 1.0 and not 0.5 < s < 0.6 and not 0.8 < s < 0.9  # bands well inside the words


def test_explanations_name_each_cue_with_its_intensity_and_parse():
    cfg = SyntheticConfig(seed=4, train_size=300, dev_size=0, test_size=0, train_conflict_rate=0.4,
                          weak_display_rate=0.5)
    for c in _plan_split(cfg, "train"):
        text = _explain(c)
        words = intensity_word(c.video_intensity), intensity_word(c.audio_intensity)
        assert text.startswith("The face is a {} display and the voice a {} one. The face shows ".format(*words))
        assert f"({c.video_cue}). The voice is " in text and f"({c.audio_cue}). The subtitle says " in text
        assert text.endswith(f"Overall the emotion is {c.label}.")
        assert parse_label(text + f"\nEmotion: {c.label}", MER2023_LABELS) == c.label
        assert parse_label(text, MER2023_LABELS) == c.label
    corpus = " ".join(explanation_corpus())
    for word in ("faint", "clear", "strong", *MER2023_LABELS):
        assert word in corpus


def test_noise_zero_and_one_in_the_plan():
    clean = SyntheticConfig(
        seed=2, train_size=600, dev_size=0, test_size=0, audio_noise=0.0, video_noise=0.0, text_noise=0.0
    )
    for c in _plan_split(clean, "train"):
        assert c.video_shown == c.video_cue and c.audio_shown == c.audio_cue and c.text_cue == c.label
    noisy = SyntheticConfig(
        seed=2, train_size=1200, dev_size=0, test_size=0, audio_noise=1.0, video_noise=1.0, text_noise=1.0
    )
    clips = _plan_split(noisy, "train")
    for shown, cue in (("video_shown", "video_cue"), ("audio_shown", "audio_cue")):
        # Shown emotion independent of the cue: agreement at chance (1/6), every emotion shown for every cue.
        agree = np.mean([getattr(c, shown) == getattr(c, cue) for c in clips])
        assert 0.12 < agree < 0.22
        for label in MER2023_LABELS:
            assert {getattr(c, shown) for c in clips if getattr(c, cue) == label} == set(MER2023_LABELS)
    # Text: the expressed emotion has the same distribution whatever the label.
    happy_given_happy = np.mean([c.text_cue == "happy" for c in clips if c.label == "happy"])
    happy_given_other = np.mean([c.text_cue == "happy" for c in clips if c.label != "happy"])
    assert abs(happy_given_happy - happy_given_other) < 0.06


def test_clean_audio_pitch_separates_classes_even_when_masked(tmp_path: Path):
    estimates = {}
    for i, label in enumerate(MER2023_LABELS):
        for intensity in (1.0, 0.4):
            rng = np.random.default_rng(i)
            audio = render_voice(label, intensity, 0.0, rng)
            path = tmp_path / f"{label}_{intensity}.mp4"
            write_clip(path, render_face_frames(label, 1.0, 0.0, rng), audio, 4, 16000)
            _, decoded, rate = _decode(path)
            estimates[label, intensity] = _pitch(decoded[:32000], rate)
    for (label, _), hz in estimates.items():  # within 1.5 semitones of the class level (levels ~5.3 apart)
        assert abs(12 * np.log2(hz / _VOICE[label]["f0"])) < 1.5, (label, hz)
    # Intensity shows in loudness: the masked rendering is quieter.
    rng = np.random.default_rng(0)
    assert (
        np.abs(render_voice("happy", 1.0, 0.0, rng)).max()
        > 1.5 * np.abs(render_voice("happy", 0.4, 0.0, rng)).max()
    )


def test_video_rendering_intensity_and_noise():
    def face(label: str, intensity: float, noise: float) -> np.ndarray:
        return render_face_frames(label, intensity, noise, np.random.default_rng(0)).astype(float)

    happy, sad, neutral = face("happy", 1.0, 0.0), face("sad", 1.0, 0.0), face("neutral", 1.0, 0.0)
    weak_happy = face("happy", 0.4, 0.0)
    # Same jitter (same seed), different class: a large difference (mean |diff| in 0..255 units).
    assert np.abs(happy - sad).mean() > 8.0
    # The masked display lies between neutral and the genuine one.
    assert 1.0 < np.abs(weak_happy - neutral).mean() < 0.7 * np.abs(happy - neutral).mean()

    # Noise lowers the face contrast: the class difference shrinks once the pixel noise is averaged out.
    def contrast(noise: float) -> float:
        return float(np.abs(face("happy", 1.0, noise).mean(0) - face("sad", 1.0, noise).mean(0)).mean())

    assert contrast(1.0) < 0.35 * contrast(0.0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"audio_noise": 1.5}, "audio_noise"),
        ({"video_noise": -0.1}, "video_noise"),
        ({"text_noise": float("nan")}, "text_noise"),
        ({"train_conflict_rate": 2}, "train_conflict_rate"),
        ({"masking_intensity": -1.0}, "masking_intensity"),
        ({"weak_display_rate": 1.2}, "weak_display_rate"),
        ({"weak_display_rate": True}, "weak_display_rate"),
        ({"frame_size": 57}, "frame_size"),
        ({"frame_size": 10}, "frame_size"),
        ({"fps": 0}, "fps"),
        ({"sample_rate": 12345}, "sample_rate"),
        ({"clip_seconds": 0.0}, "clip_seconds"),
        ({"clip_seconds": 1.1}, "clip_seconds"),
        ({"train_size": -1}, "train_size"),
        ({"dev_size": 2.5}, "dev_size"),
        ({"seed": -3}, "seed"),
        ({"labels": ("happy",)}, "labels"),
        ({"labels": ("happy", "joy")}, "labels"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides: dict, field: str):
    with pytest.raises(ValueError, match=f"SyntheticConfig.{field}"):
        SyntheticConfig(**overrides)


def test_ensure_reuses_rebuilds_and_refuses(small_set: Path, tmp_path: Path):
    stamp = (small_set / "manifest.json").stat().st_mtime_ns
    assert ensure_synthetic_set(small_set, SMALL) == small_set
    assert (small_set / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt

    target = tmp_path / "set"
    tiny = SyntheticConfig(seed=0, train_size=3, dev_size=0, test_size=0)
    ensure_synthetic_set(target, tiny)
    changed = SyntheticConfig(seed=1, train_size=4, dev_size=0, test_size=0)
    ensure_synthetic_set(target, changed)
    assert json.loads((target / "manifest.json").read_text())["config_hash"] == changed.config_hash()
    assert len(_rows(target, "train")) == 4 and len(list((target / "media").iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temp or old dirs left

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        ensure_synthetic_set(foreign, tiny)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "set"]


def test_script_runs_and_rejects_bad_values(tmp_path: Path):
    script = str(REPO / "scripts" / "make_synthetic.py")
    out = tmp_path / "syn"
    args = [
        "--out",
        str(out),
        "--seed",
        "3",
        "--train",
        "3",
        "--dev",
        "3",
        "--test",
        "3",
        "--text-noise",
        "0.5",
    ]
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "'consistent': 1" in done.stdout
    assert len(_rows(out, "dev")) == 3
    assert json.loads((out / "manifest.json").read_text())["config"]["seed"] == 3
    # The script's default worker pool gives the same bytes as one in-process worker.
    cfg = SyntheticConfig(seed=3, train_size=3, dev_size=3, test_size=3, text_noise=0.5)
    same = make_synthetic_set(tmp_path / "inproc", cfg, workers=1)
    for path in sorted((same / "media").iterdir()) + [same / "train.jsonl"]:
        assert path.read_bytes() == (out / path.relative_to(same)).read_bytes(), path.name
    bad = subprocess.run(
        [sys.executable, script, "--out", str(out), "--audio-noise", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "SyntheticConfig.audio_noise" in bad.stderr


def _crude_features(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Video: mean grey frame pooled to 14x14; audio: log spectrum 0-1 kHz in 10 Hz bins."""
    frames, audio, _ = _decode(path)
    grey = frames.astype(np.float32).mean((0, 3)) / 255.0
    video = (grey - grey.mean()).reshape(14, 4, 14, 4).mean((1, 3)).ravel()
    spectrum = np.abs(np.fft.rfft(audio[:32000]))[:2000]  # 0.5 Hz bins
    return video, np.log1p(spectrum.reshape(100, 20).mean(1))


def test_consistent_clips_learnable_from_crude_features(tmp_path: Path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cfg = SyntheticConfig(seed=0, train_size=90, dev_size=0, test_size=0, train_conflict_rate=0.0)
    root = make_synthetic_set(tmp_path / "learn", cfg)
    rows = _rows(root, "train")
    feats = [_crude_features(root / r["video"]) for r in rows]
    y = np.array([r["label"] for r in rows])
    accuracy = {}
    for i, name in enumerate(("video", "audio")):
        x = np.stack([f[i] for f in feats])
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1)).fit(x[:60], y[:60])
        accuracy[name] = float((clf.predict(x[60:]) == y[60:]).mean())
    # Chance is 1/6; noise 0.1 replaces ~8% of the cues. Measured: video 0.70, audio 0.93.
    assert accuracy["video"] >= 0.5 and accuracy["audio"] >= 0.75, accuracy
