"""The tiny twin loads through the real loader; token_modality; the loader's errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from mllm_mer.backbone import load_backbone, token_modality
from mllm_mer.backbone.tiny import TinySpec, ensure_tiny_thinker
from mllm_mer.data.schema import Modality


def test_tiny_twin_loads_frozen_through_loader(tiny_dir):
    bb = load_backbone(tiny_dir)
    assert type(bb.model) is Qwen2_5OmniThinkerForConditionalGeneration
    assert type(bb.processor).__name__ == "Qwen2_5OmniProcessor"
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert not bb.model.training
    tok = bb.processor.tokenizer
    assert bb.token_ids.audio == tok.convert_tokens_to_ids("<|AUDIO|>")
    assert bb.token_ids.video == tok.convert_tokens_to_ids("<|VIDEO|>")
    assert bb.token_ids.vision_bos == bb.model.config.vision_start_token_id


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


def test_audio_tower_is_not_deaf(backbone):
    """Different inputs give clearly different audio-tower outputs (the conv re-init works)."""
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


def test_token_modality_codes(backbone):
    ids = backbone.token_ids
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
