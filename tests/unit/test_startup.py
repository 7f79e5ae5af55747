"""`mllm_mer.startup`: a run without quantization keeps bitsandbytes out of the process, one with it does not.

Each case runs in a fresh interpreter (blocking an import changes `sys.modules` for the whole process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"

PROBE = """
import json, sys
from mllm_mer.startup import skip_unused_imports
blocked = skip_unused_imports(sys.argv[1:], {config!r})
import peft  # imports bitsandbytes when it is installed and not blocked
from peft.import_utils import is_bnb_available
print(json.dumps({{"blocked": blocked, "peft_sees_bnb": is_bnb_available(),
                  "loaded": sys.modules.get("bitsandbytes") is not None}}))
"""


def probe(*argv: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(config=str(CONFIG)), *argv],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_unquantized_run_blocks_bitsandbytes():
    got = probe("--config", str(CONFIG), "train.max_steps=3", "--verbose")
    assert got == {"blocked": ["bitsandbytes"], "peft_sees_bnb": False, "loaded": False}


def test_quantized_run_keeps_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    got = probe("model.quantization=nf4", "freeze.language_model=true")
    assert got["blocked"] == []
    assert got["peft_sees_bnb"] is True and got["loaded"] is True


def test_bad_config_blocks_nothing():
    # the script loads the config again and reports the error; start-up must not hide or change it
    got = probe("model.no_such_key=1")
    assert got["blocked"] == []
