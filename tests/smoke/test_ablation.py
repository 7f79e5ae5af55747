"""bench/conflict_ablation.py end to end on the tiny random thinker (2 steps, rows plain_lora + ar + dcr, 2
seeds): the report's schema (primary prediction = the generated answer; for dcr the answer from the modalities
of the arm its arbiter picks; by_path, seeds,
intervals), a second run whose test labels are permuted (the dev search must not change: it never reads
test), config errors that stop the harness before it trains, and scripts/bias_report.py on a run it trained."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mllm_mer.backbone import load_backbone
from mllm_mer.config import ConfigError, load_config
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.schema import MER2023_LABELS, SUBSETS
from mllm_mer.model import build_mer_model
from mllm_mer.trainable import apply_trainable

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "bench" / "conflict_ablation.py"
ROW_KEYS = {"config", "primary_path", "per_subset", "ci", "weighted_f1", "audio_dominance", "by_path", "seeds",
            "knobs", "trainable_params", "step_time_ratio", "conflict_mean", "correct"}


def load_harness():
    spec = importlib.util.spec_from_file_location("conflict_ablation", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_harness(data: Path, backbone: Path, root: Path, configs: str = "plain_lora,ar,dcr", seeds: str = "0,1",
                *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, str(HARNESS), "--data", str(data), "--backbone", str(backbone), "--steps", "2",
        "--configs", configs, "--seeds", seeds, "--output", str(root / "report.json"), "--workdir", str(root / "runs"),
        f"data.cache_dir={root / 'cache'}",
        f"data.feature_cache_dir={root / 'features'}",  # on by default (frozen towers): kept per test
        "data.num_workers=0", "train.batch_size=4", "train.eval_batch_size=12", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)


@pytest.fixture(scope="module")
def ablation(tiny_dir: Path, syn_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    root = tmp_path_factory.mktemp("ablation")
    proc = run_harness(syn_dir, tiny_dir, root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((root / "report.json").read_text()), proc.stdout, root


@pytest.mark.slow
def test_report_schema_primary_answer_and_intervals(ablation, tiny_dir: Path, syn_dir: Path):
    report, stdout, root = ablation
    assert report["seeds"] == [0, 1] and report["fixed"]["train.max_steps"] == 2
    names = [r["config"] for r in report["rows"]]
    assert names == ["plain_lora", "ar", "dcr"]
    test = read_jsonl(syn_dir / "test.jsonl", MER2023_LABELS)
    for row in report["rows"]:
        assert set(row) == ROW_KEYS | ({"paired_vs_plain_lora"} if row["config"] != "plain_lora" else set())
        assert row["primary_path"] == ("arbiter_answer" if row["config"] == "dcr" else "generated")
        assert set(row["by_path"]) == ({"generated", "head", "arbiter", "arbiter_answer"}
                                       if row["config"] == "dcr" else {"generated", "head"})
        assert [s["seed"] for s in row["seeds"]] == [0, 1]
        for subset in SUBSETS:
            cell = row["per_subset"][subset]
            lo, hi = cell["ci"]
            assert 0.0 <= lo <= cell["accuracy"] <= hi <= 1.0 and row["ci"][subset] == [lo, hi]
            # the mean over seeds of the primary path's per-seed accuracy
            seeds = [s["per_subset"][subset] for s in row["seeds"]]
            assert cell["accuracy"] == pytest.approx(sum(seeds) / len(seeds))
            assert row["by_path"][row["primary_path"]][subset] == pytest.approx(cell["accuracy"])
        conflict = [i for i, t in enumerate(test) if t.subset != "consistent"]
        assert row["conflict_mean"]["accuracy"] == pytest.approx(
            sum(row["correct"][str(s)][i] for s in (0, 1) for i in conflict) / (2 * len(conflict)))
        assert row["audio_dominance"] is None or 0.0 <= row["audio_dominance"] <= 1.0
        assert row["step_time_ratio"] > 0
        if row["config"] != "plain_lora":  # the same clips and seeds as the baseline, paired
            paired = row["paired_vs_plain_lora"]["conflict"]
            base = report["rows"][0]["conflict_mean"]["accuracy"]
            assert paired["difference"] == pytest.approx(row["conflict_mean"]["accuracy"] - base)
    assert report["test_clips_per_subset"] == {s: sum(t.subset == s for t in test) for s in SUBSETS}
    search = report["search"]
    assert search["plain_lora"]["grid"] == [] and search["plain_lora"]["chosen"] == {}
    grid = search["ar"]["grid"]
    assert len(grid) == 8 and {tuple(g["values"]) for g in grid} == {("ar.strength", "ar.target_audio_share")}
    best = max(g["dev_accuracy"] for g in grid)
    assert search["ar"]["chosen"] == next(g["values"] for g in grid if g["dev_accuracy"] == best)
    assert report["rows"][1]["knobs"] == search["ar"]["chosen"]
    arbiter = search["dcr"]["arbiter"]
    # state (rich, reliable: the run fits reliability heads) x feedback x calibration weight x fusion margin
    assert len(arbiter["grid"]) == 2 * 2 * 2 * 3 and arbiter["folds"] >= 2
    assert {g["values"]["state"] for g in arbiter["grid"]} == {"rich", "reliable"}
    best = max(g["cross_fitted_dev_accuracy"] for g in arbiter["grid"])
    assert arbiter["chosen"] == next(g["values"] for g in arbiter["grid"] if g["cross_fitted_dev_accuracy"] == best)
    plain = report["rows"][0]
    assert plain["step_time_ratio"] == 1.0
    # exact: the trained parameters of a fresh model built from the same config
    cfg = load_config(None, [f"model.path={tiny_dir}", "data.train=x.jsonl"])
    model = build_mer_model(load_backbone(tiny_dir), cfg)
    assert plain["trainable_params"] == sum(t for t, _ in apply_trainable(model, cfg).values()) > 0
    assert report["rows"][1]["trainable_params"] == plain["trainable_params"]  # ar predicts with plain's run
    assert (root / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "plain_lora" in stdout and "knobs chosen on dev" in stdout


@pytest.mark.slow
def test_the_dev_search_never_reads_test_labels(ablation, tiny_dir: Path, syn_dir: Path, tmp_path: Path):
    """Same data but the test labels (and cues) rotated: every dev choice is unchanged, test scores move."""
    report, _, _ = ablation
    data = tmp_path / "data"
    shutil.copytree(syn_dir, data, symlinks=True)
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines() if line.strip()]
    labels = list(MER2023_LABELS)
    for r in rows:
        r["label"] = labels[(labels.index(r["label"]) + 1) % len(labels)]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_harness(data, tiny_dir, tmp_path / "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    permuted = json.loads((tmp_path / "run" / "report.json").read_text())
    assert permuted["search"] == report["search"]
    assert [r["knobs"] for r in permuted["rows"]] == [r["knobs"] for r in report["rows"]]
    # the test labels did change the scores (the random model's answers are all wrong either way; its heads
    # are not)
    assert [r["by_path"] for r in permuted["rows"]] != [r["by_path"] for r in report["rows"]]


def test_config_errors_stop_the_harness_before_training(tiny_dir: Path, syn_dir: Path, tmp_path: Path):
    """An unknown key in a row or in a global override is the config error, naming it (no skipped row)."""
    harness = load_harness()
    config = REPO / "configs" / "tiny_cpu.yaml"
    base = [f"model.path={tiny_dir}", "model.build_tiny=false", "data.train=x.jsonl"]
    harness.check_rows(config, base, [harness.Row("plain_lora"), harness.Row("ar", search=harness.AR_GRID)])
    full = next(r for r in harness.ROWS if r.name == "full")
    harness.check_rows(config, base, [full])  # per-sample AR's "reliability" confidence: the run fits the heads
    no_heads = [*base, "dcr.reliability=false", "dcr.arbiter.state=rich"]
    harness.check_rows(config, no_heads, [full])  # ... and it is left out of the grid when it would not
    assert harness.search_grid(full, load_config(config, [*no_heads, *full.train]))["ar.sample_confidence"] == (
        "max_prob",)
    for row in (harness.Row("bogus", train=("bogus.enabled=true",)), harness.Row("x", infer=("lora.bogus=1",)),
                harness.Row("y", search={"ar.strenght": (0.5,)})):
        with pytest.raises(ConfigError, match=f"row '{row.name}'"):
            harness.check_rows(config, base, [harness.Row("plain_lora"), row])
    with pytest.raises(ConfigError, match="train.lr"):
        harness.check_rows(config, [*base, "train.lr=fast"], [harness.Row("plain_lora")])
    out = tmp_path / "report.json"
    code = harness.main(["--data", str(syn_dir), "--backbone", str(tiny_dir), "--configs", "plain_lora",
                         "--output", str(out), "--workdir", str(tmp_path / "runs"), "train.lrr=0.1"])
    assert code == 2 and not out.exists() and not (tmp_path / "runs" / "seed0").exists()


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
        str(root / "runs" / "seed0" / "plain_lora"),
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


def test_paired_differences_against_the_baseline():
    """Same clips, same seeds: the difference of the means, its interval around it, the subsets kept apart."""
    from types import SimpleNamespace

    harness = load_harness()
    test = [SimpleNamespace(subset=s) for s in ("consistent", "video_aligned", "audio_aligned") for _ in range(40)]
    base = {"correct": {"0": [1] * 40 + [0] * 40 + [1] * 40, "1": [1] * 40 + [0] * 40 + [1] * 40}}
    row = {"correct": {"0": [1] * 38 + [0] * 2 + [1] * 30 + [0] * 10 + [1] * 40,
                       "1": [1] * 40 + [1] * 20 + [0] * 20 + [1] * 40, "7": [0] * 120}}  # seed 7: no pair
    d = harness.paired_differences(row, base, test)
    assert d["video_aligned"]["difference"] == pytest.approx(0.625)  # (30 + 20) / 80
    assert d["conflict"]["difference"] == pytest.approx(0.3125) and d["audio_aligned"]["difference"] == 0.0
    assert d["consistent"]["difference"] == pytest.approx(-0.025)
    lo, hi = d["conflict"]["ci"]
    assert lo < 0.3125 < hi and lo > 0.1
    assert d["audio_aligned"]["ci"] == [0.0, 0.0]
    assert harness.paired_differences({"correct": {"5": [1] * 120}}, base, test) == {}
    table = harness.format_table([
        {**r, "config": n, "primary_path": "generated", "per_subset": {}, "weighted_f1": 0.5, "audio_dominance": None,
         "by_path": {"head": {}}, "trainable_params": 1, "step_time_ratio": 1.0} for n, r in
        (("plain_lora", base), ("dcr", {**row, "paired_vs_plain_lora": d}))])
    assert "dcr        +31.2 [" in table and "/ -2.5 [" in table
