"""DnR settings (`dnr.*` in the run YAML); the method is in `mllm_mer.fusion.dnr.model`.

Torch-free: `mllm_mer.config` imports this module, and importing the config must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DIVIDE_PREFIX = "fusion_dnr.divide."
"""Parameter-name prefix (on MerModel) of the Divide heads and synergy probes (frozen in stage refine)."""
LOSS_NAMES: tuple[str, ...] = ("dnr_push", "dnr_pull", "dnr_synergy", "dnr_refine")
"""Keys DnR adds to `MerOutput.aux_losses` (unweighted; weights in `DnRConfig.loss_weights`)."""


@dataclass(frozen=True)
class DnRConfig:
    """Divide-and-Refine parts on the pooled hidden states (`dnr.*` in the run YAML).

    Defaults follow upstream where it has a value (part_dim, weights, margin, grl_alpha, sigmas,
    temperature); the pooling, the feature head (`head_input`), the phased schedule's switch point
    (`divide_fraction`) and the stage switch are ours.
    """

    enabled: bool = False
    """Build `fusion_dnr` on MerModel; its logits are added to the fused head's."""
    part_dim: int = 256
    """P: size of each unique / redundant / synergy vector (and of the recombined representation)."""
    layer: int = 0
    """Index into the backbone's `hidden_states` that is pooled (0 = the language model's input states,
    i.e. unimodal encoder outputs and text embeddings; -1 = the final normed state)."""
    text_tokens: Literal["after_media", "all"] = "after_media"
    """Text positions pooled: "after_media" = prompt text after the last audio/video token (instruction
    and subtitle; all prompt text when a sample has no media); "all" = every prompt text token."""
    stage: Literal["phased", "divide", "refine", "joint"] = "phased"
    """"phased" (the default): the seed's two phases in one run: Divide objectives only for the first
    `divide_fraction` of the optimizer steps, then Refine starting from the divided model (Divide objectives
    off, Refine on; the Divide heads keep only the classification loss's gradient); "divide": Divide
    objectives only; "refine": Refine objective only, Divide heads frozen (load them with `init_from`, e.g.
    from a "divide" run); "joint": Divide objectives throughout, Refine joins at `refine_start_step`."""
    refine_start_step: int = 0
    """Optimizer step at which Refine joins in stage "joint" (read from `batch["train_step"]`)."""
    divide_fraction: float = 0.5
    """Stage "phased" (our choice): the share of the run's optimizer steps (`batch["train_steps_total"]`, set
    by `scripts/finetune.py`) spent in Divide before Refine starts; without a known total a batch counts as
    Divide."""
    head_input: Literal["features", "logits"] = "features"
    """How the recombined representation z reaches the prediction (our choice). "features" (default): z is
    concatenated with the fused head's pooled states and fed to a small MLP head, LayerNorm(4D + P) -> Linear
    -> GELU -> Linear (last layer zero-initialised), whose logits join the fused logits: the decision can
    depend on z and the pooled states jointly, per sample. "logits": a zero-initialised linear classifier on
    z alone, added to the fused logits."""
    push_weight: float = 5.0
    """Weight of `dnr_push` (decorrelation of u, r, s within each modality)."""
    pull_weight: float = 0.5
    """Weight of `dnr_pull` (alignment of the redundant parts across modalities)."""
    synergy_weight: float = 0.5
    """Weight of `dnr_synergy` (joint probe on the s parts, margin over the unimodal probes)."""
    refine_weight: float = 0.1
    """Weight of `dnr_refine` (InfoNCE between masked / noised views)."""
    margin: float = 0.3
    """Required gap (nats) of the unimodal probes' mean cross-entropy over the joint probe's."""
    gap_cap: float = 3.0
    """The gap is clamped to [0, gap_cap] before the hinge (upstream's bound)."""
    grl_alpha: float = 0.5
    """Gradient-reversal factor between the s parts and the unimodal probes."""
    probe_dropout: float = 0.1
    """Dropout in the joint synergy probe."""
    noise_sigmas: tuple[float, ...] = (0.2, 0.1)
    """One Refine view per sigma: Gaussian noise of that std added to the redundant parts."""
    view_mask: Literal["keep_one", "drop_one"] = "keep_one"
    """Masked Refine views: "keep_one" keeps one modality's parts and zeroes the others (upstream's code);
    "drop_one" zeroes one modality's parts."""
    temperature: float = 0.7
    """InfoNCE temperature on cosine similarities."""
    init_from: str | None = None
    """A finished run directory whose `heads.safetensors` provides the Divide weights (`fusion_dnr.divide.*`)
    at the start of training, e.g. a stage "divide" run before a stage "refine" run."""

    def problems(self) -> list[str]:
        """Every problem with these values, one line each (empty = valid)."""
        errors = []
        if self.part_dim < 2:
            errors.append(f"dnr.part_dim={self.part_dim} must be >= 2 (unimodal probes use part_dim // 2)")
        for name in ("push_weight", "pull_weight", "synergy_weight", "refine_weight", "margin", "grl_alpha"):
            if getattr(self, name) < 0:
                errors.append(f"dnr.{name}={getattr(self, name)!r} must be >= 0")
        if self.gap_cap <= 0:
            errors.append(f"dnr.gap_cap={self.gap_cap!r} must be > 0")
        if not 0 <= self.probe_dropout < 1:
            errors.append(f"dnr.probe_dropout={self.probe_dropout!r} is out of range [0, 1)")
        if self.temperature <= 0:
            errors.append(f"dnr.temperature={self.temperature!r} must be > 0")
        if not self.noise_sigmas or any(s < 0 for s in self.noise_sigmas):
            errors.append(f"dnr.noise_sigmas={list(self.noise_sigmas)} must list at least one sigma >= 0")
        if self.refine_start_step < 0:
            errors.append(f"dnr.refine_start_step={self.refine_start_step} must be >= 0")
        if not 0 < self.divide_fraction < 1:
            errors.append(f"dnr.divide_fraction={self.divide_fraction!r} is out of range (0, 1)")
        if self.refine_start_step and self.stage != "joint":
            errors.append(
                f"dnr.refine_start_step={self.refine_start_step} is only used with dnr.stage=joint "
                f"(got {self.stage!r}); remove it or set dnr.stage=joint"
            )
        return errors

    @property
    def loss_weights(self) -> dict[str, float]:
        """{aux loss name: weight in the total loss} for `LOSS_NAMES`."""
        return dict(zip(LOSS_NAMES, (self.push_weight, self.pull_weight, self.synergy_weight,
                                     self.refine_weight), strict=True))

    def frozen_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes this config freezes (read by `mllm_mer.trainable`)."""
        return (DIVIDE_PREFIX,) if self.enabled and self.stage == "refine" else ()

    def in_refine_phase(self, train_step: int | None, total_steps: int | None) -> bool:
        """Stage "phased": whether step `train_step` of `total_steps` lies after the Divide phase (unknown
        step or total: Divide)."""
        if train_step is None or not total_steps:
            return False
        return train_step >= round(self.divide_fraction * total_steps)

    def divide_active(self, train_step: int | None = None, total_steps: int | None = None) -> bool:
        """Whether the Divide objectives run at optimizer step `train_step` of `total_steps`."""
        if self.stage == "phased":
            return not self.in_refine_phase(train_step, total_steps)
        return self.stage in ("divide", "joint")

    def refine_active(self, train_step: int | None, total_steps: int | None = None) -> bool:
        """Whether Refine runs at optimizer step `train_step` (None = unknown: counts as step 0)."""
        if self.stage == "refine":
            return True
        if self.stage == "phased":
            return self.in_refine_phase(train_step, total_steps)
        return self.stage == "joint" and (train_step or 0) >= self.refine_start_step
