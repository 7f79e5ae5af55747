"""Smoke-tier helpers: run the real scripts in subprocesses; one tiny training run shared by the tier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_finetune(
    args: list[str], launch: list[str] | None = None, env: dict | None = None, timeout: int = 600
):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *(launch or ["--config_file", str(REPO / "configs" / "accelerate" / "single.yaml")]),
        str(REPO / "scripts" / "finetune.py"),
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


def base_args(tiny_dir: Path, syn_dir: Path, out: Path, cache: Path) -> list[str]:
    return [
        f"model.path={tiny_dir}",
        "model.build_tiny=false",
        "data.synthetic_dir=null",
        f"data.train={syn_dir / 'train.jsonl'}",
        f"data.dev={syn_dir / 'dev.jsonl'}",
        f"data.cache_dir={cache}",
        f"data.feature_cache_dir={cache}-features",  # the cache is on by default (frozen towers): keep it per test
        "data.num_workers=0",
        "train.batch_size=4",
        "train.eval_batch_size=12",
        "train.torch_threads=1",
        f"train.output_dir={out}",
        "train.log_every=1",
    ]


def check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def trained_run(tiny_dir: Path, syn_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 6-step run (checkpoints at 2, 4, 6) of scripts/finetune.py; returns (run_dir, its output)."""
    root = tmp_path_factory.mktemp("run")
    out = check(
        run_finetune(
            [
                *base_args(tiny_dir, syn_dir, root / "a", root / "cache"),
                "train.max_steps=6",
                "train.save_every=2",
                "train.keep_checkpoints=3",
            ]
        )
    )
    return root / "a", out
