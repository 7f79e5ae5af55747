"""Opt-in (`pytest -m gpu`): bench/gpu_step.py on the published 7B architecture (random weights, bf16) on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_gpu_step_on_the_7b_thinker():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_step.py"), "--rounds", "2", "--video-seconds", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    row = next(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
    lora, qlora = row["variants"]["lora"], row["variants"]["qlora"]
    assert qlora["weights_gib"] < 0.5 * lora["weights_gib"]  # the language model in 4 bits
    assert qlora["peak_memory_gib"] < lora["peak_memory_gib"]
    assert lora["mfu"] is None or 0 < lora["mfu"] < 1
