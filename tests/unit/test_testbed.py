"""Tests of the testbed recipe (`mllm_mer.testbed`) and the cached path of `scripts/pretrain_tiny.py`."""

from __future__ import annotations

import importlib.util
from collections import Counter

from mllm_mer.backbone.tiny import TinySpec
from mllm_mer.data.synthetic import _plan_split, intensity_word
from mllm_mer.testbed import STAGE0_DATA, STAGE0_SPEC, TESTBED_DATA, stage0_dir, stage0_key
from tests.conftest import REPO


def test_stage0_data_never_shows_a_conflict_and_varies_intensity_per_modality():
    clips = _plan_split(STAGE0_DATA, "train")
    assert {c.subset for c in clips} == {"consistent"}
    assert all(c.video_cue == c.audio_cue == c.label for c in clips)
    for modality in ("video", "audio"):
        words = Counter(intensity_word(getattr(c, f"{modality}_intensity")) for c in clips)
        assert set(words) == {"faint", "clear", "strong"}
    assert STAGE0_DATA.audio_noise < STAGE0_DATA.video_noise  # the voice is the cleaner, trusted cue
    assert TESTBED_DATA.train_conflict_rate > 0 and TESTBED_DATA.weak_display_rate == 0


def test_stage0_spec_is_deeper_than_the_test_twin():
    assert STAGE0_SPEC.text_layers == 4 and STAGE0_SPEC.explain_corpus
    assert TinySpec().text_layers == 2 and not TinySpec().explain_corpus  # the tests' twin is unchanged


def test_stage0_key_covers_config_seed_and_overrides(tmp_path):
    text = "train:\n  epochs: 6\n"
    assert stage0_key(text, 0) == stage0_key(text, 0) != stage0_key(text, 1)
    assert stage0_key(text, 0) != stage0_key(text.replace("6", "5"), 0)
    assert stage0_key(text, 0, ["train.epochs=1"]) not in (stage0_key(text, 0), stage0_key(text, 0, ["train.epochs=2"]))
    assert stage0_dir(text, tmp_path, 3).name == f"stage0-{stage0_key(text, 3)}"


def pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain_tiny", REPO / "scripts" / "pretrain_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_script_prints_the_cached_backbone_last(tmp_path, capsys):
    module = pretrain_script()
    config_text = (REPO / "configs" / "pretrain_tiny.yaml").read_text()
    backbone = stage0_dir(config_text, tmp_path, 0, ["train.epochs=1"]) / "backbone"
    assert module.backbone_dir(tmp_path, 0, ["train.epochs=1"]) == backbone
    backbone.mkdir(parents=True)
    (backbone / "config.json").write_text("{}")
    assert module.main(["--root", str(tmp_path), "train.epochs=1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(backbone)


def test_ensure_stage0_backbone_finds_the_cached_one_without_training(tmp_path):
    module = pretrain_script()
    backbone = module.backbone_dir(tmp_path, 2)
    backbone.mkdir(parents=True)
    (backbone / "config.json").write_text("{}")
    assert module.ensure_stage0_backbone(tmp_path, 2) == backbone
