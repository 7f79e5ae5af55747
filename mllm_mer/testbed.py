"""The conflict testbed: a small "pretrained" audio-visual backbone with a measurable audio bias.

A random tiny thinker has no modality habits, so conflict-aware methods cannot show anything on it.
Stage 0 (`scripts/pretrain_tiny.py`) trains all weights of the tiny twin on synthetic clips whose audio
is cleaner than their video (`STAGE0_DATA`), with modality dropout so that each modality alone is
recognised too. The frozen result follows audio on conflicts, like current emotion MLLMs on CA-MER.
Methods are then fine-tuned on top of it with `TESTBED_DATA` (`bench/conflict_ablation.py`).

The stage-0 checkpoint is cached under `<root>/stage0-<key>/backbone`, where the key hashes everything
that determines it (data config, training config file, tiny spec, package version, seed).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import mllm_mer
from mllm_mer.backbone.tiny import TinySpec
from mllm_mer.data.synthetic import SyntheticConfig

REPO = Path(__file__).resolve().parent.parent
PRETRAIN_CONFIG = REPO / "configs" / "pretrain_tiny.yaml"

STAGE0_DATA = SyntheticConfig(
    seed=100, train_size=720, dev_size=96, test_size=96,
    audio_noise=0.05, video_noise=0.35, text_noise=1.0, train_conflict_rate=0.0,
)
"""Stage-0 clips: clean audio, weak video, no textual evidence, no conflicts in training."""

TESTBED_DATA = SyntheticConfig(
    seed=0, train_size=480, dev_size=96, test_size=96,
    audio_noise=0.05, video_noise=0.2, text_noise=0.7, train_conflict_rate=0.2,
)
"""Fine-tuning data of the ablation harness (any set from `scripts/make_synthetic.py` works too)."""


def stage0_key(seed: int = 0) -> str:
    """Hash of everything that determines the stage-0 backbone."""
    blob = json.dumps(
        {
            "data": STAGE0_DATA.to_dict(),
            "config": PRETRAIN_CONFIG.read_text() if PRETRAIN_CONFIG.is_file() else "",
            "tiny": asdict(TinySpec()),
            "version": mllm_mer.__version__,
            "seed": seed,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def stage0_dir(root: str | Path = ".cache/mllm_mer", seed: int = 0) -> Path:
    return Path(root) / f"stage0-{stage0_key(seed)}"


def export_backbone(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a finished full-training run's thinker (+ processor) as a normal checkpoint directory."""
    from mllm_mer.generation import load_for_inference

    model = load_for_inference(run_dir=run_dir)
    if model.cfg.adapter != "none":
        raise ValueError(
            f"{run_dir} trained an adapter (adapter={model.cfg.adapter}); export needs a run that trained the "
            "base weights (adapter=none)"
        )
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.backbone.model.save_pretrained(tmp)
    model.backbone.processor.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def ensure_stage0_backbone(root: str | Path = ".cache/mllm_mer", seed: int = 0) -> Path:
    """The cached stage-0 backbone directory, running `scripts/pretrain_tiny.py` first if missing.

    Raises:
        FileNotFoundError: the repository's scripts/ are not available (installed without the repo).
        RuntimeError: stage-0 training failed (its output is included).
    """
    out = stage0_dir(root, seed)
    backbone = out / "backbone"
    if (backbone / "config.json").is_file():
        return backbone
    script = REPO / "scripts" / "pretrain_tiny.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: the testbed needs the mllm_mer repository checkout")
    proc = subprocess.run(
        [sys.executable, str(script), "--root", str(root), "--seed", str(seed)],
        capture_output=True, text=True, cwd=REPO,
    )
    if proc.returncode != 0 or not (backbone / "config.json").is_file():
        raise RuntimeError(f"stage-0 pretraining failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return backbone
