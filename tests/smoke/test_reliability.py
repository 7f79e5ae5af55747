"""Interrupted and broken runs: --check-data, on_error=skip, kill -9 then resume, pickle refusal, max_minutes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.smoke.conftest import REPO, base_args, check, run_finetune
from tests.unit.test_bad_inputs import write_silent_mp4
from tests.unit.test_data import write_mp4

pytestmark = pytest.mark.smoke


def bad_train_file(syn_dir, tmp_path):
    """A copy of the tiny training set (in `tmp_path`, never in the shared set) with 5 bad rows added."""
    rows = [json.loads(line) for line in (syn_dir / "train.jsonl").read_text().splitlines()]
    shutil.copytree(syn_dir / "media", tmp_path / "media")
    write_mp4(tmp_path / "media" / "noaudio.mp4", seconds=1, audio=False)
    write_silent_mp4(tmp_path / "media" / "silent.mp4")
    bad = [dict(rows[0], id="b_noaudio", video="media/noaudio.mp4"), dict(rows[1], id="b_silent", video="media/silent.mp4"),
           dict(rows[2], id="b_label", label="joyful"), dict(rows[3], id="b_escape", video="../x.mp4")]
    path = tmp_path / "train_with_bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [*rows[4:], *bad]) + "\n{broken\n")
    return path


def test_check_data_lists_every_problem(tiny_dir, syn_dir, tmp_path):
    path = bad_train_file(syn_dir, tmp_path)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "finetune.py"), "--check-data",
         *base_args(tiny_dir, syn_dir, tmp_path / "r", tmp_path / "c"), f"data.train={path}"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("train:")]
    for what in ("'b_noaudio'", "'b_silent'", "'b_label'", "'b_escape'", "not valid JSON"):
        assert sum(what in line for line in lines) == 1, (what, lines)
    assert "Traceback" not in proc.stderr and "5 problem(s)" in proc.stdout


def test_on_error_skip_trains_and_reports(tiny_dir, syn_dir, tmp_path):
    path = bad_train_file(syn_dir, tmp_path)
    out = tmp_path / "run"
    check(run_finetune([*base_args(tiny_dir, syn_dir, out, tmp_path / "c"), f"data.train={path}",
                        "data.on_error=skip", "train.max_steps=1"]))
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["skipped"] == 5 and report["train"]["used"] == 20
    assert any("b_silent" in p for p in report["train"]["problems"])


def test_kill_minus_9_then_resume_matches_uninterrupted(tiny_dir, syn_dir, trained_run, tmp_path):
    ref, _ = trained_run  # 6 steps, checkpoints every 2, same data and seed
    out = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "scripts" / "finetune.py"),
           *base_args(tiny_dir, syn_dir, out, tmp_path / "c"), "train.max_steps=6", "train.save_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_00000002" / "mllm_mer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # killed mid-run: 4 steps are left
    proc.wait()
    assert not (out / "final_metrics.json").exists()
    done = sorted(d.name for d in (out / "checkpoints").glob("step_*") if (d / "mllm_mer_state.json").is_file())
    assert done and done[-1] in ("step_00000002", "step_00000004"), done
    log = check(run_finetune([*base_args(tiny_dir, syn_dir, out, tmp_path / "c"), "train.max_steps=6",
                              "train.save_every=2", "train.resume_from=latest"]))
    resumed_at = int(done[-1].removeprefix("step_"))
    assert f"resumed from {out / 'checkpoints' / done[-1]} at step {resumed_at}" in log, log[-2000:]
    assert json.loads((out / "final_metrics.json").read_text())["step"] == 6
    for name in ("adapter/adapter_model.safetensors", "heads.safetensors"):
        a, b = load_file(ref / name), load_file(out / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/mllm_mer_pwned",))


def test_pickled_code_in_checkpoint_is_refused(tiny_dir, syn_dir, trained_run, tmp_path):
    ref, _ = trained_run
    out = tmp_path / "evil"
    shutil.copytree(ref / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    ckpt = out / "checkpoints" / "step_00000002"
    with open(ckpt / "optimizer.bin", "wb") as fh:
        pickle.dump({"state": _Evil()}, fh)
    marker = json.loads((ckpt / "mllm_mer_state.json").read_text())  # a crafted checkpoint: sizes consistent
    marker["files"]["optimizer.bin"] = (ckpt / "optimizer.bin").stat().st_size
    (ckpt / "mllm_mer_state.json").write_text(json.dumps(marker))
    proc = subprocess.run(  # the script itself (accelerate's launcher adds its own traceback on failure)
        [sys.executable, str(REPO / "scripts" / "finetune.py"), *base_args(tiny_dir, syn_dir, out, tmp_path / "c"),
         "train.max_steps=4", "train.resume_from=latest"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "refusing to load" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists("/tmp/mllm_mer_pwned")


def test_max_minutes_stops_cleanly_with_checkpoint(tiny_dir, syn_dir, tmp_path):
    out = tmp_path / "timed"
    log = check(run_finetune([*base_args(tiny_dir, syn_dir, out, tmp_path / "c"), "train.max_steps=50",
                              "train.max_minutes=0.0001"]))
    assert "train.max_minutes" in log
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["stopped_early"] is True and final["step"] < 50
    assert (out / "checkpoints" / f"step_{final['step']:08d}" / "mllm_mer_state.json").is_file()
