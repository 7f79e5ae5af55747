"""The full stack as the README runs it: finetune MoSE + DnR + DCR, choose and fit the arbiter on dev, generate
with per-sample AR through scripts/generate.py, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mllm_mer.fusion.dcr.ada import ARBITER_FILE, ARMS
from tests.smoke.conftest import REPO, base_args, check, run_finetune

pytestmark = pytest.mark.smoke


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    check(proc)
    return proc


def test_full_stack_from_training_to_the_scored_answer(tiny_dir: Path, syn_dir: Path, tmp_path: Path):
    run = tmp_path / "full"
    check(run_finetune([*base_args(tiny_dir, syn_dir, run, tmp_path / "cache"), "adapter=mose", "dcr.enabled=true",
                        "dnr.enabled=true", "data.modality_dropout=0.2", "data.prompt=label", "train.max_steps=3",
                        "train.save_every=0"]))
    fitted = json.loads((run / "final_metrics.json").read_text())["after_training"]["dcr_reliability"]
    assert fitted["audio"]["fitted"] and fitted["video"]["fitted"]  # so ar.sample_confidence=auto reads them
    assert (run / "mose.safetensors").is_file() and (run / "heads.safetensors").is_file()

    out = script("fit_arbiter.py", "--run", str(run), "--data", str(syn_dir / "dev.jsonl"), "--search",
                 "generate.max_new_tokens=4")
    assert "searched 24 dcr.arbiter settings" in out.stdout
    arbiter = json.loads((run / ARBITER_FILE).read_text())
    assert arbiter["fit"]["data"].endswith("dev.jsonl") and len(arbiter["fit"]["search"]["settings"]) == 24

    # without --prompt a run answers the prompt it was trained on (label here, not generate.prompt's explain)
    shown = script("generate.py", "--run", str(run), "--print-config").stdout
    assert "generate:\n  prompt: label\n" in shown
    assert "generate:\n  prompt: ov\n" in script("generate.py", "--run", str(run), "--print-config", "--prompt",
                                                  "ov").stdout
    preds = tmp_path / "preds.jsonl"
    script("generate.py", "--run", str(run), "--data", str(syn_dir / "test.jsonl"), "--prompt", "label",
           "--output", str(preds), "--max-new-tokens", "4", "--batch-size", "6", "ar.enabled=true",
           "ar.target_mode=paths", "ar.strength=0.9", "ar.sample_sharpness=4")
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 12
    for r in rows:  # the scored answer is the arbiter's: the routed arm answers (both modalities when "fused")
        assert r["arm"] in ARMS and r["answer_arm"] == r["arm"] and set(r["probs"]) == {*ARMS, "arbiter"}
        assert "fused_label" in r and r["probs"]["arbiter"] == r["probs"][r["arm"]]
    meta = json.loads(preds.with_name(preds.name + ".meta.json").read_text())
    assert meta["ar"]["enabled"] and meta["ar"]["target_mode"] == "paths" and meta["ar"]["sample_confidence"] == "auto"

    report = tmp_path / "eval.json"
    script("evaluate.py", "synthetic", "--predictions", str(preds), "--references", str(syn_dir / "test.jsonl"),
           "--output", str(report))
    scored = json.loads(report.read_text())
    assert scored["n"] == 12 and "index" in scored["audio_dominance"] and scored["metrics"]["per_subset"]
    assert scored["fuse_or_drop"]["subsets"]["all"]["n"] == 12
