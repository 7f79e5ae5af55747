"""Per-sample AR targets (`ar.target_mode: paths`): the clip's own unimodal paths say where attention should go.

Our formula (no paper gives one): from a first pass of the trained model, the audio-only and video-only
paths' class probabilities p_a, p_v (B, C) of each clip (DCR's unimodal paths) give

    c_m     = max_c p_m,c                                   each modality's confidence on its own
    tau_b   = c_a^k / (c_a^k + c_v^k), clipped to [0.02, 0.98]   target audio share (k = ar.sample_sharpness)
    alpha_b = ar.strength * JS(p_a, p_v) / ln 2              strength: 0 when the modalities agree

so a clip whose voice and face tell the same emotion keeps its attention, and one where they disagree has
its answer's attention moved toward the modality whose own path is surer. What "surer" means is learned by
the paths' heads from the training labels; nothing here knows how a data set was built.

With `ar.sample_confidence: reliability` (or `auto` with fitted heads), c_a and c_v are instead the paths'
fitted reliabilities r_a, r_v (DCR's reliability heads: the predicted probability each path's head gives the
true class), so a display that its path reads confidently but that the training labels showed to mislead (a
confidently wrong path) does not pull attention toward itself. The strength is the same JS term.
"""

from __future__ import annotations

import math

import torch

from mllm_mer.fusion.dcr.afd import js_divergence

TARGET_CLIP = 0.02
"""tau_b is kept in [TARGET_CLIP, 1 - TARGET_CLIP] (the AR formula needs 0 < tau < 1)."""


def sample_targets(
    p_audio: torch.Tensor,
    p_video: torch.Tensor,
    strength: float,
    sharpness: float = 1.0,
    confidence: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip target audio share and strength (module docstring).

    Args:
        p_audio: (B, C) class probabilities of the audio-only path.
        p_video: (B, C) class probabilities of the video-only path.
        strength: `ar.strength` in [0, 1], the most any clip gets.
        sharpness: k > 0.
        confidence: (c_a (B,), c_v (B,)) in [0, 1] replacing the max probabilities (the paths' fitted
            reliabilities); None = max probabilities.
    Returns:
        (tau (B,), alpha (B,)) float32.
    """
    pa, pv = p_audio.float(), p_video.float()
    if confidence is None:
        ca, cv = pa.amax(-1), pv.amax(-1)
    else:
        ca, cv = (c.float().reshape(-1).clamp(0.0, 1.0) for c in confidence)
        if ca.shape[0] != pa.shape[0] or cv.shape[0] != pv.shape[0]:
            raise ValueError(f"confidence needs one value per clip ({pa.shape[0]}), got {ca.shape[0]} / {cv.shape[0]}")
    ca, cv = ca.pow(sharpness), cv.pow(sharpness)
    tau = (ca / (ca + cv).clamp_min(1e-12)).clamp(TARGET_CLIP, 1.0 - TARGET_CLIP)
    alpha = strength * (js_divergence(pa, pv) / math.log(2.0)).clamp(0.0, 1.0)
    return tau, alpha
