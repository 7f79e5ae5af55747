"""scripts/bias_report.py on a bare backbone: generated answers (full, audio-only, video-only), explanation
quality, linear probes fitted on train clips, attention shares, and the keys other checks read."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.schema import MER2023_LABELS, SUBSETS
from mllm_mer.explanations import full_displays
from tests.conftest import REPO


def bias_report_main():
    spec = importlib.util.spec_from_file_location("bias_report_script", REPO / "scripts" / "bias_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_bias_report_of_a_bare_backbone(tiny_dir: Path, syn_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "bias.json"
    argv = ["--backbone", str(tiny_dir), "--data", str(syn_dir / "test.jsonl"), "--train",
            str(syn_dir / "train.jsonl"), "--output", str(out), "--max-new-tokens", "6", "--batch-size", "6"]
    assert bias_report_main()(argv) == 0
    report = json.loads(out.read_text())
    test = read_jsonl(syn_dir / "test.jsonl", MER2023_LABELS)
    layers = json.loads((tiny_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]

    assert report["answering"] == "backbone" and report["generated"]["prompt"] == "explain"
    assert set(report["attention"]) == {"backbone"} and len(report["attention"]["backbone"]["overall"]) == layers
    for name, own in (("audio_only", "audio"), ("video_only", "video")):
        uni = report["unimodal"][name]
        assert uni["own_cue"] == own and 0 <= uni["own_cue_accuracy"] <= 1
        full = full_displays(test, own, MER2023_LABELS)  # a conflict's masking display is weaker than "strong"
        assert 0 < uni["own_cue_n"] == sum(full) < len(test)
    conflicts = sum(s.subset != "consistent" for s in test)
    assert report["audio_dominance_counts"]["n_conflict"] == conflicts
    expl = report["explanations"]
    assert expl["parse_rate"] == report["generated"]["parse_rate"]  # the same texts, the same parser
    assert expl["cue_scope"] == "consistent" and expl["n_consistent"] == sum(s.subset == "consistent" for s in test)
    assert set(expl["per_subset"]) == {s.subset for s in test} <= set(SUBSETS)
    probes = report["probes"]
    assert set(probes) == {"audio", "video", "genuine"}
    for name in ("audio", "video"):
        assert len(probes[name]["per_layer"]) == layers + 1 and 0 <= probes[name]["test_accuracy"] <= 1
        assert probes[name]["n_test"] == len(test)
    printed = capsys.readouterr().out
    assert "Generated answers (backbone" in printed and "Linear probes on frozen features" in printed


def test_bias_report_without_train_skips_the_probes(tiny_dir: Path, syn_dir: Path, tmp_path: Path):
    out = tmp_path / "bias.json"
    argv = ["--backbone", str(tiny_dir), "--data", str(syn_dir / "test.jsonl"), "--output", str(out),
            "--prompt", "label", "--max-new-tokens", "3"]
    assert bias_report_main()(argv) == 0
    report = json.loads(out.read_text())
    assert report["probes"] == {"skipped": "no --train"} and report["generated"]["prompt"] == "label"
