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
`build_tiny_thinker` / `ensure_tiny_thinker` write either (`scripts/build_tiny.py --arch ...`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperFeatureExtractor,
)

from mllm_mer.backbone.families import QWEN2_5_OMNI, BackboneFamily, chat_template, family_named
from mllm_mer.data.schema import MER2023_LABELS

SPECIAL_TOKENS: tuple[str, ...] = QWEN2_5_OMNI.special_tokens
"""The 14 special tokens of the Qwen2.5-Omni tokenizer that the tiny twin carries."""

CHAT_TEMPLATE: str = chat_template(QWEN2_5_OMNI)
"""Qwen-style chat template: video / audio / image / text content items, as the real processor expects."""

_CORPUS: tuple[str, ...] = (
    "You are an expert in multimodal emotion recognition. Watch the video, listen to the voice and read "
    "the subtitle.",
    "Describe the facial, vocal and textual clues, then give the emotion.",
    "Answer with one word from: neutral, angry, happy, sad, worried, surprise. Emotion:",
    "List the emotions you perceive, separated by commas.",
    "The face shows raised mouth corners and wide eyes. The mouth is open and the brows are raised.",
    "The brows are lowered and drawn together, the mouth is a tight frown, the eyes are narrow.",
    "The voice is high and fast, loud and bright. The voice is low and slow, quiet and flat.",
    "The tone rises sharply. The pitch falls. The speech is trembling and hesitant.",
    "The subtitle says something ordinary. The subtitle says nothing about feelings.",
    "Overall the emotion is neutral. Overall the emotion is angry. Overall the emotion is happy.",
    "Overall the emotion is sad. Overall the emotion is worried. Overall the emotion is surprise.",
    "I can't believe you did that! This is wonderful news, I am so glad. I miss her so much.",
    "What if something goes wrong? Oh! I did not expect that at all. We will meet at noon.",
    "but subdued, genuine, masked, weak, strong, conflict, consistent, video, audio, text.",
    " ".join(MER2023_LABELS),
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny thinker (defaults are the ones measured in ENVIRONMENT.md)."""

    seed: int = 0
    vocab_size: int = 1024
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    audio_layers: int = 2
    audio_d_model: int = 32
    audio_heads: int = 2
    audio_conv_std: float = 0.2
    video_min_pixels: int = 56 * 56
    video_max_pixels: int = 56 * 56
    audio_chunk_seconds: int = 30
    explain_corpus: bool = False
    """Also train the BPE on the synthetic explanations' phrases (`mllm_mer.data.synthetic.explanation_corpus`):
    an explanation then takes ~75 instead of ~140 tokens. The stage-0 testbed backbone uses it."""


_ADDED_FIELDS = {"explain_corpus": False}
"""TinySpec fields added after markers were first written: a marker without one had the default."""


def build_tiny_tokenizer(spec: TinySpec, family: BackboneFamily = QWEN2_5_OMNI) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a small emotion corpus and add the family's special tokens.

    The tokenizer names its media tokens (`image_token`, `audio_token`, `vision_bos_token`, ...) as the
    family's processor reads them, and carries the family's chat template.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    n_special = len(family.special_tokens)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - n_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(_CORPUS)
    if spec.explain_corpus:
        from mllm_mer.data.synthetic import explanation_corpus

        corpus += explanation_corpus()
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    tok.add_special_tokens(list(family.special_tokens))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        extra_special_tokens={f"{role}_token": token for role, token in family.tokens.items()},
        chat_template=chat_template(family),
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
    from mllm_mer.backbone.tiny_qwen3 import TinyQwen3Spec

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
        from mllm_mer.backbone.tiny_qwen3 import build_tiny_qwen3

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
        stored = {**_ADDED_FIELDS, **json.loads(marker.read_text())}
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
