"""MoSE through the real scripts: finetune (1 process and 2-process DDP on CPU), then generate --run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from mllm_mer.adapters.mose.model import MOSE_WEIGHTS
from tests.smoke.conftest import REPO, base_args, check, run_finetune

pytestmark = pytest.mark.smoke


def test_mose_finetune_then_generate(tiny_dir, syn_dir, tmp_path):
    run = tmp_path / "mose"
    out = check(run_finetune([*base_args(tiny_dir, syn_dir, run, tmp_path / "c"), "adapter=mose",
                              "train.max_steps=3", "train.save_every=0", "--verbose"]))
    assert "mose " in out and "MoSE on 8 modules" in out  # an INFO line: shown with --verbose
    weights = load_file(run / MOSE_WEIGHTS)
    assert weights and all(".mose_" in k and ".language_model." in k for k in weights)
    assert not (run / "adapter").exists() and (run / "heads.safetensors").is_file()
    assert any((run / "tb").iterdir())
    gates = json.loads((run / "gate_stats.json").read_text())
    assert gates["step"] == 3 and gates["train"]["steps"] == 3
    for modality in ("text", "audio", "video"):
        usage = gates["train"][modality]["expert_usage"]
        assert len(usage) == 4 and sum(usage) == pytest.approx(1.0, abs=1e-5)
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("mose_load_balance" in r and "mose_modality_balance" in r for r in rows)

    preds = tmp_path / "preds.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate.py"), "--run", str(run), "--data",
         str(syn_dir / "test.jsonl"), "--prompt", "label", "--output", str(preds), "--max-new-tokens", "4",
         "--batch-size", "6"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 12 and all(abs(sum(r["probs"]["fused"].values()) - 1) < 1e-5 for r in rows)


@pytest.mark.slow  # DDP stays in the default tier through test_finetune.py::test_ddp_two_processes_on_cpu
def test_mose_ddp_two_processes_on_cpu(tiny_dir, syn_dir, tmp_path):
    run = tmp_path / "ddp"
    launch = ["--config_file", str(REPO / "configs" / "accelerate" / "ddp_cpu.yaml")]
    check(run_finetune([*base_args(tiny_dir, syn_dir, run, tmp_path / "c"), "adapter=mose",
                        "train.max_steps=2", "data.modality_dropout=0.5", "data.decode_cache=false",
                        "data.feature_cache=false"], launch))  # the uncached path: decoded when read
    assert json.loads((run / "run_info.json").read_text())["num_processes"] == 2
    assert not (tmp_path / "c").exists()  # data.decode_cache=false: the ranks decode when they read
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 2
    assert (run / MOSE_WEIGHTS).is_file() and (run / "gate_stats.json").is_file()
