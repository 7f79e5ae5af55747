"""DCR end to end on the tiny model: finetune with dcr.enabled, fit the arbiter on dev, predict, evaluate."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mllm_mer.config import load_run_config
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.fusion.dcr.ada import ARBITER_FILE, ARMS, SEARCH_GRID
from mllm_mer.generation import generate_rows, load_for_inference, predict_rows
from tests.smoke.conftest import REPO, base_args, check, run_finetune

pytestmark = pytest.mark.smoke


def fit_arbiter(run: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "fit_arbiter.py"),
        "--run",
        str(run),
        "--data",
        str(data),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def dcr_run(tiny_dir: Path, syn_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 3-step `accelerate launch scripts/finetune.py dcr.enabled=true` run."""
    root = tmp_path_factory.mktemp("dcr")
    out = check(
        run_finetune(
            [
                *base_args(tiny_dir, syn_dir, root / "run", root / "cache"),
                "dcr.enabled=true",
                "train.max_steps=3",
                "train.save_every=0",
            ]
        )
    )
    return root / "run", out


def test_finetune_trains_every_path(dcr_run):
    run, out = dcr_run
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    for r in log:
        for key in ("dcr_text", "dcr_audio", "dcr_video", "dcr_afd"):
            assert key in r and r[key] >= 0, key
    for name in ("dcr_text", "dcr_audio", "dcr_video"):  # peft saves each adapter in its own folder
        assert (run / "adapter" / name / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert "dev step 3" in out
    # the reliability heads are fitted after the last step, on the training split, and saved with the heads
    fitted = json.loads((run / "final_metrics.json").read_text())["after_training"]["dcr_reliability"]
    cfg = load_run_config(run)
    n_train = len(read_jsonl(cfg.data.train, list(cfg.data.labels)))
    assert sorted(fitted) == sorted(ARMS[1:])
    heads = load_file(str(run / "heads.safetensors"))
    for path, summary in fitted.items():
        assert summary["fitted"] and 0 < summary["samples"] <= n_train and summary["loo_rmse"] >= 0
        assert float(heads[f"fusion_{path}_reliability.fitted"]) == 1.0


def test_fit_arbiter_refuses_training_data(dcr_run, syn_dir, tmp_path):
    run, _ = dcr_run
    proc = fit_arbiter(run, syn_dir / "train.jsonl")
    assert proc.returncode == 2 and "is the run's training data" in proc.stderr
    mixed = tmp_path / "mixed.jsonl"  # another file, but holding training samples
    lines = (syn_dir / "dev.jsonl").read_text().splitlines() + (
        syn_dir / "train.jsonl"
    ).read_text().splitlines()[:2]
    mixed.write_text("\n".join(lines) + "\n")
    shutil.copytree(syn_dir / "media", tmp_path / "media")
    proc = fit_arbiter(run, mixed)
    assert proc.returncode == 2 and "2 of 14 sample ids are in the run's training data" in proc.stderr
    assert not (run / ARBITER_FILE).exists()


def test_fit_arbiter_then_predict_and_evaluate(dcr_run, syn_dir, tmp_path):
    run, _ = dcr_run
    # reward=answer generates every arm's answer on dev: short answers keep the random model's babble cheap
    proc = fit_arbiter(run, syn_dir / "dev.jsonl", "dcr.arbiter.epochs=2", "generate.max_new_tokens=6")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "always_fuse" in proc.stdout and "oracle" in proc.stdout
    saved = json.loads((run / ARBITER_FILE).read_text())
    assert (
        saved["fit"]["n"] == 12
        and saved["fit"]["data"].endswith("dev.jsonl")
        and saved["config"]["epochs"] == 2
        and "search" not in saved["fit"]
    )
    # --search: the settings are chosen on dev first (every SEARCH_GRID setting, cross-fitted) and kept
    proc = fit_arbiter(run, syn_dir / "dev.jsonl", "--search", "dcr.arbiter.epochs=2", "generate.max_new_tokens=6")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "searched 24 dcr.arbiter settings" in proc.stdout
    saved = json.loads((run / ARBITER_FILE).read_text())
    search = saved["fit"]["search"]
    assert len(search["settings"]) == 24 and search["chosen"] == {k: saved["config"][k] for k in SEARCH_GRID}
    best = max(r["answer_accuracy"] for r in search["settings"])
    assert next(r for r in search["settings"] if r["answer_accuracy"] == best)["values"] == search["chosen"]
    assert saved["fit"]["crossfit"]["answer_accuracy"] == pytest.approx(best)

    model = load_for_inference(run_dir=run, cfg=load_run_config(run, ["generate.max_new_tokens=6"]))
    assert model.arbiter is not None and saved["config"]["reward"] == "answer"
    assert 0.0 <= saved["fit"]["crossfit"]["answer_accuracy"] <= 1.0
    samples = read_jsonl(syn_dir / "test.jsonl", model.cfg.data.labels)
    rows = list(predict_rows(model, samples, batch_size=6))
    for r in rows:
        assert set(r["probs"]) == {*ARMS, "arbiter"} and r["arm"] in ARMS
        assert r["probs"]["arbiter"] == r["probs"][r["arm"]]
        assert r["answer_arm"] == r["arm"] and "fused_label" in r  # the answer follows the arbiter
    options = dataclasses.replace(model.cfg.generate, prompt="label", max_new_tokens=2)
    generated = list(generate_rows(model, samples[:2], options, False))
    assert [g["arm"] for g in generated] == [r["arm"] for r in rows[:2]]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "evaluate.py"),
            "synthetic",
            "--predictions",
            str(preds),
            "--references",
            str(syn_dir / "test.jsonl"),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    fod = report["fuse_or_drop"]
    assert list(fod["subsets"]) == ["all", "consistent", "video_aligned", "audio_aligned"]
    overall = fod["subsets"]["all"]
    assert overall["n"] == 12 and abs(sum(overall["arm_share"].values()) - 1) < 1e-9
    assert overall["oracle"] >= max(overall["always_fuse"], overall["best_single"], overall["arbiter"])
    assert overall["arbiter"] == pytest.approx(report["per_path"]["arbiter"]["accuracy"])
    assert "DCR: fuse or drop" in out.with_suffix(".md").read_text()
