"""scripts/generate.py with attention reallocation switched on by dotted overrides (`ar.*`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.smoke.conftest import REPO

pytestmark = pytest.mark.smoke


def test_generate_script_applies_ar_overrides(trained_run, syn_dir, tmp_path):
    run, _ = trained_run
    rows = {}
    for name, extra in (("off", []), ("on", ["ar.enabled=true", "ar.strength=0.9", "ar.target_audio_share=0.95",
                                            "ar.layers=[0,1]"])):
        preds = tmp_path / f"preds_{name}.jsonl"
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "generate.py"), "--run", str(run), "--data",
             str(syn_dir / "test.jsonl"), "--prompt", "label", "--output", str(preds), "--max-new-tokens", "3",
             "--batch-size", "6", *extra],
            capture_output=True, text=True, cwd=REPO, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        rows[name] = [json.loads(line) for line in preds.read_text().splitlines()]
        meta = json.loads(preds.with_name(preds.name + ".meta.json").read_text())
        assert meta["ar"]["enabled"] is (name == "on")
    assert len(rows["on"]) == len(rows["off"]) == 12
    assert [r["probs"] for r in rows["on"]] != [r["probs"] for r in rows["off"]]
