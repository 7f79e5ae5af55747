"""Per-token modality codes (`token_modality`), computed in one place from the special-token ids.

Only the placeholder tokens that the processor expands into encoder features count as audio or video:
the audio token -> AUDIO; the video and image tokens -> VIDEO (`<|AUDIO|> <|VIDEO|> <|IMAGE|>` in
Qwen2.5-Omni, `<|audio_pad|> <|video_pad|> <|image_pad|>` in Qwen3-Omni; see `mllm_mer.backbone.families`).
The bos/eos markers around them, the chat scaffolding, the subtitle and padding are TEXT (padding is
excluded by the attention mask anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mllm_mer.backbone.families import TOKEN_ROLES, family_of
from mllm_mer.data.schema import Modality


@dataclass(frozen=True)
class SpecialTokenIds:
    """Token ids the package needs from a Qwen-Omni tokenizer/config (fields named by role, any family)."""

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
        """Read the ids from a thinker config (and the tokenizer for pad/eos), for any supported family.

        Each media / marker id comes from the config attribute the family table names (e.g.
        `audio_token_index` on Qwen2.5-Omni, `audio_token_id` on Qwen3-Omni; transformers 5.23), or, when
        the checkpoint's config lacks it, from the tokenizer by the family's token name.

        Raises:
            ValueError: the config is not a supported family's, or a token is neither in the config nor
                in the tokenizer's vocabulary.
        """
        family = family_of(config)
        ids: dict[str, int] = {}
        for role in TOKEN_ROLES:
            value = getattr(config, family.config_ids[role], None)
            if value is None:
                value = tokenizer.convert_tokens_to_ids(family.tokens[role])
                if value is None or value == tokenizer.unk_token_id:
                    raise ValueError(
                        f"{family.display}: the config has no {family.config_ids[role]} and the tokenizer "
                        f"has no {family.tokens[role]!r} token"
                    )
            ids[role] = int(value)
        pad = tokenizer.pad_token_id
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        return cls(**ids, pad=pad if pad is not None else eos, eos=eos)


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
