"""Build a tiny, random, fully offline Qwen2.5-Omni (or Qwen3-Omni) thinker checkpoint.

The result is an ordinary checkpoint directory (config, safetensors weights, tokenizer, processor, all
written with `save_pretrained`) that `mllm_mer.backbone.load_backbone` loads through the very same code
path as a real Qwen2.5-Omni-7B. The architecture is the real one (`Qwen2_5OmniThinkerForConditionalGeneration`
with its audio encoder, vision encoder with patch merging, and M-RoPE text model), only scaled down:

    text: hidden 64, 2 layers, 4 heads / 2 KV heads, head_dim 16, mrope_section [2, 3, 3]
    vision: depth 2, hidden 32, patch 14, 2x2 merge, temporal patch 2
    audio: 2 layers, d_model 32, 128 mel bins

Two choices are ours:
- the tokenizer is a byte-level BPE trained on a small emotion corpus (label words, phrase banks, the
  prompt templates) plus the 14 special tokens the real processor reads;
- the audio tower's two input convolutions are re-initialised with std `audio_conv_std` (0.2): at default
  init their output (rms ~0.008) is swamped by the fixed positional signal (rms ~0.7), so every clip
  would look alike (a "deaf" tower). The vision tower needs no such fix.

The Qwen3-Omni twin (`TinyQwen3Spec`, `arch="qwen3_omni"`) is described in `mllm_mer.backbone.tiny_qwen3`;
`build_tiny_thinker` / `ensure_tiny_thinker` write either (`scripts/build_tiny.py --arch ...`). The sizes
(`TinySpec`) and the tokenizer both twins share live in `mllm_mer.backbone.tiny_spec`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperFeatureExtractor,
)

from mllm_mer.backbone.families import QWEN2_5_OMNI, family_named
from mllm_mer.backbone.tiny_qwen3 import TinyQwen3Spec, build_tiny_qwen3
from mllm_mer.backbone.tiny_spec import (
    ADDED_SPEC_FIELDS,
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TinySpec,
    build_tiny_tokenizer,
)


def build_tiny_processor(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5OmniProcessor:
    """The real Qwen2.5-Omni processor around the tiny tokenizer (small frames, real patch logic)."""
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=spec.video_min_pixels, max_pixels=spec.video_max_pixels),
        video_processor=Qwen2VLVideoProcessor(
            min_pixels=spec.video_min_pixels,
            max_pixels=spec.video_max_pixels,
            size={"shortest_edge": spec.video_min_pixels, "longest_edge": spec.video_max_pixels},
        ),
        feature_extractor=WhisperFeatureExtractor(feature_size=128, chunk_length=spec.audio_chunk_seconds),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_config(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5OmniThinkerConfig:
    """A `Qwen2_5OmniThinkerConfig` with tiny towers and the tokenizer's special-token ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = spec.text_hidden // spec.text_heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # sums to head_dim / 2, e.g. [2, 3, 3]
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope},
        "tie_word_embeddings": False,
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    vision_config = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_hidden * 2,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.text_hidden,
        "fullatt_block_indexes": [spec.vision_depth - 1],
    }
    audio_config = {
        "encoder_layers": spec.audio_layers,
        "d_model": spec.audio_d_model,
        "encoder_attention_heads": spec.audio_heads,
        "encoder_ffn_dim": spec.audio_d_model * 2,
        "output_dim": spec.text_hidden,
        "num_mel_bins": 128,
    }
    return Qwen2_5OmniThinkerConfig(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config,
        audio_token_index=ids["<|AUDIO|>"],
        image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"],
        user_token_id=tokenizer.convert_tokens_to_ids("user") or 0,
        # read by get_rope_index but not declared fields of the config class
        vision_start_token_id=ids["<|vision_bos|>"],
        vision_end_token_id=ids["<|vision_eos|>"],
    )


def tiny_spec(arch: str = QWEN2_5_OMNI.name) -> TinySpec:
    """The default spec of the tiny twin of family `arch` ("qwen2_5_omni" or "qwen3_omni").

    Raises:
        ValueError: unknown `arch`.
    """
    if family_named(arch).name == QWEN2_5_OMNI.name:
        return TinySpec()
    return TinyQwen3Spec()


def _build_qwen2_5(spec: TinySpec) -> tuple[Qwen2_5OmniThinkerForConditionalGeneration, Qwen2_5OmniProcessor]:
    """The random tiny Qwen2.5-Omni thinker and its processor (deterministic for `spec.seed`)."""
    tokenizer = build_tiny_tokenizer(spec)
    processor = build_tiny_processor(spec, tokenizer)
    config = build_tiny_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
        tower = model.model.audio_tower
        for conv in (tower.conv1, tower.conv2):
            torch.nn.init.normal_(conv.weight, std=spec.audio_conv_std)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model, processor


def build_tiny_thinker(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a tiny random thinker checkpoint to `out_dir` (atomically) and return it.

    The family follows the spec: a `TinySpec` gives the Qwen2.5-Omni twin, a
    `mllm_mer.backbone.tiny_qwen3.TinyQwen3Spec` the Qwen3-Omni twin. The directory holds `config.json`,
    `model.safetensors`, tokenizer files, processor configs and `mllm_mer_tiny.json` (the spec).
    Deterministic for `spec.seed`.
    """
    spec = spec or TinySpec()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if getattr(spec, "arch", QWEN2_5_OMNI.name) == QWEN2_5_OMNI.name:
        model, processor = _build_qwen2_5(spec)
    else:
        model, processor = build_tiny_qwen3(spec)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is a normal shared directory
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "mllm_mer_tiny.json").write_text(json.dumps(asdict(spec), indent=2))
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} appeared while building the tiny thinker; remove it and retry")
    os.replace(tmp, out_dir)
    return out_dir


def ensure_tiny_thinker(out_dir: str | Path, spec: TinySpec | None = None, arch: str | None = None) -> Path:
    """Return `out_dir`, building the tiny thinker there first unless a matching one exists.

    Args:
        out_dir: where the twin lives.
        spec: its sizes; None = the default spec of `arch`.
        arch: "qwen2_5_omni" (default) or "qwen3_omni"; must agree with `spec` when both are given.
    Raises:
        ValueError: `out_dir` exists but is not a tiny thinker of this spec (it is never overwritten), or
            `arch` and `spec` disagree.
    """
    if spec is None:
        spec = tiny_spec(arch or QWEN2_5_OMNI.name)
    elif arch is not None and getattr(spec, "arch", QWEN2_5_OMNI.name) != family_named(arch).name:
        raise ValueError(f"ensure_tiny_thinker: arch={arch!r} but the spec is a {type(spec).__name__}")
    out_dir = Path(out_dir)
    marker = out_dir / "mllm_mer_tiny.json"
    if marker.is_file():
        stored = {**ADDED_SPEC_FIELDS, **json.loads(marker.read_text())}
        if stored == json.loads(json.dumps(asdict(spec))):
            return out_dir
        raise ValueError(
            f"{out_dir} holds a tiny thinker built with another spec; delete the directory or choose another path"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not a tiny thinker built by mllm_mer; choose another path")
    if out_dir.exists():
        out_dir.rmdir()
    return build_tiny_thinker(out_dir, spec)


__all__ = [
    "CHAT_TEMPLATE", "SPECIAL_TOKENS", "TinyQwen3Spec", "TinySpec", "build_tiny_config", "build_tiny_processor",
    "build_tiny_thinker", "build_tiny_tokenizer", "ensure_tiny_thinker", "tiny_spec",
]
