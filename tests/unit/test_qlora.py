"""QLoRA: `model.quantization=nf4` loads the language model in 4 bits (towers and lm_head not) and trains."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mllm_mer.backbone import load_backbone
from mllm_mer.backbone.tiny import TinySpec, ensure_tiny_thinker
from mllm_mer.config import ConfigError, load_config
from mllm_mer.data.dataset import MerDataset, build_media_dataset, decode_options
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.loading import build_collator
from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.model import build_mer_model
from mllm_mer.trainable import apply_trainable
from mllm_mer.training.loop import build_optimizer

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed ([qlora])"
)


@pytest.fixture(scope="module")
def wide_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny twin with 4 KV heads: every language-model linear is >= 64 wide (bitsandbytes' 4-bit
    minimum; the default twin's k/v projections are 32 wide). The towers stay unquantized (any width)."""
    return ensure_tiny_thinker(tmp_path_factory.mktemp("models") / "tiny-wide", TinySpec(text_kv_heads=4))


def test_nf4_needs_a_frozen_language_model(tiny_dir):
    with pytest.raises(ConfigError, match="model.freeze.language_model=true"):
        load_config(
            None,
            [
                f"model.path={tiny_dir}",
                "data.train=x",
                "model.quantization=nf4",
                "model.freeze.language_model=false",
            ],
        )


def test_nf4_loads_quantized_language_model_and_trains_a_step(wide_tiny_dir, syn_dir, tmp_path):
    import bitsandbytes as bnb

    cfg = load_config(
        None,
        [
            f"model.path={wide_tiny_dir}",
            "data.train=x",
            "data.prompt=explain",
            "model.quantization=nf4",
            "train.gradient_checkpointing=true",
            f"data.cache_dir={tmp_path / 'decoded'}",
        ],
    )
    try:
        backbone = load_backbone(wide_tiny_dir, quantization="nf4")
    except (RuntimeError, NotImplementedError) as exc:  # a bitsandbytes build without CPU 4-bit kernels
        pytest.skip(f"bitsandbytes 4-bit does not run on this machine: {exc}")
    thinker = backbone.model
    lm_linears = [
        m
        for n, m in thinker.named_modules()
        if ".language_model.layers." in n and isinstance(m, torch.nn.Linear)
    ]
    assert lm_linears and all(isinstance(m, bnb.nn.Linear4bit) for m in lm_linears)
    for tower in (thinker.model.audio_tower, thinker.model.visual):
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in tower.modules())
    assert not isinstance(thinker.lm_head, bnb.nn.Linear4bit)

    model = build_mer_model(backbone, cfg)
    apply_trainable(model, cfg)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:2]
    options = decode_options(cfg, backbone.processor)
    data = MerDataset(samples, build_media_dataset(samples, options, cfg.data.cache_dir), options)
    batch = build_collator(cfg, backbone, train=True)([data[0], data[1]])
    optimizer, _ = build_optimizer(model, cfg, total_steps=10)
    model.train()
    torch.manual_seed(0)
    losses = []
    for _ in range(2):
        out = model(batch)
        out.loss.backward()
        lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
        assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]
