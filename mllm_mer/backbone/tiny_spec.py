"""The tiny twins' shared pieces: their sizes (`TinySpec`) and their tokenizer (a byte-level BPE trained on a
small emotion corpus, plus the family's special tokens).

Both builders use them (`mllm_mer.backbone.tiny` for Qwen2.5-Omni, `mllm_mer.backbone.tiny_qwen3` for
Qwen3-Omni), so they live apart from either.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mllm_mer.backbone.families import QWEN2_5_OMNI, BackboneFamily, chat_template
from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.data.synthetic import explanation_corpus

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


ADDED_SPEC_FIELDS = {"explain_corpus": False}
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


