"""Per-token modality codes (`token_modality`), computed in one place from the special-token ids.

Only the placeholder tokens that the processor expands into encoder features count as audio or video:
`<|AUDIO|>` -> AUDIO; `<|VIDEO|>` and `<|IMAGE|>` -> VIDEO. The bos/eos markers around them, the chat
scaffolding, the subtitle and padding are TEXT (padding is excluded by the attention mask anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mllm_mer.data.schema import Modality


@dataclass(frozen=True)
class SpecialTokenIds:
    """Token ids the package needs from a Qwen-Omni tokenizer/config."""

    audio: int
    video: int
    image: int
    audio_bos: int
    audio_eos: int
    vision_bos: int
    vision_eos: int
    pad: int
    eos: int

    @classmethod
    def from_model_config(cls, config, tokenizer) -> SpecialTokenIds:
        """Read the ids from a thinker config (and the tokenizer for pad/eos).

        The attribute names are those of `Qwen2_5OmniThinkerConfig` in transformers 5.23 (pinned).
        """
        pad = tokenizer.pad_token_id
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        return cls(
            audio=config.audio_token_index,
            video=config.video_token_index,
            image=config.image_token_index,
            audio_bos=config.audio_start_token_id,
            audio_eos=config.audio_end_token_id,
            vision_bos=config.vision_start_token_id,
            vision_eos=config.vision_end_token_id,
            pad=pad if pad is not None else eos,
            eos=eos,
        )


def token_modality(input_ids: torch.Tensor, ids: SpecialTokenIds) -> torch.Tensor:
    """Modality code of every token.

    Args:
        input_ids: (B, T) long.
        ids: the backbone's special-token ids.
    Returns:
        (B, T) long with values in `Modality` (0 text, 1 audio, 2 video).
    """
    out = torch.full_like(input_ids, int(Modality.TEXT))
    out[input_ids == ids.audio] = int(Modality.AUDIO)
    out[(input_ids == ids.video) | (input_ids == ids.image)] = int(Modality.VIDEO)
    return out
