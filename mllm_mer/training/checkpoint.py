"""Checkpoints of a training run: the loop position, atomic saves, finding the latest, resuming.

A checkpoint `checkpoints/step_N` holds the accelerate state (model, optimizer, scheduler, sampler, RNG;
safetensors weights) and, written last, `mllm_mer_state.json` (the loop position): a directory without that
marker is incomplete and ignored. Saves go to a temporary directory renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from mllm_mer.config import RunConfig
from mllm_mer.logs import say

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


def batch_seed(seed: int, rank: int, state: TrainState) -> int:
    """The torch seed set before each micro-batch, so random draws never depend on loop history."""
    return (seed * 1_000_003 + rank * 10_007 + state.epoch * 100_003 + state.batch_in_epoch) % (2**63 - 1)


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `<output_dir>/checkpoints`, or None.

    Incomplete directories (no `mllm_mer_state.json`, e.g. a run killed while saving) are skipped with a
    warning.
    """
    root = Path(output_dir) / "checkpoints"
    best: tuple[int, Path] | None = None
    for d in root.glob(f"{CKPT_PREFIX}*"):
        if not (d / CKPT_DONE).is_file():
            log.warning("ignoring incomplete checkpoint %s (no %s)", d, CKPT_DONE)
            continue
        try:
            step = int(d.name[len(CKPT_PREFIX):])
        except ValueError:
            continue
        if best is None or step > best[0]:
            best = (step, d)
    return best[1] if best else None


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, state: TrainState, keep: int) -> Path:
    """Write model/optimizer/scheduler/RNG/sampler state atomically: temp dir, marker file, rename."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"{CKPT_PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{CKPT_PREFIX}{state.step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CKPT_DONE).write_text(json.dumps(state.__dict__))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(d for d in root.glob(f"{CKPT_PREFIX}*") if (d / CKPT_DONE).is_file())
        for old in done[:-keep]:
            shutil.rmtree(old)
        say(f"saved checkpoint {final}")  # the one line of a save (accelerate's own lines are INFO)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint `train.resume_from` points at (None = start fresh).

    Raises:
        FileNotFoundError: an explicit checkpoint path that does not hold a complete checkpoint.
    """
    spec = cfg.train.resume_from
    if spec is None:
        return None
    if spec == "latest":
        latest = find_latest_checkpoint(cfg.train.output_dir)
        if latest is None:
            log.warning("train.resume_from=latest: no checkpoint under %s; starting fresh", cfg.train.output_dir)
        return latest
    path = Path(spec)
    if not (path / CKPT_DONE).is_file():
        raise FileNotFoundError(f"train.resume_from={spec!r} is not a complete checkpoint (no {CKPT_DONE})")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainState:
    """Restore model/optimizer/scheduler/sampler/RNG state; only weights-only (no code) files are accepted.

    Raises:
        ValueError: a checkpoint file holds arbitrary pickled objects (refused, never executed).
    """
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load {path}: a file there is not a weights-only checkpoint (it contains pickled "
            f"objects that could run code). Delete that checkpoint or resume from another. ({exc})"
        ) from None
    return TrainState(**json.loads((path / CKPT_DONE).read_text()))


def resume_state(accelerator: Accelerator, checkpoint: Path | None) -> TrainState:
    """The loop position to start from: restored from `checkpoint` (said on the main process) or fresh."""
    if checkpoint is None:
        return TrainState()
    state = load_checkpoint(accelerator, checkpoint)
    if accelerator.is_main_process:
        print(f"resumed from {checkpoint} at step {state.step}")
    return state
