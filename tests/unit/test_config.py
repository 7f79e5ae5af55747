"""Config loading: unknown keys, types, ranges, overrides, every shipped YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm_mer.config import ConfigError, RunConfig, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_dotted_path_and_suggestion(tmp_path):
    p = write(tmp_path, "data:\n  train: a.jsonl\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "train.lrr" in msg and "did you mean 'train.lr'" in msg


def test_unknown_section_and_all_errors_at_once(tmp_path):
    p = write(tmp_path, "data:\n  train: a.jsonl\nmodle: {}\ntrain:\n  batch_size: 0\n  lr: fast\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    errs = exc.value.errors
    assert any("'modle'" in e and "model" in e for e in errs)
    assert any("train.batch_size=0" in e for e in errs)
    assert any("train.lr must be float" in e for e in errs)
    assert len(errs) == 3


def test_literal_and_override_parsing():
    with pytest.raises(ConfigError, match=r"model.dtype='fp8' is not allowed"):
        load_config(None, ["data.train=x.jsonl", "model.dtype=fp8"])
    cfg = load_config(None, ["data.train=x.jsonl", "train.lr=5e-4", "adapter=none", "train.max_steps=3"])
    assert cfg.train.lr == 5e-4 and cfg.adapter == "none" and cfg.train.max_steps == 3
    assert parse_overrides(["a.b=1", "a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["--lr", "1"])


def test_cross_field_checks():
    (problem,) = load_config(None, []).data.training_problems()  # checked by finetune, not by inference
    assert problem.startswith("data.train is empty")
    with pytest.raises(ConfigError, match="both 0"):
        load_config(None, ["data.train=x", "train.lm_loss_weight=0", "train.cls_loss_weight=0"])


def test_synthetic_dir_fills_split_paths():
    cfg = load_config(None, ["data.synthetic_dir=/d"])
    assert cfg.data.train == "/d/train.jsonl" and cfg.data.dev == "/d/dev.jsonl"
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Every YAML is valid; those whose data paths come from the command line get one here."""
    import yaml

    data = (yaml.safe_load(path.read_text()) or {}).get("data", {})
    given = data.get("train") or data.get("synthetic_dir")
    load_config(path, [] if given else ["data.train=given_on_the_command_line.jsonl"])


def test_feature_cache_defaults_on_exactly_when_every_encoder_part_is_frozen():
    from mllm_mer.config import feature_cache_enabled, feature_cache_note

    cfg = load_config(None, ["data.train=x.jsonl"])
    assert cfg.data.feature_cache is True and feature_cache_note(cfg) is None  # resolved: frozen towers
    assert feature_cache_enabled(RunConfig()) is True  # None (a config built in code) means the same
    off = load_config(None, ["data.train=x.jsonl", "data.feature_cache=false"])
    assert off.data.feature_cache is False and feature_cache_note(off) is None  # the user's explicit choice
    tower = load_config(None, ["data.train=x.jsonl", "model.freeze.vision_tower=false"])
    assert tower.data.feature_cache is False
    note = feature_cache_note(tower)
    assert note is not None and "model.freeze.vision_tower=false" in note and "\n" not in note
    with pytest.raises(ConfigError, match="data.feature_cache=true needs model.freeze.audio_projector=true"):
        load_config(None, ["data.train=x.jsonl", "data.feature_cache=true", "model.freeze.audio_projector=false"])
