"""finetune -> generate -> evaluate with the real scripts on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.schema import Modality
from mllm_mer.generation import generate_rows, load_for_inference, predict_rows
from tests.smoke.conftest import REPO

pytestmark = pytest.mark.smoke


def test_generate_rows_and_head_predictions(trained_run, syn_dir, tmp_path):
    run, _ = trained_run
    model = load_for_inference(run_dir=run)
    samples = read_jsonl(syn_dir / "test.jsonl", model.cfg.data.labels)[:3]
    options = dataclasses.replace(model.cfg.generate, prompt="ov", max_new_tokens=4, batch_size=2)
    rows = list(generate_rows(model, samples, options, False))
    assert [r["id"] for r in rows] == [s.id for s in samples]
    for r in rows:
        assert r["prompt"] == "ov" and len(r["prompt_sha256"]) == 64 and isinstance(r["labels_ov"], list)
        assert r["label"] in (*model.cfg.data.labels, "unknown")
        assert abs(sum(r["probs"]["fused"].values()) - 1) < 1e-5
    heads = list(predict_rows(model, samples, batch_size=3, prompt_name="ov"))
    for r, h in zip(rows, heads, strict=True):
        assert h["probs"]["fused"] == pytest.approx(r["probs"]["fused"], abs=1e-5)  # same prompt, other batching
        assert h["head_label"] == max(h["probs"]["fused"], key=h["probs"]["fused"].get)
        assert h["label_source"] == "generated" and h["label"] in (*model.cfg.data.labels, "unknown")


def test_predict_rows_without_video_or_audio(trained_run, syn_dir):
    """use_video=False / use_audio=False take that modality out of the batches the heads see."""
    run, _ = trained_run
    model = load_for_inference(run_dir=run)
    samples = read_jsonl(syn_dir / "test.jsonl", model.cfg.data.labels)[:3]
    batches: list[dict] = []

    def record(_module, args, _kwargs):
        batches.append(args[0])  # the collated batch MerModel.forward receives

    hook = model.mer.register_forward_pre_hook(record, with_kwargs=True)
    conditions = ((True, True), (False, True), (True, False))  # (use_video, use_audio)
    try:
        rows = [
            list(predict_rows(model, samples, batch_size=3, prompt_name="label", use_video=v, use_audio=a))
            for v, a in conditions
        ]
    finally:
        hook.remove()
    assert len(batches) == 3
    both, audio_only, video_only = (set(b["token_modality"].unique().tolist()) for b in batches)
    assert {Modality.AUDIO, Modality.VIDEO} <= both
    assert Modality.VIDEO not in audio_only and Modality.AUDIO in audio_only
    assert Modality.AUDIO not in video_only and Modality.VIDEO in video_only
    assert "pixel_values_videos" in batches[0] and "pixel_values_videos" not in batches[1]
    assert "input_features" in batches[0] and "input_features" not in batches[2]
    for got in rows:
        assert [r["id"] for r in got] == [s.id for s in samples]
    assert rows[1][0]["probs"]["fused"] != rows[0][0]["probs"]["fused"]


def test_generate_then_evaluate_scripts(trained_run, syn_dir, tmp_path):
    run, _ = trained_run
    preds = tmp_path / "preds.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate.py"), "--run", str(run), "--data",
         str(syn_dir / "test.jsonl"), "--prompt", "explain", "--output", str(preds), "--max-new-tokens", "6",
         "--batch-size", "6"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 12 and all(r["prompt"] == "explain" for r in rows)
    meta = json.loads((tmp_path / "preds.jsonl.meta.json").read_text())
    assert meta["prompt_sha256"] == rows[0]["prompt_sha256"] and meta["generation"]["do_sample"] is False

    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), "synthetic", "--predictions", str(preds),
         "--references", str(syn_dir / "test.jsonl"), "--output", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert set(report["metrics"]["per_subset"]) == {"consistent", "video_aligned", "audio_aligned"}
    assert "weighted_f1" in report["metrics"] and "index" in report["audio_dominance"]
    assert "fused" in report["per_path"]
    assert out.with_suffix(".md").is_file() and list(tmp_path.glob("eval*.png"))
