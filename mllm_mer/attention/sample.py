"""Per-sample AR targets (`ar.target_mode: paths`): the clip's own unimodal paths say where attention should go.

Our formula (no paper gives one): from a first pass of the trained model, the audio-only and video-only
paths' class probabilities p_a, p_v (B, C) of each clip (DCR's unimodal paths) give

    c_m     = max_c p_m,c                                   each modality's confidence on its own
    tau_b   = c_a^k / (c_a^k + c_v^k), clipped to [0.02, 0.98]   target audio share (k = ar.sample_sharpness)
    alpha_b = ar.strength * JS(p_a, p_v) / ln 2              strength: 0 when the modalities agree

so a clip whose voice and face tell the same emotion keeps its attention, and one where they disagree has
its answer's attention moved toward the modality whose own path is surer. What "surer" means is learned by
the paths' heads from the training labels; nothing here knows how a data set was built.
"""

from __future__ import annotations

import math

import torch

from mllm_mer.fusion.dcr.afd import js_divergence

TARGET_CLIP = 0.02
"""tau_b is kept in [TARGET_CLIP, 1 - TARGET_CLIP] (the AR formula needs 0 < tau < 1)."""


def sample_targets(
    p_audio: torch.Tensor, p_video: torch.Tensor, strength: float, sharpness: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip target audio share and strength (module docstring).

    Args:
        p_audio: (B, C) class probabilities of the audio-only path.
        p_video: (B, C) class probabilities of the video-only path.
        strength: `ar.strength` in [0, 1], the most any clip gets.
        sharpness: k > 0.
    Returns:
        (tau (B,), alpha (B,)) float32.
    """
    pa, pv = p_audio.float(), p_video.float()
    ca, cv = pa.amax(-1).pow(sharpness), pv.amax(-1).pow(sharpness)
    tau = (ca / (ca + cv).clamp_min(1e-12)).clamp(TARGET_CLIP, 1.0 - TARGET_CLIP)
    alpha = strength * (js_divergence(pa, pv) / math.log(2.0)).clamp(0.0, 1.0)
    return tau, alpha
