"""The real `scripts/finetune.py` on the tiny model for a few steps: run dir, resume, DDP, DeepSpeed."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.smoke.conftest import REPO, base_args, check, run_finetune

pytestmark = pytest.mark.smoke


def test_finetune_writes_run_dir_and_resume_matches_uninterrupted(tiny_dir, syn_dir, trained_run, tmp_path):
    cache = tmp_path / "cache"
    a, out = trained_run
    assert "trainable" in out and "[dev step 6] accuracy=" in out
    for name in (
        "config.yaml",
        "run_info.json",
        "final_metrics.json",
        "heads.safetensors",
        "train_log.jsonl",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (a / name).is_file(), name
    assert any((a / "tb").iterdir())
    metrics = json.loads((a / "final_metrics.json").read_text())
    assert set(metrics["dev"]["per_subset"]) == {"consistent", "video_aligned", "audio_aligned"}
    assert 0 <= metrics["dev"]["accuracy"] <= 1 and "weighted_f1" in metrics["dev"]
    # Hugging Face Trainer's speed figures: 6 steps of 4 samples, every prompt + answer token counted
    assert metrics["train_samples"] == 24 and metrics["train_tokens"] > 24 and metrics["train_runtime"] > 0
    for name, count in (("samples", 24), ("steps", 6), ("tokens", metrics["train_tokens"])):
        assert metrics[f"train_{name}_per_second"] == pytest.approx(count / metrics["train_runtime"], rel=1e-2)
    info = json.loads((a / "run_info.json").read_text())
    assert info["seed"] == 0 and len(info["prompts"]["explain"]) == 64 and info["version"]
    ckpts = sorted(p.name for p in (a / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000004", "step_00000006"]
    adapter = load_file(a / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k and "language_model" in k for k in adapter)

    # resume from step 4 in a fresh run directory: it continues there and ends where the uninterrupted run did
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step_00000004", b / "checkpoints" / "step_00000004")
    (b / "checkpoints" / "step_00000009").mkdir()  # a half-written checkpoint (no marker) is ignored
    out = check(
        run_finetune(
            [
                *base_args(tiny_dir, syn_dir, b, cache),
                "train.max_steps=6",
                "train.save_every=2",
                "train.resume_from=latest",
            ]
        )
    )
    assert "at step 4" in out
    log_steps = [json.loads(line)["step"] for line in (b / "train_log.jsonl").read_text().splitlines()]
    assert log_steps == [5, 6]
    assert json.loads((b / "final_metrics.json").read_text())["train_samples"] == 8  # what this run trained
    for name in ("adapter/adapter_model.safetensors", "heads.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], atol=1e-6, rtol=0)


def test_bad_config_key_and_missing_media_fail_before_model_loads(tiny_dir, syn_dir, tmp_path):
    proc = run_finetune(
        [*base_args(tiny_dir, syn_dir, tmp_path / "r", tmp_path / "c"), "train.learning_rate=1"]
    )
    assert proc.returncode != 0
    assert "unknown key 'train.learning_rate'" in proc.stderr
    rows = [json.loads(line) for line in (syn_dir / "train.jsonl").read_text().splitlines()[:3]]
    rows[1]["video"] = "media/does_not_exist.mp4"
    bad = tmp_path / "bad_train.jsonl"  # beside the test, its media under the shared set (data.media_root)
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = run_finetune([*base_args(tiny_dir, syn_dir, tmp_path / "r", tmp_path / "c"), f"data.train={bad}",
                         f"data.media_root={syn_dir}"])
    assert proc.returncode != 0
    assert f"id '{rows[1]['id']}'" in proc.stderr and "does_not_exist.mp4" in proc.stderr
    assert "Loading weights" not in proc.stderr and "Loading weights" not in proc.stdout


def test_ddp_two_processes_on_cpu(tiny_dir, syn_dir, tmp_path):
    out_dir = tmp_path / "ddp"
    launch = ["--config_file", str(REPO / "configs" / "accelerate" / "ddp_cpu.yaml")]
    check(run_finetune([*base_args(tiny_dir, syn_dir, out_dir, tmp_path / "c"), "train.max_steps=2"], launch))
    info = json.loads((out_dir / "run_info.json").read_text())
    assert info["num_processes"] == 2 and info["distributed_type"] == "MULTI_CPU"  # DDP-wrapped, gradients synced
    assert json.loads((out_dir / "final_metrics.json").read_text())["step"] == 2
    assert (out_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # DeepSpeed stays in the default tier through tests/smoke/test_zero3.py
@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed ([deepspeed])"
)
def test_deepspeed_zero2_on_cpu(tiny_dir, syn_dir, tmp_path):
    out_dir = tmp_path / "z2"
    launch = ["--config_file", str(REPO / "configs" / "accelerate" / "zero2.yaml"), "--mixed_precision", "no"]
    env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    check(
        run_finetune(
            [*base_args(tiny_dir, syn_dir, out_dir, tmp_path / "c"), "train.max_steps=2"], launch, env
        )
    )
    assert json.loads((out_dir / "final_metrics.json").read_text())["step"] == 2
    assert (out_dir / "adapter" / "adapter_model.safetensors").is_file()
