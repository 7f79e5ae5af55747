"""Tests of `mllm_mer.probes`: targets, probe fitting and layer choice on hand-made features, pooling on the twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.schema import MER2023_LABELS, Modality, Sample
from mllm_mer.fusion.heads import pool_by_modality
from mllm_mer.generation import inference_loader, load_for_inference
from mllm_mer.probes import PooledFeatures, fit_probe, pooled_hidden_states, probe_report, probe_targets
from mllm_mer.prompts import load_prompt


def _samples(n: int, rng: np.random.Generator, prefix: str) -> list[Sample]:
    out = []
    for i in range(n):
        subset = ("consistent", "video_aligned", "audio_aligned")[i % 3]
        label = MER2023_LABELS[int(rng.integers(6))]
        other = MER2023_LABELS[(MER2023_LABELS.index(label) + 1 + int(rng.integers(5))) % 6]
        video, audio = {"consistent": (label, label), "video_aligned": (label, other),
                        "audio_aligned": (other, label)}[subset]
        out.append(Sample(id=f"{prefix}{i}", video=None, label=label, subset=subset,
                          cues={"video": video, "audio": audio, "text": "neutral"}))
    return out


def _features(samples: list[Sample], rng: np.random.Generator, informative_layer: int) -> PooledFeatures:
    """(N, 3, 4, 8) noise; at `informative_layer`, the audio slot encodes the audio cue (one-hot, dims 0-5) and
    the video slot the genuine modality (+-1.5 on dim 0)."""
    x = rng.normal(size=(len(samples), 3, 4, 8)).astype(np.float32)
    for i, s in enumerate(samples):
        x[i, informative_layer, 1, MER2023_LABELS.index(s.cues["audio"])] += 4.0
        if s.subset != "consistent":
            x[i, informative_layer, 2, 0] += 1.5 if s.subset == "video_aligned" else -1.5
    return PooledFeatures(ids=[s.id for s in samples], features=torch.from_numpy(x))


def test_probe_targets():
    s = _samples(3, np.random.default_rng(0), "t")
    t = probe_targets(s)
    assert t["genuine"] == [None, "video", "audio"]
    assert t["audio_cue"] == [x.cues["audio"] for x in s] and t["video_cue"] == [x.cues["video"] for x in s]
    assert probe_targets([Sample(id="x", video=None)])["audio_cue"] == [None]


def test_fit_probe_separable_and_chance():
    rng = np.random.default_rng(0)
    y = ["a", "b"] * 50
    x = rng.normal(size=(100, 5)) + np.array([[3.0 if v == "a" else -3.0] + [0] * 4 for v in y])
    out = fit_probe(x[:60], y[:60], x[60:], y[60:])
    assert out["test_accuracy"] == 1.0 and out["n_train"] == 60 and out["n_test"] == 40
    noise = rng.normal(size=(400, 5))
    yr = list(rng.choice(["a", "b"], 400))
    assert abs(fit_probe(noise[:200], yr[:200], noise[200:], yr[200:])["test_accuracy"] - 0.5) < 0.15
    with pytest.raises(ValueError, match="at least two classes"):
        fit_probe(x[:4], ["a"] * 4, x[4:8], y[4:8])
    with pytest.raises(ValueError, match="differ in length"):
        fit_probe(x[:4], y[:3], x[4:8], y[4:8])


def test_probe_report_picks_the_informative_layer_from_train_only():
    rng = np.random.default_rng(1)
    train, test = _samples(180, rng, "tr"), _samples(90, rng, "te")
    f_train, f_test = _features(train, rng, 2), _features(test, rng, 2)
    report = probe_report(f_train, train, f_test, test)
    assert report["audio_cue"]["selected_layer"] == 2 and report["audio_cue"]["test_accuracy"] > 0.9
    assert report["genuine"]["selected_layer"] == 2 and report["genuine"]["test_accuracy"] > 0.8
    assert report["genuine"]["n_train"] == 120 and report["genuine"]["n_test"] == 60
    assert len(report["genuine"]["per_layer"]) == 3 and report["genuine"]["per_layer"][0] < 0.75
    assert report["video_cue"]["test_accuracy"] < 0.5  # nothing encodes the video cue
    assert report["audio_cue"]["slots"] == ["audio"] and report["genuine"]["slots"] == ["text", "audio", "video", "last"]
    assert set(report["genuine"]["per_subset"]) == {"video_aligned", "audio_aligned"}
    assert set(report["audio_cue"]["per_subset"]) == {"consistent", "video_aligned", "audio_aligned"}
    n_sub = {s: sum(x.subset == s for x in test) for s in ("video_aligned", "audio_aligned")}
    overall = sum(report["genuine"]["per_subset"][s] * n for s, n in n_sub.items()) / sum(n_sub.values())
    assert overall == pytest.approx(report["genuine"]["test_accuracy"])
    # The audio cue is in the audio slot only: read from the video slot, the probe is at chance.
    other = probe_report(f_train, train, f_test, test, targets=("audio_cue",), slots={"audio_cue": ("video",)})
    assert other["audio_cue"]["test_accuracy"] < 0.4
    with pytest.raises(ValueError, match="unknown pooled slots"):
        probe_report(f_train, train, f_test, test, targets=("audio_cue",), slots={"audio_cue": ("face",)})
    # The choice never reads test targets: scrambling them changes the scores, not the selection.
    flipped = [Sample(id=s.id, video=None, label=s.label, subset={"video_aligned": "audio_aligned",
               "audio_aligned": "video_aligned"}.get(s.subset, s.subset), cues=s.cues) for s in test]
    again = probe_report(f_train, train, f_test, flipped, targets=("genuine",))
    for key in ("selected_layer", "selected_c", "cv_accuracy", "n_train"):
        assert again["genuine"][key] == report["genuine"][key]
    assert again["genuine"]["test_accuracy"] == pytest.approx(1 - report["genuine"]["test_accuracy"])


def test_probe_report_rejects_misaligned_features_and_skips_one_class_targets():
    rng = np.random.default_rng(2)
    train, test = _samples(30, rng, "tr"), _samples(12, rng, "te")
    f_train, f_test = _features(train, rng, 1), _features(test, rng, 1)
    with pytest.raises(ValueError, match="train features do not follow"):
        probe_report(f_train, train[::-1], f_test, test)
    with pytest.raises(ValueError, match="unknown probe targets"):
        probe_report(f_train, train, f_test, test, targets=("face",))
    consistent = [s for s in train if s.subset == "consistent"]
    sub = PooledFeatures(ids=[s.id for s in consistent], features=f_train.features[[train.index(s) for s in consistent]])
    assert "skipped" in probe_report(sub, consistent, f_test, test, targets=("genuine",))["genuine"]


def test_pooled_hidden_states_on_the_tiny_twin(tiny_dir, syn_dir):
    model = load_for_inference(model_path=str(tiny_dir))
    samples = read_jsonl(syn_dir / "dev.jsonl", MER2023_LABELS)[:3]
    loader = inference_loader(model, samples, load_prompt("label"), batch_size=2)
    pooled = pooled_hidden_states(model.backbone.model, loader)
    layers = model.backbone.model.config.text_config.num_hidden_layers
    hidden = model.backbone.model.config.text_config.hidden_size
    assert pooled.ids == [s.id for s in samples]
    assert pooled.features.shape == (3, layers + 1, 4, hidden) and pooled.features.dtype == torch.float32
    batch = next(iter(loader))  # layer 0 = embeddings: text slot is the mean text-token embedding
    emb = model.backbone.model.get_input_embeddings()(batch["input_ids"])
    text = (batch["token_modality"] == int(Modality.TEXT)) & batch["prompt_mask"]
    expected = emb[0][text[0]].mean(0)
    torch.testing.assert_close(pooled.features[0, 0, 0], expected, rtol=1e-4, atol=1e-5)
    out = model.backbone.model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask",
                               "input_features", "feature_attention_mask", "pixel_values_videos",
                               "video_grid_thw", "video_second_per_grid")},
                               use_audio_in_video=batch["use_audio_in_video"], output_hidden_states=True)
    last = pool_by_modality(out.hidden_states[-1], batch["token_modality"], batch["prompt_mask"])
    torch.testing.assert_close(pooled.features[:2, -1], last, rtol=1e-4, atol=1e-5)
