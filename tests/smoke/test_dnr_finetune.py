"""DnR end to end on the tiny model: finetune (joint stage, Refine from step 1, the logits head) -> heads on
disk -> predict_rows with per-sample component ablation -> evaluation report; then a stage "refine" run from the
first run's Divide heads (`dnr.init_from`), which keeps them frozen; and the default phased run (Divide, then
Refine from the divided heads, with the feature head)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from eval.report import report_paths, write_report
from eval.tasks import EvalOptions, run_task
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.fusion.dnr import DIVIDE_PREFIX
from mllm_mer.fusion.dnr.model import COMPONENTS
from mllm_mer.generation import load_for_inference, predict_rows
from tests.smoke.conftest import base_args, check, run_finetune

DNR = ["dnr.enabled=true", "dnr.part_dim=16", "train.save_every=0"]


@pytest.fixture(scope="module")
def dnr_run(tiny_dir: Path, syn_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dnr")
    args = [*base_args(tiny_dir, syn_dir, root / "joint", root / "cache"), *DNR, "train.max_steps=3",
            "dnr.stage=joint", "dnr.refine_start_step=1", "dnr.head_input=logits"]
    check(run_finetune(args))
    return root / "joint"


def test_joint_run_logs_trains_saves_and_explains(dnr_run: Path, syn_dir: Path, tmp_path: Path):
    rows = [json.loads(line) for line in (dnr_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all({"dnr_push", "dnr_pull", "dnr_synergy", "cls_loss"} <= set(r) for r in rows)
    assert "dnr_refine" not in rows[0] and all("dnr_refine" in r for r in rows[1:])  # Refine from step 1
    heads = load_file(str(dnr_run / "heads.safetensors"))
    assert any(k.startswith(DIVIDE_PREFIX) for k in heads) and "fusion_dnr.classifier.weight" in heads
    assert heads["fusion_dnr.classifier.weight"].abs().sum() > 0  # trained away from its zero init

    model = load_for_inference(run_dir=dnr_run)
    samples = read_jsonl(syn_dir / "test.jsonl", model.cfg.data.labels)[:4]
    preds = list(predict_rows(model, samples, batch_size=4))
    assert [p["id"] for p in preds] == [s.id for s in samples]
    for p in preds:
        assert list(p["dnr_ablation"]) == list(COMPONENTS)
        assert all(v["kl"] >= 0 and -1 <= v["delta_p"] <= 1 for v in p["dnr_ablation"].values())
    assert any(v["kl"] > 0 for p in preds for v in p["dnr_ablation"].values())

    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(line + "\n" for line in (syn_dir / "test.jsonl").read_text().splitlines()[:4]))
    (tmp_path / "pred.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    result = run_task("synthetic", EvalOptions(predictions=tmp_path / "pred.jsonl", references=refs))
    assert result["dnr_ablation"]["n"] == 4
    write_report(result, tmp_path / "eval.json")
    assert "## DnR component ablation" in report_paths(tmp_path / "eval.json")["markdown"].read_text()


def test_refine_stage_from_a_divided_run_keeps_the_divide_heads(
    dnr_run: Path, tiny_dir: Path, syn_dir: Path, tmp_path: Path
):
    args = [*base_args(tiny_dir, syn_dir, tmp_path / "refine", dnr_run.parent / "cache"), *DNR,
            "train.max_steps=1", "dnr.stage=refine", f"dnr.init_from={dnr_run}", "data.dev="]  # no dev pass
    out = check(run_finetune(args))
    assert "Divide heads loaded" in out
    before = load_file(str(dnr_run / "heads.safetensors"))
    after = load_file(str(tmp_path / "refine" / "heads.safetensors"))
    divide = [k for k in after if k.startswith(DIVIDE_PREFIX)]
    assert divide and all((after[k] == before[k]).all() for k in divide)  # frozen through the whole run
    assert not (after["fusion_dnr.recombine.weight"] == before["fusion_dnr.recombine.weight"]).all()
    rows = [json.loads(line) for line in (tmp_path / "refine" / "train_log.jsonl").read_text().splitlines()]
    assert "dnr_refine" in rows[0] and "dnr_push" not in rows[0]


def test_default_phased_run_divides_then_refines_from_the_divided_heads(
    dnr_run: Path, tiny_dir: Path, syn_dir: Path, tmp_path: Path
):
    args = [*base_args(tiny_dir, syn_dir, tmp_path / "phased", dnr_run.parent / "cache"), *DNR,
            "train.max_steps=4", "data.dev="]  # dnr.stage=phased, divide_fraction=0.5, head_input=features
    check(run_finetune(args))
    rows = [json.loads(line) for line in (tmp_path / "phased" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("dnr_push" in r and "dnr_refine" not in r for r in rows[:2])  # Divide: optimizer steps 0, 1
    assert all("dnr_refine" in r and "dnr_push" not in r and r["dnr_synergy"] == 0.0 for r in rows[2:])
    heads = load_file(str(tmp_path / "phased" / "heads.safetensors"))
    assert "fusion_dnr.classifier.weight" not in heads
    assert heads["fusion_dnr.feature_head.out.weight"].abs().sum() > 0  # the feature head trained
