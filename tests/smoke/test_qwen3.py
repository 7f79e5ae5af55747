"""The second backbone family end to end: finetune -> generate -> evaluate on the tiny Qwen3-Omni twin.

One run of the real scripts (`accelerate launch scripts/finetune.py model.path=<tiny qwen3 dir>`, then
`scripts/generate.py` and `scripts/evaluate.py`); every other smoke test runs on the Qwen2.5-Omni twin,
and the unit tests cover both families piece by piece.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.smoke.conftest import REPO, base_args, check, run_finetune

pytestmark = pytest.mark.smoke


def test_finetune_generate_evaluate_on_qwen3_omni(tiny_dir_qwen3, syn_dir, tmp_path):
    run = tmp_path / "run"
    args = [*base_args(tiny_dir_qwen3, syn_dir, run, tmp_path / "cache"), "train.max_steps=3"]
    out = check(run_finetune(args))
    assert "trainable" in out and "[dev step 3] accuracy=" in out
    info = json.loads((run / "run_info.json").read_text())
    assert info["backbone"] == str(tiny_dir_qwen3) and info["backbone_family"] == "qwen3_omni"
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k and ".language_model.layers." in k for k in adapter)  # no tower LoRA
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["exclude_modules"] == ".*(audio_tower|visual).*"

    preds = tmp_path / "preds.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate.py"), "--run", str(run), "--data",
         str(syn_dir / "test.jsonl"), "--prompt", "explain", "--output", str(preds), "--max-new-tokens", "4",
         "--batch-size", "6"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 12 and all(abs(sum(r["probs"]["fused"].values()) - 1) < 1e-5 for r in rows)

    report_path = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), "synthetic", "--predictions", str(preds),
         "--references", str(syn_dir / "test.jsonl"), "--output", str(report_path)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert set(report["metrics"]["per_subset"]) == {"consistent", "video_aligned", "audio_aligned"}
