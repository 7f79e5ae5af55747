"""The tiny, random, fully offline Qwen3-Omni thinker: the second backbone family's twin.

Written by `mllm_mer.backbone.tiny.build_tiny_thinker` when the spec is a `TinyQwen3Spec` (or
`ensure_tiny_thinker(..., arch="qwen3_omni")`, or `scripts/build_tiny.py --arch qwen3_omni`); loaded by
`load_backbone` through the same code path as a real Qwen3-Omni-30B-A3B thinker. The architecture is the
real one (`Qwen3OmniMoeThinkerForConditionalGeneration`: audio encoder with 2-D conv downsampling, vision
encoder with deepstack mergers, MoE language model with M-RoPE), scaled down:

    text: hidden 64, 2 layers, 4 heads / 2 KV heads, head_dim 16, mrope_section [4, 2, 2] (interleaved),
          MoE: 4 experts, 2 per token, expert width 32
    vision: depth 2, hidden 32, patch 16, 2x2 merge, temporal patch 2, deepstack from block 0 (its features
          are added to the language model's hidden states after layer 0)
    audio: 2 layers, d_model 32, 128 mel bins, downsampling convs of width 16

Tokenizer and corpus are the Qwen2.5 twin's (`mllm_mer.backbone.tiny_spec`), with Qwen3-Omni's special tokens
(`<|audio_start|> <|audio_end|> <|audio_pad|> <|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|>`).
Our choices beyond the scaling: video frames are resized to 64x64 (the nearest multiple of 32 = patch x
merge to the 56x56 synthetic clips; 4 video tokens per temporal patch, like the Qwen2.5 twin);
`position_id_per_seconds` is 13, the processor's default, so the processor's audio/video interleaving and
the model's position ids agree; the audio tower's three input convolutions are re-initialised with std
`audio_conv_std` (0.2) and the linear layer after them (`conv_out`) with `audio_conv_out_std` (0.1): at
default init (0.02) the convolutions' output (rms ~0.1 after `conv_out`) is swamped by the fixed
sinusoidal positions (rms ~0.7) and two different tones differ by ~9% at the tower's output; re-initialised,
by 30-70% over seeds 0-4 (the Qwen2.5 twin's "deaf tower" fix, for Qwen3's 2-D conv downsampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3OmniMoeProcessor,
    Qwen3OmniMoeThinkerConfig,
    Qwen3OmniMoeThinkerForConditionalGeneration,
    WhisperFeatureExtractor,
)

from mllm_mer.backbone.families import QWEN3_OMNI, chat_template
from mllm_mer.backbone.tiny_spec import TinySpec, build_tiny_tokenizer

POSITION_ID_PER_SECONDS = 13
"""Temporal position ids per second: Qwen3OmniMoeProcessor's default, so the processor's interleaving
of audio and video tokens matches the model's position ids."""


@dataclass(frozen=True)
class TinyQwen3Spec(TinySpec):
    """Sizes of the tiny Qwen3-Omni thinker (the shared fields mean what they mean in `TinySpec`)."""

    arch: str = "qwen3_omni"
    """Family of the twin (written to the marker file; a Qwen2.5 twin's marker has no `arch`)."""
    text_experts: int = 4
    text_experts_per_token: int = 2
    text_expert_intermediate: int = 32
    vision_patch: int = QWEN3_OMNI.vision_patch
    vision_deepstack: tuple[int, ...] = (0,)
    """Vision blocks whose features are injected into the language model (one per early LM layer)."""
    vision_position_grid: int = 8
    """Side of the vision tower's learned position grid (interpolated to each frame's patch grid)."""
    audio_downsample: int = 16
    audio_conv_out_std: float = 0.1
    """Init std of the linear layer after the audio convolutions (see the module docstring)."""
    video_min_pixels: int = 64 * 64
    video_max_pixels: int = 64 * 64


def build_tiny_qwen3_processor(
    spec: TinyQwen3Spec, tokenizer: PreTrainedTokenizerFast
) -> Qwen3OmniMoeProcessor:
    """The real Qwen3-Omni processor around the tiny tokenizer (small frames, patch 16, real patch logic)."""
    pixels = {"min_pixels": spec.video_min_pixels, "max_pixels": spec.video_max_pixels}
    size = {"shortest_edge": spec.video_min_pixels, "longest_edge": spec.video_max_pixels}
    return Qwen3OmniMoeProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=spec.vision_patch, **pixels),
        video_processor=Qwen2VLVideoProcessor(patch_size=spec.vision_patch, size=size, **pixels),
        feature_extractor=WhisperFeatureExtractor(feature_size=128, chunk_length=spec.audio_chunk_seconds),
        tokenizer=tokenizer,
        chat_template=chat_template(QWEN3_OMNI),
    )


def build_tiny_qwen3_config(
    spec: TinyQwen3Spec, tokenizer: PreTrainedTokenizerFast
) -> Qwen3OmniMoeThinkerConfig:
    """A `Qwen3OmniMoeThinkerConfig` with tiny towers, a tiny MoE and the tokenizer's special-token ids."""
    ids = {role: tokenizer.convert_tokens_to_ids(token) for role, token in QWEN3_OMNI.tokens.items()}
    half = spec.text_hidden // spec.text_heads // 2
    mrope = [half - 2 * (half // 4), half // 4, half // 4]  # sums to head_dim / 2, e.g. [4, 2, 2]
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "num_experts": spec.text_experts,
        "num_experts_per_tok": spec.text_experts_per_token,
        "moe_intermediate_size": spec.text_expert_intermediate,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope,
            "interleaved": True, "mrope_interleaved": True,
        },
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }
    vision_config = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_hidden * 2,
        "num_heads": spec.vision_heads,
        "patch_size": spec.vision_patch,
        "out_hidden_size": spec.text_hidden,
        "deepstack_visual_indexes": list(spec.vision_deepstack),
        "num_position_embeddings": spec.vision_position_grid**2,
    }
    audio_config = {
        "encoder_layers": spec.audio_layers,
        "d_model": spec.audio_d_model,
        "encoder_attention_heads": spec.audio_heads,
        "encoder_ffn_dim": spec.audio_d_model * 2,
        "output_dim": spec.text_hidden,
        "num_mel_bins": 128,
        "downsample_hidden_size": spec.audio_downsample,
    }
    return Qwen3OmniMoeThinkerConfig(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config,
        audio_token_id=ids["audio"],
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        audio_start_token_id=ids["audio_bos"],
        user_token_id=tokenizer.convert_tokens_to_ids("user") or 0,
        position_id_per_seconds=POSITION_ID_PER_SECONDS,
        tie_word_embeddings=False,
        # read by get_rope_index (vision_start) or by mllm_mer, but not declared fields of the config class
        audio_end_token_id=ids["audio_eos"],
        vision_start_token_id=ids["vision_bos"],
        vision_end_token_id=ids["vision_eos"],
    )


def build_tiny_qwen3(
    spec: TinyQwen3Spec,
) -> tuple[Qwen3OmniMoeThinkerForConditionalGeneration, Qwen3OmniMoeProcessor]:
    """The random tiny thinker and its processor (deterministic for `spec.seed`); nothing is written."""
    tokenizer = build_tiny_tokenizer(spec, QWEN3_OMNI)
    processor = build_tiny_qwen3_processor(spec, tokenizer)
    config = build_tiny_qwen3_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen3OmniMoeThinkerForConditionalGeneration(config)
        tower = model.model.audio_tower
        for conv in (tower.conv2d1, tower.conv2d2, tower.conv2d3):
            torch.nn.init.normal_(conv.weight, std=spec.audio_conv_std)
        torch.nn.init.normal_(tower.conv_out.weight, std=spec.audio_conv_out_std)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model, processor
