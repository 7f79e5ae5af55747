"""Export -> reload with plain transformers -> same logits as the unmerged run -> generate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5OmniThinkerForConditionalGeneration

from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.generation import inference_loader, load_for_inference
from mllm_mer.prompts import load_prompt
from tests.smoke.conftest import REPO

pytestmark = pytest.mark.smoke


def test_merged_export_matches_run_and_generates(trained_run, syn_dir, tmp_path):
    run, _ = trained_run
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), "--run", str(run), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "mllm_mer" / "export.json").read_text())
    assert summary["mode"] == "merged" and summary["methods"]["lora"] is True
    card = (out / "README.md").read_text()
    assert "## Metrics" in card and "sha256" in card and "CC BY-NC 4.0" in card and "consistent" in card

    merged = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(out)  # plain transformers
    processor = AutoProcessor.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ref = load_for_inference(run_dir=run)
    samples = read_jsonl(syn_dir / "test.jsonl", ref.cfg.data.labels)[:2]
    batch = next(iter(inference_loader(ref, samples, load_prompt("label"), 2)))
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)
              and k not in ("labels", "class_id", "token_modality", "prompt_mask")}
    with torch.no_grad():
        a = ref.mer.backbone(**inputs, use_audio_in_video=True).logits
        b = merged(**inputs, use_audio_in_video=True).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    gen = merged.generate(**inputs, use_audio_in_video=True, max_new_tokens=3, do_sample=False,
                          pad_token_id=processor.tokenizer.pad_token_id)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


def test_export_refuses_existing_dir(trained_run, tmp_path):
    run, _ = trained_run
    (tmp_path / "x").mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), "--run", str(run), "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "exists" in proc.stderr
