"""Checkpoints of a training run: the loop position, atomic saves, finding the latest, verified resume.

A checkpoint `checkpoints/step_N` holds the accelerate state (model, optimizer, scheduler, sampler, RNG;
safetensors weights) and, written last, `mllm_mer_state.json`: the loop position, the run's record
(`mllm_mer.training.identity.run_record`: identity, fingerprint, the settings that may change) and the size
of every file of the checkpoint. A directory without that marker is incomplete and ignored. Saves go to a
temporary directory renamed into place, so an exception or a kill while saving leaves the previous
checkpoints as they were. Resume checks the record against the new config and the files against their
recorded sizes before any tensor is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

from accelerate import Accelerator

from mllm_mer.config import RUN_CONFIG, ConfigError, RunConfig, load_config
from mllm_mer.logs import say
from mllm_mer.run_files import RunFileError, file_problem
from mllm_mer.training.identity import differences, run_record, run_settings, summarize

log = logging.getLogger(__name__)

CKPT_PREFIX = "step_"
CKPT_DONE = "mllm_mer_state.json"
"""Written last inside a checkpoint: a directory without it is incomplete and ignored."""


@dataclass
class TrainState:
    """Loop position stored in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to a run with other settings (the message lists them, one line)."""


def batch_seed(seed: int, rank: int, state: TrainState) -> int:
    """The torch seed set before each micro-batch, so random draws never depend on loop history."""
    return (seed * 1_000_003 + rank * 10_007 + state.epoch * 100_003 + state.batch_in_epoch) % (2**63 - 1)


def checkpoint_step(path: Path) -> int | None:
    """N of a `step_N` directory name (None for other names)."""
    try:
        return int(path.name[len(CKPT_PREFIX):]) if path.name.startswith(CKPT_PREFIX) else None
    except ValueError:
        return None


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `<output_dir>/checkpoints`, by step."""
    found = []
    for d in (Path(output_dir) / "checkpoints").glob(f"{CKPT_PREFIX}*"):
        step = checkpoint_step(d)
        if step is not None and (d / CKPT_DONE).is_file():
            found.append((step, d))
    return sorted(found)


def read_marker(path: Path) -> dict:
    """The `mllm_mer_state.json` of checkpoint `path`.

    Raises:
        RunFileError: missing or not a JSON object (the checkpoint is damaged).
    """
    marker = path / CKPT_DONE
    problem = file_problem(marker)
    data = None if problem else json.loads(marker.read_text())
    if problem or not isinstance(data, dict):
        raise RunFileError(f"{marker} is damaged ({problem or 'not a JSON object'}): resume from another "
                           f"checkpoint (train.resume_from=<path of one under {path.parent}>)")
    return data


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `<output_dir>/checkpoints`, or None.

    Incomplete directories (no `mllm_mer_state.json`, e.g. a run killed while saving) are skipped with a
    warning.
    """
    for d in (Path(output_dir) / "checkpoints").glob(f"{CKPT_PREFIX}*"):
        if checkpoint_step(d) is not None and not (d / CKPT_DONE).is_file():
            log.warning("ignoring incomplete checkpoint %s (no %s)", d, CKPT_DONE)
    done = complete_checkpoints(output_dir)
    return done[-1][1] if done else None


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def save_checkpoint(accelerator: Accelerator, cfg: RunConfig, state: TrainState) -> Path:
    """Write model/optimizer/scheduler/RNG/sampler state atomically: temp dir, marker file, rename; then
    remove this run's oldest checkpoints beyond `train.keep_checkpoints`.

    The marker (`mllm_mer_state.json`) holds `state`, the run's record (`run_record(cfg)`) and every file's
    size. An exception or a kill before the rename leaves only a `.tmp-step_N` directory, which is never
    read; a checkpoint of the same step is replaced only after the new one is complete.
    """
    root = Path(cfg.train.output_dir) / "checkpoints"
    final = root / f"{CKPT_PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record = run_record(cfg)
        marker = {**state.__dict__, "run": record, "files": _file_sizes(tmp)}
        (tmp / CKPT_DONE).write_text(json.dumps(marker, indent=1))
        old = root / f".old-{final.name}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
        rotate_checkpoints(root.parent, record["fingerprint"], cfg.train.keep_checkpoints, keep_path=final)
        say(f"saved checkpoint {final}")  # the one line of a save (accelerate's own lines are INFO)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: Path, run_fingerprint: str, keep: int, keep_path: Path) -> list[Path]:
    """Remove the oldest complete checkpoints of the run `run_fingerprint` so that `keep` (>= 1) remain; the
    newest by step, and `keep_path` (the one just written), always stay. Checkpoints of another run, or
    without a record, are never touched. Returns what was removed."""
    ours = []
    for _, path in complete_checkpoints(output_dir):
        try:
            record = read_marker(path).get("run") or {}
        except RunFileError:
            continue
        if record.get("fingerprint") == run_fingerprint:
            ours.append(path)
    removed = [p for p in ours[:-max(keep, 1)] if p != keep_path]
    for path in removed:
        shutil.rmtree(path)
    return removed


def resolve_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint `train.resume_from` points at (None = start fresh), verified to belong to this run
    (`verify_checkpoint`) before anything of it is loaded.

    Raises:
        FileNotFoundError: an explicit checkpoint path that does not hold a complete checkpoint.
        CheckpointMismatchError: the checkpoint belongs to a run with other settings.
        RunFileError: a file of the checkpoint is missing or damaged.
    """
    spec = cfg.train.resume_from
    if spec is None:
        return None
    if spec == "latest":
        path = find_latest_checkpoint(cfg.train.output_dir)
        if path is None:
            log.warning("train.resume_from=latest: no checkpoint under %s; starting fresh", cfg.train.output_dir)
            return None
    else:
        path = Path(spec)
        if not (path / CKPT_DONE).is_file():
            raise FileNotFoundError(f"train.resume_from={spec!r} is not a complete checkpoint (no {CKPT_DONE})")
    changed = verify_checkpoint(path, cfg)
    if changed:
        log.info("resuming %s with changed settings: %s", path, "; ".join(changed))
    return path


def _saved_run_settings(path: Path, marker: dict) -> tuple[dict, dict] | None:
    """(identity, settings) the checkpoint was written with: its record, or (checkpoints of mllm_mer 0.2,
    which had none) the config.yaml of the run directory holding it; None when neither is there."""
    record = marker.get("run")
    if isinstance(record, dict) and isinstance(record.get("identity"), dict):
        return record["identity"], record.get("settings") or {}
    config = path.parent.parent / RUN_CONFIG
    try:
        return run_settings(load_config(config, saved_run=True))
    except ConfigError:
        return None


def verify_checkpoint(path: Path, cfg: RunConfig) -> list[str]:
    """Check that checkpoint `path` belongs to the run `cfg` describes and that its files are complete;
    reads JSON and file headers only.

    Returns:
        The settings that changed and may change ("key: saved -> now" lines, `RESUME_MAY_CHANGE`).
    Raises:
        CheckpointMismatchError: the run's identity differs (the differing keys are listed).
        RunFileError: a file is missing, has another size than when it was saved, or is not complete.
    """
    marker = read_marker(path)
    saved = _saved_run_settings(path, marker)
    identity, settings = run_settings(cfg)
    if saved is None:
        log.warning("%s records no run settings and no %s is beside it: cannot check that it belongs to this run",
                    path, RUN_CONFIG)
        changed: list[str] = []
    else:
        diff = differences(saved[0], identity)
        if diff:
            raise CheckpointMismatchError(
                f"checkpoint {path} belongs to a run with other settings ({summarize(diff)}; saved -> now): "
                "resume with the settings it was trained with, or start a new run in another train.output_dir")
        changed = differences(saved[1], settings)
    files = marker.get("files")
    names = files or {p.name: None for p in path.glob("*.safetensors")}
    for name, size in names.items():
        file = path / name
        problem = file_problem(file)
        if problem is None and size is not None and file.stat().st_size != size:
            problem = f"{file.stat().st_size} bytes, {size} when it was saved"
        if problem:
            raise RunFileError(f"{file} is damaged ({problem}): resume from another checkpoint "
                               f"(train.resume_from=<path of one under {path.parent}>) or delete {path}")
    return changed


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainState:
    """Restore model/optimizer/scheduler/sampler/RNG state; only weights-only (no code) files are accepted.

    Raises:
        ValueError: a checkpoint file holds arbitrary pickled objects (refused, never executed), or its
            tensors do not fit the model (one line naming the checkpoint).
    """
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load {path}: a file there is not a weights-only checkpoint (it contains pickled "
            f"objects that could run code). Delete that checkpoint or resume from another. ({exc})"
        ) from None
    except RuntimeError as exc:  # e.g. "size mismatch for ...": a checkpoint of another model
        detail = " ".join(str(exc).split())[:300]
        raise ValueError(f"{path} does not fit this model ({detail}); resume from a checkpoint of this run") from None
    marker = read_marker(path)
    return TrainState(**{f.name: int(marker[f.name]) for f in fields(TrainState)})


def resume_state(accelerator: Accelerator, checkpoint: Path | None) -> TrainState:
    """The loop position to start from: restored from `checkpoint` (said on the main process) or fresh."""
    if checkpoint is None:
        return TrainState()
    state = load_checkpoint(accelerator, checkpoint)
    if accelerator.is_main_process:
        print(f"resumed from {checkpoint} at step {state.step}")
    return state
