"""bench/conflict_ablation.py end to end on the tiny random thinker (2 steps), its row planning (rows with
keys the config does not know are skipped), and scripts/bias_report.py on the run it trained."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mllm_mer.backbone import load_backbone
from mllm_mer.config import ConfigError, load_config
from mllm_mer.data.schema import SUBSETS
from mllm_mer.model import build_mer_model
from mllm_mer.trainable import apply_trainable

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "bench" / "conflict_ablation.py"
ROW_KEYS = {"config", "per_subset", "weighted_f1", "audio_dominance", "trainable_params", "step_time_ratio"}


def load_harness():
    spec = importlib.util.spec_from_file_location("conflict_ablation", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ablation(
    tiny_dir: Path, syn_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict, str, Path]:
    root = tmp_path_factory.mktemp("ablation")
    cmd = [
        sys.executable,
        str(HARNESS),
        "--data",
        str(syn_dir),
        "--backbone",
        str(tiny_dir),
        "--steps",
        "2",
        "--configs",
        "plain_lora,ar",
        "--output",
        str(root / "report.json"),
        "--workdir",
        str(root / "runs"),
        f"data.cache_dir={root / 'cache'}",
        f"data.feature_cache_dir={root / 'features'}",  # on by default (frozen towers): kept per test
        "data.num_workers=0",
        "train.batch_size=4",
        "train.eval_batch_size=12",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((root / "report.json").read_text()), proc.stdout, root


@pytest.mark.slow
def test_report_schema_and_plain_lora_row(ablation, tiny_dir: Path):
    report, stdout, root = ablation
    assert set(report) == {"rows", "skipped"}
    names = [r["config"] for r in report["rows"]]
    assert sorted(names + report["skipped"]) == ["ar", "plain_lora"]  # each row once
    assert names[0] == "plain_lora"
    for row in report["rows"]:
        assert set(row) == ROW_KEYS
        assert list(row["per_subset"]) == list(SUBSETS)  # the synthetic test set is balanced over subsets
        for subset in SUBSETS:
            assert set(row["per_subset"][subset]) == {"accuracy"}
            assert 0.0 <= row["per_subset"][subset]["accuracy"] <= 1.0
        assert 0.0 <= row["weighted_f1"] <= 1.0
        assert row["audio_dominance"] is None or 0.0 <= row["audio_dominance"] <= 1.0
        assert row["step_time_ratio"] > 0
    plain = report["rows"][0]
    assert plain["step_time_ratio"] == 1.0
    # exact: the trained parameters of a fresh model built from the same config
    cfg = load_config(None, [f"model.path={tiny_dir}", "data.train=x.jsonl"])
    model = build_mer_model(load_backbone(tiny_dir), cfg)
    counts = apply_trainable(model, cfg)
    assert plain["trainable_params"] == sum(t for t, _ in counts.values()) > 0
    for row in report["rows"][1:]:  # ar predicts with plain_lora's run: same parameters and step time
        assert row["trainable_params"] == plain["trainable_params"] and row["step_time_ratio"] == 1.0
    assert (root / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "plain_lora" in stdout and "step_time" in stdout  # the printed table
    for name in report["skipped"]:
        assert f"skip {name}: the config does not know its keys yet" in stdout


def test_rows_with_unknown_keys_are_skipped_and_real_errors_raise(tiny_dir: Path):
    harness = load_harness()
    config = REPO / "configs" / "tiny_cpu.yaml"
    base = [f"model.path={tiny_dir}", "model.build_tiny=false", "data.train=x.jsonl"]
    rows = [
        harness.Row("plain_lora"),
        harness.Row("bogus", train=("bogus.enabled=true",)),
        harness.Row("bogus_infer", infer=("lora.bogus=1",)),
    ]
    runnable, skipped = harness.plan_rows(config, base, rows)
    assert [r.name for r in runnable] == ["plain_lora"]
    assert [(r.name, reason) for r, reason in skipped] == [
        ("bogus", "unknown key 'bogus'"),
        ("bogus_infer", "unknown key 'lora.bogus'"),
    ]
    with pytest.raises(ConfigError, match="train.lr"):
        harness.plan_rows(config, [*base, "train.lr=fast"], rows[:1])


@pytest.mark.slow
def test_bias_report_on_the_plain_lora_run(ablation, tiny_dir: Path, syn_dir: Path):
    """scripts/bias_report.py with --run: attention shares of backbone and run, accuracy, unimodal."""
    _, _, root = ablation
    out = root / "bias" / "report.json"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "bias_report.py"),
        "--backbone",
        str(tiny_dir),
        "--data",
        str(syn_dir / "test.jsonl"),
        "--output",
        str(out),
        "--run",
        str(root / "runs" / "plain_lora"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    layers = load_backbone(tiny_dir).model.config.text_config.num_hidden_layers
    assert set(report["attention"]) == {"backbone", "fine-tuned"}
    for shares in report["attention"].values():
        assert len(shares["overall"]) == layers
        assert all(abs(sum(row) - 1) < 1e-5 for row in shares["overall"])
        assert set(shares["per_subset"]) == set(SUBSETS)
    acc = report["accuracy"]
    assert set(acc["fused"]["per_subset"]) == set(SUBSETS)
    assert set(acc["unimodal"]) == {"audio_only", "video_only"}
    assert (
        acc["audio_dominance"]["n_conflict"]
        == report["subset_counts"]["video_aligned"] + report["subset_counts"]["audio_aligned"]
    )
    assert report["answering"] == "fine-tuned" and set(report["unimodal"]) == {"audio_only", "video_only"}
    assert report["generated"]["prompt"] == "label" and report["probes"] == {"skipped": "no --train"}
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "Audio-dominance index" in proc.stdout and "| layer | backbone | fine-tuned |" in proc.stdout
