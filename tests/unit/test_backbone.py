"""The tiny twins (both families) load through the real loader; token_modality; the family table; errors."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen3OmniMoeThinkerForConditionalGeneration,
)

from mllm_mer.backbone import SpecialTokenIds, load_backbone, token_modality
from mllm_mer.backbone.families import (
    FAMILIES,
    QWEN2_5_OMNI,
    QWEN3_OMNI,
    SUPPORTED_MODEL_TYPES,
    backbone_part,
    chat_template,
    family_for_model_type,
)
from mllm_mer.backbone.tiny import TinySpec, ensure_tiny_thinker
from mllm_mer.backbone.tiny_qwen3 import TinyQwen3Spec
from mllm_mer.data.schema import Modality
from tests.conftest import REPO

THINKERS = {"qwen2_5_omni": Qwen2_5OmniThinkerForConditionalGeneration,
            "qwen3_omni": Qwen3OmniMoeThinkerForConditionalGeneration}


def test_tiny_twin_loads_frozen_through_loader(any_backbone):
    bb = any_backbone
    family = bb.family
    assert type(bb.model) is THINKERS[family.name]
    assert type(bb.processor).__name__ == family.processor_class
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert not bb.model.training
    tok = bb.processor.tokenizer
    for role, token in family.tokens.items():  # config ids and tokenizer agree, role by role
        assert getattr(bb.token_ids, role) == tok.convert_tokens_to_ids(token), role
    assert bb.token_ids.vision_bos == bb.model.config.vision_start_token_id  # what get_rope_index reads
    assert bb.model.get_submodule(family.language_model_layers) is bb.model.model.language_model.layers
    assert bb.processor.chat_template == chat_template(family)
    if family.deepstack:  # Qwen3: the processor interleaves audio/video with the rate the model's positions use
        assert bb.model.config.position_id_per_seconds == bb.processor.position_id_per_seconds
        assert bb.model.config.vision_config.patch_size == bb.processor.video_processor.patch_size == 16


def test_tiny_twin_is_deterministic_and_not_overwritten(tmp_path, tiny_dir):
    other = ensure_tiny_thinker(tmp_path / "t2")
    a = (tiny_dir / "model.safetensors").read_bytes()
    assert a == (other / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="another spec"):
        ensure_tiny_thinker(other, TinySpec(seed=5))
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a tiny thinker"):
        ensure_tiny_thinker(tmp_path / "user")


def test_qwen3_twin_is_deterministic_and_arch_is_checked(tmp_path, tiny_dir_qwen3):
    other = ensure_tiny_thinker(tmp_path / "q3", arch="qwen3_omni")
    assert (tiny_dir_qwen3 / "model.safetensors").read_bytes() == (other / "model.safetensors").read_bytes()
    assert ensure_tiny_thinker(other, TinyQwen3Spec()) == other  # the marker (tuples as lists) matches
    with pytest.raises(ValueError, match="another spec"):  # a Qwen3 twin is not the Qwen2.5 default
        ensure_tiny_thinker(other)
    with pytest.raises(ValueError, match="arch="):
        ensure_tiny_thinker(tmp_path / "x", TinySpec(), arch="qwen3_omni")
    with pytest.raises(ValueError, match="unknown backbone family"):
        ensure_tiny_thinker(tmp_path / "y", arch="llama")


def test_build_tiny_script(tmp_path):
    spec = importlib.util.spec_from_file_location("build_tiny", REPO / "scripts" / "build_tiny.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "q3"
    assert script.main(["--arch", "qwen3_omni", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_omni_moe_thinker"
    assert script.main(["--arch", "qwen3_omni", "--out", str(out)]) == 0  # same spec: kept
    assert script.main(["--arch", "qwen2_5_omni", "--out", str(out)]) == 2  # never overwritten


def test_family_table():
    assert set(SUPPORTED_MODEL_TYPES) == {"qwen2_5_omni_thinker", "qwen2_5_omni", "qwen3_omni_moe_thinker",
                                          "qwen3_omni_moe"}
    assert family_for_model_type("qwen3_omni_moe") is QWEN3_OMNI
    assert family_for_model_type("qwen2_5_omni_thinker") is QWEN2_5_OMNI
    with pytest.raises(ValueError, match="supported"):
        family_for_model_type("llama")
    for family in FAMILIES.values():
        assert re.fullmatch(family.adapter_exclude, "model.audio_tower.layers.0.self_attn.q_proj")
        assert re.fullmatch(family.adapter_exclude, "model.visual.blocks.0.attn.qkv")
        assert not re.fullmatch(family.adapter_exclude, "model.language_model.layers.0.self_attn.q_proj")
        template = chat_template(family)
        assert all(token in template for token in family.tokens.values())
    # the projector children of the two families never collide, so `backbone_part` needs no family
    assert backbone_part("backbone.model.audio_tower.proj.weight") == "audio_projector"
    assert backbone_part("backbone.base_model.model.model.audio_tower.proj2.bias") == "audio_projector"
    assert backbone_part("backbone.model.audio_tower.conv2d1.weight") == "audio_tower"
    assert backbone_part("backbone.model.visual.merger_list.0.mlp.0.weight") == "vision_projector"
    assert backbone_part("backbone.model.visual.pos_embed.weight") == "vision_tower"
    expert = "backbone.model.language_model.layers.0.mlp.experts.gate_up_proj"  # Qwen3 MoE: a 3-D parameter
    assert backbone_part(expert) == "language_model"
    assert backbone_part("backbone.lm_head.weight") == "language_model"
    assert backbone_part("fusion_head.weight") is None


def test_special_token_ids_fall_back_to_the_tokenizer(any_backbone):
    """A config lacking an id attribute gets that id from the tokenizer, by the family's token name."""
    bb = any_backbone
    ids = {attr: getattr(bb.model.config, attr)
           for role, attr in bb.family.config_ids.items() if role != "audio_eos"}
    config = SimpleNamespace(model_type=bb.model.config.model_type, **ids)
    assert SpecialTokenIds.from_model_config(config, bb.processor.tokenizer) == bb.token_ids


def test_audio_tower_is_not_deaf(any_backbone):
    """Different inputs give clearly different audio-tower outputs (the conv re-init works), both families."""
    backbone = any_backbone
    fe = backbone.processor.feature_extractor
    t = torch.linspace(0, 2, 32000)
    outs = []
    for f0 in (120.0, 400.0):
        wav = (0.3 * torch.sin(2 * torch.pi * f0 * t)).numpy()
        feats = fe(wav, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
        with torch.no_grad():
            o = backbone.model.get_audio_features(
                feats["input_features"], feats["attention_mask"], return_dict=True
            ).last_hidden_state
        outs.append(o)
    diff = (outs[0] - outs[1]).norm() / outs[0].norm()
    assert diff > 0.2


def test_token_modality_codes(any_backbone):
    ids = any_backbone.token_ids
    x = torch.tensor([[5, ids.vision_bos, ids.audio_bos, ids.video, ids.video, ids.audio, ids.audio_eos, 7]])
    tm = token_modality(x, ids)
    assert tm.tolist() == [[0, 0, 0, 2, 2, 1, 0, 0]]
    assert tm.dtype == torch.long and int(Modality.VIDEO) == 2


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path"):
        load_backbone(tmp_path / "nope")
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        load_backbone(d)
    with pytest.raises(ValueError, match="model.dtype"):
        load_backbone(d, dtype="fp8")


def test_full_omni_checkpoint_loads_its_thinker_only(tiny_backbone_dir, any_backbone, tmp_path):
    """A full-model checkpoint (thinker + talker, keys under `thinker.`; the family's full `model_type`) gives
    the same thinker as the thinker-only checkpoint."""
    full = tmp_path / "full"
    shutil.copytree(tiny_backbone_dir, full)
    thinker_cfg = json.loads((tiny_backbone_dir / "config.json").read_text())
    state = load_file(tiny_backbone_dir / "model.safetensors")
    save_file({f"thinker.{k}": v for k, v in state.items()} | {"talker.dummy.weight": torch.zeros(2)},
              full / "model.safetensors", metadata={"format": "pt"})
    family = any_backbone.family
    (full / "config.json").write_text(json.dumps({"model_type": family.full_model_type,
                                                  "thinker_config": thinker_cfg, "enable_audio_output": False}))
    loaded = load_backbone(full)
    assert type(loaded.model) is type(any_backbone.model) and loaded.token_ids == any_backbone.token_ids
    ref = any_backbone.model.state_dict()
    got = loaded.model.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
