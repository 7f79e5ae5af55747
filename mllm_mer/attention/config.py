"""Attention-reallocation settings (`ar.*` in the run YAML); the formula is in `mllm_mer.attention.realloc`.

Torch-free: `mllm_mer.config` imports this module, and importing the config must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ARConfig:
    """Attention reallocation (AR) at inference: training-free, no parameters; the formula is ours.

    At the chosen language-model layers, heads and query positions, the share of attention mass on audio
    keys within the audio + video mass is moved a fraction `strength` of the way toward
    `target_audio_share` (see `mllm_mer.attention.realloc` for the exact formula). Honoured by
    `generation.generate_rows` / `predict_rows` (hence `scripts/generate.py` and evaluation code);
    training ignores it. AR has no weights and adds no loss.
    """

    enabled: bool = False
    """Apply AR in `generate_rows` / `predict_rows`."""
    strength: float = 0.5
    """alpha in [0, 1]: fraction of the gap to the target share closed per layer, head and query row."""
    target_audio_share: float = 0.5
    """tau in (0, 1): target audio fraction of the audio + video attention mass (video's is 1 - tau)."""
    layers: tuple[int, ...] | None = None
    """Language-model layer indices (negative counts from the end); None = the middle half, L//4 .. 3L//4-1."""
    heads: tuple[int, ...] | None = None
    """Query-head indices to act on; None = every head."""
    query: Literal["generated", "all"] = "generated"
    """Query rows acted on: "generated" = the last prompt position and every generated position (the rows
    that predict a token); "all" = every query position, prompt included."""
    mode: Literal["probs", "scores"] = "probs"
    """Where AR acts: "probs" = rescale the probabilities after softmax (text mass kept); "scores" = add a
    log-odds bias to the under-attended modality's scores before softmax (text mass shrinks as it grows)."""
    min_mass: float = 1e-6
    """A row is left unchanged unless both its audio and its video mass exceed this (e.g. a clip without audio)."""
    target_mode: Literal["fixed", "paths"] = "fixed"
    """Where the target and strength come from (our choice). "fixed": `target_audio_share` and `strength` for
    every clip. "paths" (per sample; needs `dcr.enabled`): a first pass runs the trained model's unimodal
    audio and video paths on the clip; with p_a, p_v their class probabilities and c_a, c_v their max
    probabilities, the clip's target is tau_b = c_a^k / (c_a^k + c_v^k) (k = `sample_sharpness`, clipped to
    [0.02, 0.98]) and its strength alpha_b = strength * JS(p_a, p_v) / ln 2: a clip whose modalities agree
    is left alone, one whose modalities disagree has its attention moved toward the modality whose own path
    is surer (`mllm_mer.attention.sample`)."""
    sample_sharpness: float = 1.0
    """k in the per-sample target tau_b = c_a^k / (c_a^k + c_v^k) (`target_mode: paths`); larger = closer to
    all-or-nothing."""
    sample_confidence: Literal["auto", "max_prob", "reliability"] = "auto"
    """What c_a, c_v are in the per-sample target (`target_mode: paths`; our choice). "max_prob": each path's
    max class probability (how sure the path is of itself). "reliability": each path's fitted reliability r_m,
    the probability its head gives the true class as predicted from its hidden states (`dcr.reliability`), so
    a confidently wrong display (learned from the training labels) does not pull attention toward itself.
    Needs a run trained with `dcr.reliability=true`. "auto" (default): "reliability" when the run's audio and
    video reliability heads are fitted, "max_prob" otherwise (a fresh model, or `dcr.reliability=false`); the
    conflict ablation's dev search chose "reliability" on every testbed. The strength stays
    strength * JS(p_a, p_v) / ln 2."""

    def problems(self, num_layers: int | None = None, num_heads: int | None = None) -> list[str]:
        """Every problem with these values, one line each (empty = valid).

        Args:
            num_layers: the language model's layer count, to check `layers` (None = skip that check).
            num_heads: its attention-head count, to check `heads` (None = skip that check).
        """
        errors = []
        if not 0.0 <= self.strength <= 1.0:
            errors.append(f"ar.strength={self.strength!r} is out of range [0, 1]")
        if not 0.0 < self.target_audio_share < 1.0:
            errors.append(
                f"ar.target_audio_share={self.target_audio_share!r} must lie strictly between 0 and 1"
            )
        if not 0.0 <= self.min_mass < 0.5:
            errors.append(f"ar.min_mass={self.min_mass!r} is out of range [0, 0.5)")
        if not 0.0 < self.sample_sharpness <= 100.0:
            errors.append(f"ar.sample_sharpness={self.sample_sharpness!r} is out of range (0, 100]")
        for name, values, size in (("layers", self.layers, num_layers), ("heads", self.heads, num_heads)):
            if values is None:
                continue
            if not values:
                errors.append(f"ar.{name} is empty: list at least one index, or null for the default")
            if name == "layers":  # negative layer indices count from the end
                low = -size if size is not None else None
            else:
                low = 0
            bad = [v for v in values if (low is not None and v < low) or (size is not None and v >= size)]
            if bad:
                allowed = f"[{low}, {size})" if size is not None else ">= 0"
                errors.append(f"ar.{name}={list(values)} has indices {bad} outside {allowed}")
            if size is not None:
                resolved = [v % size for v in values]
                if len(set(resolved)) != len(resolved):
                    errors.append(f"ar.{name}={list(values)} names the same index twice")
        return errors

    @property
    def loss_weights(self) -> dict[str, float]:
        """AR is training-free: no loss."""
        return {}
