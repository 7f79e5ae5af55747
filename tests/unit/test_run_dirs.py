"""Run directories: complete safetensors files, the run identity, the lock, refusing another run's directory,
atomic checkpoints and final files under injected faults, rotation, and the readers' file checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mllm_mer.backbone import load_backbone
from mllm_mer.config import ConfigError, load_config, save_config
from mllm_mer.model import build_mer_model
from mllm_mer.run_files import RunFileError, check_run_files
from mllm_mer.safetensors_check import read_header, safetensors_problem
from mllm_mer.trainable import apply_trainable
from mllm_mer.training import checkpoint as C
from mllm_mer.training import ownership as O
from mllm_mer.training import run_dir as R
from mllm_mer.training.identity import differences, run_record, run_settings


def cfg_with(tmp_path: Path, *overrides: str):
    return load_config(None, ["data.train=x.jsonl", f"train.output_dir={tmp_path / 'run'}", *overrides])


# --------------------------------------------------------------------------------------------- safetensors
def test_safetensors_check_finds_what_the_library_refuses(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)},
              str(good), metadata={"k": "v"})
    assert safetensors_problem(good) is None and set(read_header(good)) == {"a", "b", "__metadata__"}
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    damaged = {
        "short": (raw[:5], "shorter than the 8-byte"),
        "header_cut": (raw[: 8 + n // 2], "runs past the end"),
        "data_cut": (raw[:-4], "truncated?"),
        "padded": (raw + b"\0" * 8, f"file has {len(raw) + 8} bytes"),
    }
    for name, (data, expected) in damaged.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        problem = safetensors_problem(path)
        assert problem is not None and expected in problem, (name, problem)
        with pytest.raises((SafetensorError, OSError)):  # the library refuses them too, naming no file
            with safe_open(str(path), "pt") as fh:
                [fh.get_tensor(k) for k in fh.keys()]  # noqa: B018
    assert safetensors_problem(tmp_path / "absent.safetensors") == "missing"


# --------------------------------------------------------------------------------------------- identity
def test_identity_holds_what_shapes_the_run_and_lists_what_may_change(tmp_path):
    base_id, base_set = run_settings(cfg_with(tmp_path))
    assert base_id["methods"] == ["lora"] and "lora.r" in base_id and "mose.r" not in base_id

    def diff(*overrides: str) -> tuple[list[str], list[str]]:
        ident, sett = run_settings(cfg_with(tmp_path, *overrides))
        return differences(base_id, ident), differences(base_set, sett)

    assert diff("lora.r=4") == (["lora.r: 8 -> 4"], [])
    assert diff("mose.r=4") == ([], [])  # the section of a method that is off changes nothing
    ident, _ = diff("adapter=mose")
    assert any(line.startswith("adapter:") for line in ident) and any(line.startswith("mose.r:") for line in ident)
    assert any(line.startswith("methods:") for line in ident)
    assert diff("data.labels=[a,b]")[0] == ['data.labels: ["neutral", "angry", "happy", "sad", "worried", '
                                            '"surprise"] -> ["a", "b"]']
    assert diff("train.lr=0.5")[0] == ["train.lr: 0.001 -> 0.5"]  # the optimizer state would not follow it
    assert diff("ar.enabled=true", "ar.strength=0.9") == ([], [])  # AR acts at inference only
    assert diff("train.max_steps=9", "train.eval_every=3", "train.nan_policy=skip") == (
        [], ["train.eval_every: 0 -> 3", "train.max_steps: -1 -> 9", 'train.nan_policy: "stop" -> "skip"'])
    assert run_record(cfg_with(tmp_path))["fingerprint"] == run_record(cfg_with(tmp_path, "train.max_steps=9"))["fingerprint"]


def test_overwrite_and_resume_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.overwrite=true and train.resume_from=latest"):
        cfg_with(tmp_path, "train.overwrite=true", "train.resume_from=latest")


# --------------------------------------------------------------------------------------------- lock
def write_lock(directory: Path, **changes) -> None:
    owner = O.LockOwner.current()
    (directory / O.LOCK_FILE).write_text(json.dumps({**owner.__dict__, **changes}))


def test_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, caplog):
    lock = O.RunLock.acquire(tmp_path)
    with pytest.raises(O.RunDirError, match=f"in use by another training process, pid {os.getpid()} on host"):
        O.RunLock.acquire(tmp_path)
    lock.release()
    assert not (tmp_path / O.LOCK_FILE).exists()

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lock(tmp_path, pid=int(gone.stdout))  # a process killed without releasing its lock
    lock = O.RunLock.acquire(tmp_path)
    assert "took over the stale lock" in caplog.text and lock.owner.pid == os.getpid()
    lock.release()

    if O.LockOwner.current().start_ticks is not None:  # Linux: a reused pid is told apart by its start time
        write_lock(tmp_path, start_ticks=O.LockOwner.current().start_ticks - 1)
        O.RunLock.acquire(tmp_path).release()

    write_lock(tmp_path, host="another-host")
    with pytest.raises(O.RunDirError, match="cannot be checked from"):
        O.RunLock.acquire(tmp_path)
    (tmp_path / O.LOCK_FILE).write_text("{not json")
    with pytest.raises(O.RunDirError, match="cannot be read"):
        O.RunLock.acquire(tmp_path)


# --------------------------------------------------------------------------------------------- ownership
def fake_finished_run(tmp_path: Path, *overrides: str) -> Path:
    """A run directory as a finished run leaves it: config.yaml, checkpoints 300 and 360, final step 360."""
    cfg = cfg_with(tmp_path, *overrides)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True)
    save_config(cfg, out / "config.yaml")
    (out / "final_metrics.json").write_text(json.dumps({"step": 360}))
    for step in (300, 360):
        d = out / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / C.CKPT_DONE).write_text(json.dumps({"step": step, "epoch": 0, "batch_in_epoch": 0,
                                                 "run": run_record(cfg), "files": {}}))
    return out


def test_a_directory_holding_another_run_is_refused_naming_it(tmp_path):
    out = fake_finished_run(tmp_path, "train.max_steps=360")
    with pytest.raises(O.RunDirError) as err:
        O.check_contents(cfg_with(tmp_path, "lora.r=4", "train.max_steps=2"), out)
    msg = str(err.value)
    assert "\n" not in msg and f"train.output_dir={out} already holds a run finished at step 360" in msg
    assert "complete checkpoints at steps 300, 360" in msg and "lora.r: 8 -> 4" in msg
    assert "train.max_steps: 360 -> 2" in msg and "train.overwrite=true" in msg and "resume_from" not in msg
    with pytest.raises(O.RunDirError, match="with the same settings except train.max_steps: 360 -> 2: continue it "
                                            "with train.resume_from=latest"):
        O.check_contents(cfg_with(tmp_path, "train.max_steps=2"), out)
    with pytest.raises(O.RunDirError, match=r"would continue the run in .* \(lora.r: 8 -> 4; saved -> now\)"):
        O.check_contents(cfg_with(tmp_path, "lora.r=4", "train.resume_from=latest"), out)
    assert O.check_contents(cfg_with(tmp_path, "train.max_steps=400", "train.resume_from=latest"), out) is None
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    moved = O.check_contents(cfg_with(tmp_path, "lora.r=4", "train.overwrite=true"), out)
    assert list(out.iterdir()) == [] and moved.name.startswith("run.replaced-")
    assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == before  # nothing lost, nothing mixed

    (out / "notes.txt").write_text("mine")
    with pytest.raises(O.RunDirError, match=r"is not empty: it holds files that are not an mllm_mer run \(notes.txt\)"):
        O.check_contents(cfg_with(tmp_path), out)


def test_claim_holds_the_lock_for_the_block_and_releases_it(tmp_path):
    cfg = cfg_with(tmp_path)
    accelerator = Accelerator(cpu=True)
    with pytest.raises(RuntimeError, match="boom"):
        with O.claim_output_dir(cfg, accelerator):
            assert (tmp_path / "run" / O.LOCK_FILE).is_file()
            with pytest.raises(O.RunDirError, match="in use"):
                with O.claim_output_dir(cfg, accelerator):
                    pass
            raise RuntimeError("boom")
    assert not (tmp_path / "run" / O.LOCK_FILE).exists()
    with O.claim_output_dir(cfg, accelerator):  # the empty directory (lock released) is accepted again
        pass


# --------------------------------------------------------------------------------------------- checkpoints
def prepared(accelerator: Accelerator) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return accelerator.prepare(model, optimizer)


def test_a_failed_checkpoint_write_leaves_the_previous_one_resumable(tmp_path, monkeypatch):
    cfg = cfg_with(tmp_path, "train.keep_checkpoints=2")
    accelerator = Accelerator(cpu=True)
    model, _ = prepared(accelerator)
    first = C.save_checkpoint(accelerator, cfg, C.TrainState(step=1, batch_in_epoch=1))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    real_save = accelerator.save_state

    def save_then_fail(output_dir, **kwargs):  # the disk fills up halfway through the model file
        real_save(output_dir, **kwargs)
        path = Path(output_dir) / "model.safetensors"
        path.write_bytes(path.read_bytes()[:40])
        raise OSError("No space left on device")

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(accelerator, "save_state", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        C.save_checkpoint(accelerator, cfg, C.TrainState(step=2, batch_in_epoch=2))
    monkeypatch.undo()
    assert C.find_latest_checkpoint(cfg.train.output_dir) == first
    cfg_resume = cfg_with(tmp_path, "train.resume_from=latest", "train.max_steps=5")
    assert C.resolve_resume(cfg_resume) == first
    state = C.load_checkpoint(accelerator, first)
    assert state == C.TrainState(step=1, batch_in_epoch=1)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    C.save_checkpoint(accelerator, cfg, C.TrainState(step=2, batch_in_epoch=2))  # the leftover temp dir is replaced
    assert [s for s, _ in C.complete_checkpoints(cfg.train.output_dir)] == [1, 2]


def test_resume_refuses_another_runs_checkpoint_and_damaged_files(tmp_path, monkeypatch):
    cfg = cfg_with(tmp_path)
    accelerator = Accelerator(cpu=True)
    prepared(accelerator)
    path = C.save_checkpoint(accelerator, cfg, C.TrainState(step=3))
    monkeypatch.setattr(accelerator, "load_state", lambda *a, **k: pytest.fail("a tensor was loaded"))
    with pytest.raises(C.CheckpointMismatchError, match=r"belongs to a run with other settings \(lora.r: 8 -> 4;"):
        C.resolve_resume(cfg_with(tmp_path, "lora.r=4", f"train.resume_from={path}"))
    assert C.verify_checkpoint(path, cfg_with(tmp_path, "train.max_steps=7")) == ["train.max_steps: -1 -> 7"]
    model_file = path / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-3])
    with pytest.raises(RunFileError, match=f"{model_file} is damaged .*truncated"):
        C.resolve_resume(cfg_with(tmp_path, "train.resume_from=latest"))
    (path / "optimizer.bin").unlink()
    (path / "model.safetensors").unlink()
    with pytest.raises(RunFileError, match="model.safetensors is damaged \\(missing\\)"):
        C.verify_checkpoint(path, cfg)


def test_rotation_keeps_this_runs_newest_and_never_the_other_runs(tmp_path):
    cfg = cfg_with(tmp_path, "train.keep_checkpoints=2")
    accelerator = Accelerator(cpu=True)
    prepared(accelerator)
    for step in (1, 2, 3):
        C.save_checkpoint(accelerator, cfg, C.TrainState(step=step))
    root = Path(cfg.train.output_dir)
    assert [s for s, _ in C.complete_checkpoints(root)] == [2, 3]
    foreign = root / "checkpoints" / "step_00000009"  # another run's checkpoint with a higher step
    shutil.copytree(root / "checkpoints" / "step_00000003", foreign)
    marker = json.loads((foreign / C.CKPT_DONE).read_text())
    (foreign / C.CKPT_DONE).write_text(json.dumps({**marker, "run": {**marker["run"], "fingerprint": "other"}}))
    C.save_checkpoint(accelerator, cfg, C.TrainState(step=4))
    assert [s for s, _ in C.complete_checkpoints(root)] == [3, 4, 9]
    one = cfg_with(tmp_path, "train.keep_checkpoints=1")
    C.save_checkpoint(accelerator, one, C.TrainState(step=5))
    assert [s for s, _ in C.complete_checkpoints(root)] == [5, 9]  # the only complete one of this run stays
    fp = run_record(one)["fingerprint"]
    C.save_checkpoint(accelerator, one, C.TrainState(step=6))
    removed = C.rotate_checkpoints(root, fp, 1, keep_path=root / "checkpoints" / "step_00000005")
    assert removed == [] and [s for s, _ in C.complete_checkpoints(root)] == [6, 9]


# --------------------------------------------------------------------------------------------- final files
def test_a_failed_final_write_leaves_no_half_written_files_and_readers_name_damage(tiny_dir, tmp_path, monkeypatch):
    cfg = cfg_with(tmp_path, f"model.path={tiny_dir}")
    model = build_mer_model(load_backbone(tiny_dir), cfg)
    apply_trainable(model, cfg)
    accelerator = Accelerator(cpu=True)
    out = Path(cfg.train.output_dir)

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(R, "save_file", fail)  # the adapter is written, then the heads fail
    with pytest.raises(OSError):
        R.save_final(accelerator, model, cfg)
    assert sorted(p.name for p in out.iterdir()) == []  # no adapter/, no heads, no temp folder
    monkeypatch.undo()
    R.save_final(accelerator, model, cfg)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert out / "adapter" / "adapter_model.safetensors" in files and out / "heads.safetensors" in files
    check_run_files(out, cfg)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("fusion_")).add_(1.0)
    monkeypatch.setattr(R, "save_file", fail)
    with pytest.raises(OSError):
        R.save_final(accelerator, model, cfg)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # the previous files, untouched

    adapter = out / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-100])
    with pytest.raises(RunFileError) as err:
        check_run_files(out, cfg)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{adapter} is damaged (") and "truncated?" in msg
    assert f"--config {out / 'config.yaml'} train.output_dir={out} train.resume_from=latest" in msg
    (out / "heads.safetensors").unlink()
    with pytest.raises(RunFileError, match=f"{out / 'heads.safetensors'} is missing"):
        check_run_files(out, cfg)
    save_file({"not_a_head": torch.zeros(1)}, str(out / "heads.safetensors"))  # complete, but not heads
    with pytest.raises(RunFileError, match="heads.safetensors is damaged \\(holds tensors of something else, "
                                           "e.g. 'not_a_head'\\)"):
        check_run_files(out, cfg)


def test_single_process_final_save_skips_accelerates_gather_and_writes_the_same_files(tiny_dir, tmp_path,
                                                                                    monkeypatch):
    # accelerate's get_state_dict / unwrap_model import deepspeed (when installed) even for one process
    cfg = cfg_with(tmp_path, f"model.path={tiny_dir}")
    model = build_mer_model(load_backbone(tiny_dir), cfg)
    apply_trainable(model, cfg)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("fusion_")).add_(0.5)
    accelerator = Accelerator(cpu=True)

    def refuse(*args, **kwargs):
        raise AssertionError("a single-process save must not go through accelerate's gather")

    monkeypatch.setattr(accelerator, "get_state_dict", refuse)
    monkeypatch.setattr(accelerator, "unwrap_model", refuse)
    R.save_final(accelerator, model, cfg)
    out = Path(cfg.train.output_dir)
    plain = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.undo()
    monkeypatch.setattr(R, "_plain_model", lambda accelerator, model: None)  # accelerate's own path
    R.save_final(accelerator, model, cfg)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == plain
    assert any(name.name == "heads.safetensors" for name in plain)
