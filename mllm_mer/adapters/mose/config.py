"""MoSE settings (`mose.*` in the run YAML): modality-specific LoRA experts with a regularized gate.

MoSEAR (ACM MM 2025) describes the method in words only (shared LoRA A, per-modality groups of expert B
matrices, a gate that selects the expert per modality, dynamic modality weights, a regularized gate); no
code or formulas are public. Every value and formula behind these fields is therefore our choice; the
README section "MoSE" and `mllm_mer.adapters.mose.layer` / `.model` state them.

Torch-free: `mllm_mer.config` imports this module, and importing the config must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mllm_mer.adapters.lora.config import LM_TARGETS
from mllm_mer.checks import range_problems

ROUTINGS = ("soft", "top_k", "top1_st")


@dataclass(frozen=True)
class MoSEConfig:
    """Modality-specific LoRA experts on the language model (`adapter: mose`)."""

    r: int = 8
    """Rank of the shared A matrix and of every expert B matrix."""
    alpha: float = 16.0
    """The adapter delta is scaled by alpha / r (as LoRA)."""
    dropout: float = 0.05
    """Dropout on the adapter input (before A); the gate reads the input without dropout."""
    experts: int = 4
    """E: expert B matrices per modality group (text, audio, video each get E)."""
    routing: Literal["soft", "top_k", "top1_st"] = "top1_st"
    """How gate probabilities weight a token's E experts. "soft": all experts, weighted by the softmax;
    "top_k": the `top_k` most probable experts keep their softmax probability, the rest get 0 (Switch-style,
    no renormalisation); "top1_st": the most probable expert gets weight exactly 1 in the forward pass and
    the gradient is the softmax's (straight-through)."""
    top_k: int = 2
    """Experts kept per token with routing "top_k" (1 <= top_k <= experts); unused otherwise."""
    gate_init_scale: float = 0.1
    """Gate weights start N(0, gate_init_scale^2 / D_in), so initial gate logits have a std of about
    gate_init_scale * rms(x): near-uniform, but different per token (breaks the symmetry of zero B's)."""
    modality_weights: Literal["learned", "fixed"] = "learned"
    """Per layer and modality, a scale w_m on the expert delta. "learned": w_m = 2 * sigmoid(s_m), s_m
    trainable from 0 (w_m = 1 at start); "fixed": w_m = 1, no parameter."""
    sample_gate: bool = True
    """Per-sample audio-vs-video gate (our choice), per layer: (w_a, w_v) = 2 * softmax(U [mean_a(x), mean_v(x)]),
    the means of the layer input over the sample's audio and video tokens, U (2, 2 * D_in) trainable from 0
    (w_a = w_v = 1 at start). Audio tokens' expert delta is scaled by w_a, video tokens' by w_v (on top of
    `modality_weights`), so each clip can weigh its audio adaptation against its video adaptation. Text
    tokens are not gated. False: no such parameter (the layer-wide w_m only)."""
    decision_balance_weight: float = 0.0
    """Weight of the decision-share regularizer (`aux_losses["mose_decision_balance"]`, our formula): with
    D_m = batch mean of |log p(answer | full prompt) - log p(answer | prompt without modality m)| (mean
    log-probability of the answer tokens, teacher-forced), the loss is ((D_a - D_v) / (D_a + D_v))^2: zero
    when removing the audio moves the answer as much as removing the video. Costs two more backbone passes
    per training step (the prompt rendered without audio, and without video), so it is off by default (our
    choice): a knob to choose on dev (e.g. 0.1); the training collator then adds the sub-batches."""
    load_balance_weight: float = 0.01
    """Weight of the within-group load-balance loss (`aux_losses["mose_load_balance"]`) in the total loss."""
    modality_balance_weight: float = 0.1
    """Weight of the audio-vs-video balance loss (`aux_losses["mose_modality_balance"]`) in the total loss."""
    target_modules: str = LM_TARGETS
    """Regex (full match) over module names; every match must be an nn.Linear inside the language model."""

    def problems(self) -> list[str]:
        """Every problem with these values, one line each (empty = valid)."""
        errors = range_problems("mose", self, {
            "r": (1, None), "alpha": (0, None), "dropout": (0, 0.999), "experts": (1, None), "top_k": (1, None),
            "gate_init_scale": (0, None), "load_balance_weight": (0, None), "modality_balance_weight": (0, None),
            "decision_balance_weight": (0, None),
        })
        if self.routing == "top_k" and not 1 <= self.top_k <= self.experts:
            errors.append(
                f"mose.top_k={self.top_k} must lie in [1, mose.experts={self.experts}] with "
                f"mose.routing=top_k; lower mose.top_k or raise mose.experts"
            )
        return errors

    @property
    def loss_weights(self) -> dict[str, float]:
        """{aux loss name: weight in the total loss} of the MoSE regularizers."""
        weights = {"mose_load_balance": self.load_balance_weight, "mose_modality_balance": self.modality_balance_weight}
        if self.decision_balance_weight > 0:
            weights["mose_decision_balance"] = self.decision_balance_weight
        return weights

    @property
    def scaling(self) -> float:
        """alpha / r, the factor on every adapter delta."""
        return self.alpha / self.r
