"""Attention shares per modality: normalisation, parity with `output_attentions`, a hand-computed case,
and that the model is left exactly as it was."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mllm_mer.attention.stats import MODALITIES, attention_shares, plot_shares, query_mask_for
from mllm_mer.backbone import load_backbone
from mllm_mer.backbone.families import find_thinker
from mllm_mer.config import load_config
from mllm_mer.data.collate import MerCollator
from mllm_mer.data.dataset import DecodeOptions, MerDataset, build_media_dataset
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.model import build_mer_model
from mllm_mer.prompts import load_prompt

MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "input_features",
    "feature_attention_mask",
    "pixel_values_videos",
    "video_grid_thw",
    "video_second_per_grid",
)


@pytest.fixture(scope="module")
def batches(any_backbone, syn_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Inference batches (left padding) of 3 test clips: audio+video, audio only."""
    samples = read_jsonl(syn_dir / "test.jsonl", MER2023_LABELS)[:3]
    opts = DecodeOptions(fps=4.0, max_frames=32, sample_rate=16000, max_audio_seconds=30)
    mds = MerDataset(samples, build_media_dataset(samples, opts, tmp_path_factory.mktemp("dec")), opts)
    col = MerCollator(
        any_backbone.processor,
        any_backbone.token_ids,
        load_prompt("label"),
        load_prompt("system", kind="free").text,
        MER2023_LABELS,
        train=False,
    )
    items = [mds[i] for i in range(3)]
    out = {"av": col(items), "audio": dataclasses.replace(col, use_video=False)(items)}
    assert not out["av"]["attention_mask"].bool().all(), "the test wants a batch with padding"
    return out


def forward_logits(model, batch: dict) -> torch.Tensor:
    inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
    with torch.no_grad():
        return model(**inputs, use_audio_in_video=batch["use_audio_in_video"], use_cache=False).logits


def reference_shares(model, batch: dict, query_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, 3) from `output_attentions=True` under eager attention, by explicit loops."""
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
        with torch.no_grad():
            out = model(
                **inputs,
                use_audio_in_video=batch["use_audio_in_video"],
                use_cache=False,
                output_attentions=True,
            )
    finally:
        model.set_attn_implementation({"text_config": previous})
    valid = batch["attention_mask"].bool()
    modality = batch["token_modality"]
    B, L = valid.shape[0], len(out.attentions)
    ref = torch.zeros(B, L, 3)
    for b in range(B):
        queries = query_mask[b].nonzero().flatten().tolist()
        for layer, weights in enumerate(out.attentions):  # (B, H, T, T)
            for h in range(weights.shape[1]):
                for q in queries:
                    row = weights[b, h, q].double()
                    mass = torch.stack([row[valid[b] & (modality[b] == m)].sum() for m in range(3)])
                    ref[b, layer] += (mass / mass.sum()).float()
            ref[b, layer] /= weights.shape[1] * len(queries)
    return ref


@pytest.mark.parametrize("kind", ["av", "audio"])
def test_shares_sum_to_one_and_have_the_documented_shapes(any_backbone, batches, kind):
    batch = batches[kind]
    out = attention_shares(any_backbone.model, batch)
    B, L = batch["input_ids"].shape[0], any_backbone.model.config.text_config.num_hidden_layers
    assert out["per_sample"].shape == (B, L, 3) and out["shares"].shape == (L, 3)
    assert out["modalities"] == MODALITIES == ("text", "audio", "video")
    torch.testing.assert_close(out["per_sample"].sum(-1), torch.ones(B, L))
    torch.testing.assert_close(out["shares"], out["per_sample"].mean(0))
    assert (out["per_sample"][..., 1] > 0).all()  # audio tokens are in every prompt
    if kind == "audio":
        assert (out["per_sample"][..., 2] == 0).all()  # no video tokens, no video share


def test_last_query_is_the_last_prompt_position(batches):
    batch = batches["av"]  # left padded: the last prompt position is the last position
    mask = query_mask_for(batch, "last")
    assert mask.sum(1).tolist() == [1, 1, 1] and mask[:, -1].all()
    right = {
        **batch,
        "attention_mask": torch.ones_like(batch["attention_mask"]),
        "prompt_mask": torch.zeros_like(batch["prompt_mask"]),
    }
    right["prompt_mask"][:, :5] = True  # e.g. a training batch whose answer starts at position 5
    assert query_mask_for(right, "last").nonzero()[:, 1].tolist() == [4, 4, 4]


@pytest.mark.parametrize("query", ["last", "all_prompt"])
def test_matches_a_manual_reduction_of_output_attentions(any_backbone, batches, query):
    batch = batches["av"]
    q = "last" if query == "last" else batch["prompt_mask"].clone()
    out = attention_shares(any_backbone.model, batch, query=q)
    # padding queries are dropped from a given mask
    qmask = query_mask_for(batch, q)
    assert query == "last" or qmask.sum() == batch["attention_mask"].sum()
    torch.testing.assert_close(out["per_sample"], reference_shares(any_backbone.model, batch, qmask))


def test_uniform_attention_gives_the_token_fractions(tiny_backbone_dir, batches):
    """Hand-made case: with q_proj = k_proj = 0 every score is 0, so a query attends uniformly to all
    non-padding keys up to itself; the last position's share is then each modality's token fraction."""
    model = load_backbone(tiny_backbone_dir).model
    for attn in (layer.self_attn for layer in model.model.language_model.layers):
        for proj in (attn.q_proj, attn.k_proj):
            torch.nn.init.zeros_(proj.weight)
            if proj.bias is not None:  # Qwen2.5-Omni has q/k biases, Qwen3-Omni none
                torch.nn.init.zeros_(proj.bias)
    batch = batches["av"]
    out = attention_shares(model, batch)
    valid = batch["attention_mask"].bool()
    counts = torch.stack([(valid & (batch["token_modality"] == m)).sum(1) for m in range(3)], dim=1)
    expected = (counts / counts.sum(1, keepdim=True)).float()  # (B, 3)
    L = out["per_sample"].shape[1]
    torch.testing.assert_close(out["per_sample"], expected[:, None, :].expand(-1, L, -1))


def test_model_is_unchanged_after_the_call(any_backbone, batches):
    model = any_backbone.model
    batch = batches["av"]
    impl_before = model.config.text_config._attn_implementation
    hooks_before = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    logits_before = forward_logits(model, batch)
    attention_shares(model, batch)
    assert model.config.text_config._attn_implementation == impl_before == "sdpa"
    assert {n: len(m._forward_hooks) for n, m in model.named_modules()} == hooks_before
    assert torch.equal(forward_logits(model, batch), logits_before)


def test_restores_the_implementation_when_the_forward_fails(any_backbone, batches):
    hooks_before = {n: len(m._forward_hooks) for n, m in any_backbone.model.named_modules()}
    modality = batches["av"]["token_modality"]
    batch = {**batches["av"], "token_modality": torch.cat([modality, modality[:, :1]], dim=1)}  # T + 1 keys
    with pytest.raises(RuntimeError):  # raised inside the first layer's hook, mid-forward
        attention_shares(any_backbone.model, batch)
    assert any_backbone.model.config.text_config._attn_implementation == "sdpa"
    assert {n: len(m._forward_hooks) for n, m in any_backbone.model.named_modules()} == hooks_before


def test_mer_model_with_fresh_lora_matches_the_bare_thinker(tiny_backbone_dir, any_backbone, batches):
    """A MerModel runs its own forward; a fresh LoRA (B = 0) leaves the shares unchanged."""
    fresh = load_backbone(tiny_backbone_dir)
    cfg = load_config(None, [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl", "data.prompt=label"])
    mer = build_mer_model(fresh, cfg).eval()
    batch = batches["av"]
    torch.testing.assert_close(
        attention_shares(mer, batch)["per_sample"], attention_shares(any_backbone.model, batch)["per_sample"]
    )
    assert find_thinker(mer).config.text_config._attn_implementation == "sdpa"


def test_bad_queries_are_refused(batches):
    batch = batches["av"]
    with pytest.raises(ValueError, match="query='first' unknown"):
        query_mask_for(batch, "first")
    with pytest.raises(ValueError, match="shape"):
        query_mask_for(batch, torch.ones(1, 2, dtype=torch.bool))
    only_padding = ~batch["attention_mask"].bool()
    with pytest.raises(ValueError, match="no \\(non-padding\\) query"):
        query_mask_for(batch, only_padding)


def test_plot_shares_writes_a_png(tmp_path):
    shares = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    path = plot_shares({"before": shares, "after": shares.flip(-1)}, tmp_path / "sub" / "shares.png")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="at least one"):
        plot_shares({}, tmp_path / "x.png")


def test_shares_under_attention_reallocation(any_backbone, batches):
    """Entered inside `weights_returning_attention`, AR wraps eager and the shares see its reallocation:
    with strength 1 every targeted row's audio share of the audio + video mass is the target."""
    from mllm_mer.attention.config import ARConfig
    from mllm_mer.attention.realloc import attention_reallocation
    from mllm_mer.attention.stats import weights_returning_attention

    batch = batches["av"]
    cfg = ARConfig(enabled=True, strength=1.0, target_audio_share=0.3, layers=(0, 1))
    with weights_returning_attention(any_backbone.model):
        with attention_reallocation(any_backbone.model, batch["token_modality"], cfg):
            shares = attention_shares(any_backbone.model, batch)["per_sample"]  # (B, L, 3)
    torch.testing.assert_close(shares[..., 1] / shares[..., 1:].sum(-1), torch.full(shares.shape[:2], 0.3))
    assert any_backbone.model.config.text_config._attn_implementation == "sdpa"
    # AR on sdpa: attention_shares swaps in its eager twin for the call, then restores AR on sdpa
    with attention_reallocation(any_backbone.model, batch["token_modality"], cfg):
        again = attention_shares(any_backbone.model, batch)["per_sample"]
        assert any_backbone.model.config.text_config._attn_implementation == "mllm_mer_ar_sdpa"
    torch.testing.assert_close(again, shares)
