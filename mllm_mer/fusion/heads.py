"""Pooling of hidden states per modality and the fused classification head.

Pooling reads only prompt positions (never the answer, which contains the label during training). In a
causal LM the last prompt position has attended to every input token; the per-modality means keep each
modality's own tokens visible to the head. A modality absent from a sample pools to zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from mllm_mer.data.schema import Modality

POOLED_SLOTS = ("text", "audio", "video", "last")
"""Order of the pooled vectors: mean over text / audio / video tokens, then the last prompt token."""


def pool_by_modality(hidden: torch.Tensor, token_modality: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of hidden states per modality, plus the last prompt token's state.

    Args:
        hidden: (B, T, D) hidden states.
        token_modality: (B, T) long, values in `Modality`.
        prompt_mask: (B, T) bool, True on (non-padding) prompt tokens.
    Returns:
        (B, 4, D) in the order of `POOLED_SLOTS`, dtype of `hidden`.
    """
    B, T, D = hidden.shape
    out = []
    for m in (Modality.TEXT, Modality.AUDIO, Modality.VIDEO):
        w = ((token_modality == int(m)) & prompt_mask).to(hidden.dtype)  # (B, T)
        denom = w.sum(dim=1, keepdim=True).clamp_min(1.0)
        out.append(torch.einsum("bt,btd->bd", w, hidden) / denom)
    positions = torch.arange(T, device=hidden.device).expand(B, T)
    last = torch.where(prompt_mask, positions, torch.full_like(positions, -1)).amax(dim=1)  # (B,)
    out.append(hidden[torch.arange(B, device=hidden.device), last.clamp_min(0)])
    return torch.stack(out, dim=1)


class FusedHead(nn.Module):
    """LayerNorm + linear classifier over the concatenated pooled slots.

    Args:
        hidden_size: D of the backbone.
        num_classes: C.
        n_slots: number of pooled vectors concatenated (4 by default).
    """

    def __init__(self, hidden_size: int, num_classes: int, n_slots: int = len(POOLED_SLOTS)) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(n_slots * hidden_size)
        self.proj = nn.Linear(n_slots * hidden_size, num_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, S, D) pooled -> (B, C) logits (float32)."""
        x = pooled.flatten(1).float()
        return self.proj(self.norm(x))
