"""The stage-0 backbone shipped in mllm_mer/resources/stage0: it is the current recipe's result, installs
intact (and refuses damaged copies or foreign folders), loads like any checkpoint, and explains; the slow tier
rebuilds it from scratch and compares."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mllm_mer.backbone import load_backbone
from mllm_mer.backbone.stage0 import (
    MARKER,
    SHIPPED_STAGE0,
    backbone_hashes,
    install_stage0,
    shipped_stage0_info,
)
from mllm_mer.config import ConfigError, load_config
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.generation import InferenceModel, generate_rows
from mllm_mer.labels import parse_label
from mllm_mer.testbed import stage0_key
from tests.conftest import REPO
from tests.unit.test_testbed import pretrain_script


def test_the_shipped_backbone_is_the_current_recipe_and_intact():
    """A change to the stage-0 recipe (data, config, spec, phases, version) must ship a rebuilt backbone."""
    info = shipped_stage0_info()
    assert info["key"] == stage0_key((REPO / "configs" / "pretrain_tiny.yaml").read_text(), info["seed"])
    assert info["files"] == backbone_hashes(SHIPPED_STAGE0 / "backbone")
    assert "model.safetensors" in info["files"] and info["overrides"] == []
    assert set(info["dev"]) == {"perceive", "explain"}
    assert (SHIPPED_STAGE0 / "backbone" / "model.safetensors").stat().st_size < 4_000_000  # small enough to ship
    assert pretrain_script().shipped_matches(info["seed"])


def test_install_copies_once_and_refuses_foreign_or_damaged_folders(tmp_path):
    out = install_stage0(tmp_path / "stage0")
    assert backbone_hashes(SHIPPED_STAGE0 / "backbone").items() <= backbone_hashes(out).items()
    assert json.loads((out / MARKER).read_text())["key"] == shipped_stage0_info()["key"]
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert install_stage0(out) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp  # no recopy
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a stage-0 backbone installed by mllm_mer"):
        install_stage0(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    damaged = tmp_path / "damaged"
    shutil.copytree(SHIPPED_STAGE0, damaged)
    with open(damaged / "backbone" / "model.safetensors", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(ValueError, match=r"damaged: \['model.safetensors'\]"):
        install_stage0(tmp_path / "from_damaged", root=damaged)
    assert not (tmp_path / "from_damaged").exists()
    assert not list(tmp_path.glob(".from_damaged.tmp-*"))


def test_the_default_config_installs_it_and_rejects_a_qwen3_twin(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [])
    assert cfg.model.build_tiny and cfg.model.tiny_weights == "stage0"
    with pytest.raises(ConfigError, match="model.tiny_weights=stage0 is a Qwen2.5-Omni thinker"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["model.tiny_arch=qwen3_omni"])


def test_the_shipped_backbone_explains(tmp_path, syn_dir: Path):
    """Zero-shot, the bare backbone answers the `explain` prompt with an explanation that names both cues
    and ends in a label."""
    backbone = load_backbone(install_stage0(tmp_path / "stage0"))
    cfg = load_config(None, [f"model.path={backbone.path}", "data.train=x.jsonl", "generate.prompt=explain",
                             "generate.max_new_tokens=96", f"data.cache_dir={tmp_path / 'cache'}"])
    samples = read_jsonl(syn_dir / "test.jsonl", cfg.data.labels)[:2]
    rows = list(generate_rows(InferenceModel(backbone, cfg, None), samples, progress=False))
    for row in rows:
        assert parse_label(row["text"], cfg.data.labels) in cfg.data.labels, row["text"]
        assert "face" in row["text"] and "voice" in row["text"], row["text"]


@pytest.mark.slow
def test_rebuilding_stage0_reproduces_the_shipped_backbone(tmp_path):
    """`scripts/pretrain_tiny.py` from scratch (about 5 CPU-minutes): the same recipe key and the same dev
    figures per phase as the shipped provenance (bitwise-equal weights are expected on this CPU kind but not
    required: another CPU may round differently)."""
    module = pretrain_script()
    info = shipped_stage0_info()
    assert module.main(["--root", str(tmp_path), "--seed", str(info["seed"])]) == 0
    built = module.backbone_dir(tmp_path, info["seed"])
    assert built.parent.name == f"stage0-{info['key']}"
    rebuilt = json.loads((built.parent / "stage0.json").read_text())
    for phase, metrics in info["dev"].items():
        assert rebuilt["dev"][phase]["accuracy"] == pytest.approx(metrics["accuracy"], abs=0.05), phase
    assert set(backbone_hashes(built)) == set(info["files"])
