"""The three ways a reused or damaged run directory went wrong (issue: runs that cannot be clobbered), re-run
with the real scripts: a new run into a finished run's directory, resuming it with other settings, and a
truncated adapter read by the scripts that load a run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.smoke.conftest import REPO, base_args, check, run_finetune

pytestmark = pytest.mark.smoke


def finetune(args: list[str]) -> subprocess.CompletedProcess:
    """scripts/finetune.py in one process (no launcher, whose own traceback would hide the script's output)."""
    return subprocess.run([sys.executable, str(REPO / "scripts" / "finetune.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a refused script run (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_new_run_into_a_finished_runs_directory_is_refused_and_overwrite_moves_it_aside(
    tiny_dir, syn_dir, trained_run, tmp_path
):
    ref, _ = trained_run  # read-only: copied
    x = tmp_path / "X"
    shutil.copytree(ref, x)
    before = snapshot(x)
    args = [*base_args(tiny_dir, syn_dir, x, tmp_path / "c"), "lora.r=4", "train.max_steps=2"]

    # (1) a new run with other settings: refused, naming the run there
    line = error_line(finetune(args))
    assert f"train.output_dir={x} already holds a run finished at step 6 (complete checkpoints at steps 2, 4, 6)" in line
    assert "lora.r: 8 -> 4" in line and "train.overwrite=true" in line
    # (2) resuming that run with other settings: refused naming lora.r, before any model loads
    line = error_line(finetune([*args, "train.resume_from=latest"]))
    assert f"would continue the run in {x}, whose settings differ (lora.r: 8 -> 4; saved -> now)" in line
    assert snapshot(x) == before  # nothing written, nothing removed

    # train.overwrite=true: the old run moves aside whole, the directory then holds only the new run
    out = check(finetune([*args, "train.overwrite=true"]))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("X.replaced-")]
    assert len(aside) == 1 and f"moved the previous contents of {x} to {aside[0]}" in out
    assert snapshot(aside[0]) == before
    assert sorted(p.name for p in (x / "checkpoints").iterdir()) == ["step_00000002"]
    assert json.loads((x / "final_metrics.json").read_text())["step"] == 2
    assert [json.loads(line)["step"] for line in (x / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert "r: 4" in (x / "config.yaml").read_text() and "overwrite: false" in (x / "config.yaml").read_text()
    lora_a = [v for k, v in load_file(x / "adapter" / "adapter_model.safetensors").items() if "lora_A" in k]
    assert lora_a and all(v.shape[0] == 4 for v in lora_a)
    assert not (x / ".mllm_mer.lock").exists()


def load_main(script: str):
    spec = importlib.util.spec_from_file_location(f"{script}_script", REPO / "scripts" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_a_truncated_adapter_is_named_by_every_reader(syn_dir, trained_run, tmp_path, capsys):
    ref, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(ref, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    adapter = run / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])  # an interrupted copy

    # (3) generate: one line naming the truncated file and what to do, exit 2
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), "--run", str(run), "--data",
                           str(syn_dir / "test.jsonl"), "--output", str(tmp_path / "p.jsonl")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    line = error_line(proc)
    assert line.startswith(f"error: {adapter} is damaged (") and "truncated?" in line
    assert f"train.output_dir={run} train.resume_from=latest" in line and not (tmp_path / "p.jsonl").exists()

    readers = {
        "export": ["--run", str(run), "--out", str(tmp_path / "export")],
        "bias_report": ["--run", str(run), "--data", str(syn_dir / "test.jsonl"), "--output", str(tmp_path / "b.json")],
    }
    for script, argv in readers.items():
        capsys.readouterr()
        assert load_main(script)(argv) == 2, script
        err = capsys.readouterr().err
        assert err.startswith(f"error: {adapter} is damaged (") and err.count("\n") == 1, (script, err)
    assert not (tmp_path / "export").exists()

    (run / "config.yaml").unlink()  # evaluate --run reads only the run's config
    refs = syn_dir / "test.jsonl"
    assert load_main("evaluate")(["synthetic", "--run", str(run), "--predictions", str(refs), "--references",
                                  str(refs), "--output", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run} is not a run directory ({run / 'config.yaml'} is missing)"), err
    assert err.count("\n") == 1


def test_ddp_ranks_share_the_refusal_and_leave_no_lock(tiny_dir, syn_dir, tmp_path):
    x = tmp_path / "X"
    x.mkdir()
    (x / "notes.txt").write_text("not a run")
    launch = ["--config_file", str(REPO / "configs" / "accelerate" / "ddp_cpu.yaml")]
    proc = run_finetune([*base_args(tiny_dir, syn_dir, x, tmp_path / "c"), "train.max_steps=2"], launch, timeout=300)
    assert proc.returncode != 0  # every rank stops (none waits for the other), within the timeout
    # the ranks write at once: two messages may share a line, so split on the message, not on lines
    errors = re.findall(r"error: .*?move them aside", proc.stderr)
    assert errors and set(errors) == {  # rank 1, if the launcher has not stopped it first, says the same
        f"error: train.output_dir={x} is not empty: it holds files that are not an mllm_mer run (notes.txt); "
        "choose another train.output_dir, or set train.overwrite=true to move them aside"}, proc.stderr[-3000:]
    assert sorted(p.name for p in x.iterdir()) == ["notes.txt"]
