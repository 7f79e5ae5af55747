"""MerModel on both backbone families: what trains, LoRA / MoSE / DCR adapter placement, pooling, fwd/bwd."""

from __future__ import annotations

import pytest
import torch

from mllm_mer.backbone import load_backbone
from mllm_mer.config import load_config
from mllm_mer.data.collate import MerCollator
from mllm_mer.data.dataset import DecodeOptions, MerDataset, build_media_dataset
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.fusion.heads import pool_by_modality
from mllm_mer.model import build_mer_model
from mllm_mer.prompts import load_prompt
from mllm_mer.trainable import apply_trainable, part_of


def cfg_for(tiny_backbone_dir, *overrides):
    return load_config(None, [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl", *overrides])


@pytest.fixture()
def fresh(tiny_backbone_dir):
    return load_backbone(tiny_backbone_dir)


def test_only_lora_and_heads_train_by_default(tiny_backbone_dir, fresh):
    cfg = cfg_for(tiny_backbone_dir)
    model = build_mer_model(fresh, cfg)
    counts = apply_trainable(model, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or n.startswith("fusion_") for n in trainable)
    assert counts["lora"][0] == counts["lora"][1] > 0 and counts["heads"][0] > 0
    for part in ("language_model", "audio_tower", "audio_projector", "vision_tower", "vision_projector"):
        assert counts[part][0] == 0 and counts[part][1] > 0
    # LoRA sits on the language model's attention projections only, never on the towers
    lora_modules = {n.rsplit(".lora_", 1)[0] for n in trainable if ".lora_" in n}
    assert lora_modules and all(".language_model.layers." in n and ".self_attn." in n for n in lora_modules)
    assert len(lora_modules) == 2 * 4  # 2 layers x q/k/v/o


def test_freeze_switches_unfreeze_exactly_their_part(tiny_backbone_dir, fresh):
    cfg = cfg_for(tiny_backbone_dir, "model.freeze.audio_projector=false", "model.freeze.vision_tower=false")
    model = build_mer_model(fresh, cfg)
    apply_trainable(model, cfg)
    parts = {part_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert parts == {"lora", "heads", "audio_projector", "vision_tower"}
    assert any("audio_tower.proj" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not any("visual.merger" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["lora", "mose", "dcr"])
def test_no_adapter_weight_outside_the_language_model(tiny_backbone_dir, fresh, method):
    """LoRA, MoSE and the DCR path adapters sit on the language model only, for both families.

    On Qwen3-Omni's MoE language model peft turns the regex into leaf names (q_proj, ...) that the audio
    tower shares; `apply_lora` passes the family's `exclude_modules`.
    """
    overrides = {"lora": [], "mose": ["adapter=mose"], "dcr": ["dcr.enabled=true"]}[method]
    model = build_mer_model(fresh, cfg_for(tiny_backbone_dir, *overrides))
    marks = (".lora_", ".mose_")
    adapted = {n for n, _ in model.named_parameters() if any(m in n for m in marks)}
    assert adapted
    lm = f".{fresh.family.language_model}.layers."
    assert all(lm in n and ".self_attn." in n for n in adapted), sorted(n for n in adapted if lm not in n)[:3]
    assert {part_of(n) for n in adapted} == {"mose" if method == "mose" else "lora"}
    if method == "dcr":  # one adapter per unimodal path beside "default", all on the same 2 x 4 modules
        names = {n.split(".lora_A.", 1)[1].rsplit(".", 1)[0] for n in adapted if ".lora_A." in n}
        assert names == {"default", "dcr_text", "dcr_audio", "dcr_video"}
    modules = {n.split(".lora_", 1)[0].split(".mose_", 1)[0] for n in adapted}
    assert len(modules) == 2 * 4  # 2 layers x q/k/v/o


def test_lora_target_outside_language_model_is_refused(tiny_backbone_dir, fresh):
    cfg = cfg_for(tiny_backbone_dir, r"lora.target_modules=.*self_attn\.(q_proj|v_proj)")
    with pytest.raises(ValueError, match="outside the language model"):
        build_mer_model(fresh, cfg)


def test_pool_by_modality_hand_computed():
    hidden = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    tm = torch.tensor([[0, 1, 1, 2, 0], [0, 2, 2, 0, 0]])
    pm = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pooled = pool_by_modality(hidden, tm, pm)
    assert pooled.shape == (2, 4, 2)
    torch.testing.assert_close(pooled[0, 0], hidden[0, 0])  # text: only position 0 (4 is masked)
    torch.testing.assert_close(pooled[0, 1], hidden[0, 1:3].mean(0))
    torch.testing.assert_close(pooled[0, 3], hidden[0, 3])  # last prompt token
    torch.testing.assert_close(pooled[1, 1], torch.zeros(2))  # no audio -> zeros
    torch.testing.assert_close(pooled[1, 0], hidden[1, [0, 3, 4]].mean(0))


def test_forward_backward_reaches_only_trainables(tiny_backbone_dir, fresh, syn_dir, tmp_path):
    cfg = cfg_for(tiny_backbone_dir)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:2]
    opts = DecodeOptions(fps=4.0, max_frames=32, sample_rate=16000, max_audio_seconds=30)
    mds = MerDataset(samples, build_media_dataset(samples, opts, tmp_path / "c"), opts)
    col = MerCollator(fresh.processor, fresh.token_ids, load_prompt("explain"),
                      load_prompt("system", kind="free").text, MER2023_LABELS)
    model = build_mer_model(fresh, cfg)
    apply_trainable(model, cfg)
    out = model(col([mds[0], mds[1]]))
    assert out.cls_logits["fused"].shape == (2, 6)
    assert out.lm_loss is not None and out.cls_loss is not None
    torch.testing.assert_close(out.loss, out.lm_loss + out.cls_loss)
    out.loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
