"""DCR settings (`dcr.*` in the run YAML): unimodal paths, affective fusion distillation (AFD), arbiter (ADA).

"To Fuse or to Drop? Dual-Path Learning for Resolving Modality Conflicts in MER" (2026) is public as an
abstract only: Path I (AFD) distils audio/visual teachers into a textual student with temporally weighted
class evidence; Path II (ADA) is a contextual bandit that picks the fused prediction or a unimodal one per
sample. Every formula and default behind these fields is therefore our choice; the README section "DCR"
and the docstrings of `mllm_mer.fusion.dcr.afd` / `.ada` / `.paths` state them.

Torch-free: `mllm_mer.config` imports this module, and importing the config must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mllm_mer.checks import range_problems

PATHS: tuple[str, ...] = ("text", "audio", "video")
"""The unimodal paths, in order."""


@dataclass(frozen=True)
class ArbiterConfig:
    """The ADA arbiter: a disjoint LinUCB policy over arms {fused, text, audio, video}, fit after training by
    `scripts/fit_arbiter.py` on held-out predictions (never the training set)."""

    ridge: float = 1.0
    """lambda: every arm starts from A_a = lambda * I (ridge prior of its linear reward model)."""
    alpha: float = 0.5
    """Exploration bonus of LinUCB while fitting: p_a = theta_a . x + alpha * sqrt(x^T A_a^-1 x)."""
    calibration: Literal["brier", "nll"] = "brier"
    """Calibration term of the reward: "brier" = sum_c (p_c - y_c)^2 / 2 (in [0, 1]); "nll" =
    -log p_y / log C, clipped at 1e-6 (about 1 for a uniform prediction)."""
    calibration_weight: float = 0.5
    """lambda_cal in the reward r = 1[argmax p = y] - lambda_cal * calibration(p, y)."""
    feedback: Literal["bandit", "full"] = "full"
    """"full" (our default): every arm is updated with its own reward, one pass (full-information ridge
    regression per arm: the fitting set is labelled, so every arm's reward is known); "bandit": each fitting
    sample updates only the arm LinUCB chose (the contextual-bandit protocol, `epochs` passes)."""
    epochs: int = 3
    """Passes over the fitting predictions with feedback "bandit" (a fresh seeded order each pass); "full"
    makes one pass (more passes would only scale the data against the ridge)."""
    seed: int = 0
    """Seed of the pass order and of the cross-fitting folds (the fit is deterministic given predictions,
    labels and this)."""
    state: Literal["probs", "rich", "reliable"] = "reliable"
    """The arbiter's state (our choice; the default "reliable" is what dev chose over "rich" for both arbiter
    rows on both sets of the conflict ablation; it needs `dcr.reliability`). "probs": every path's
    probabilities, normalized entropy, top-1/top-2 margin, the pairwise JS divergences and a bias; "rich"
    adds every path's max probability (with the entropy, the audio/video teachers' per-modality confidence)
    and every pair's agreement (audio vs video, each vs fused, ...) as sum_c p_a,c p_b,c: 1[argmax p_a =
    argmax p_b] for one-hot paths, smooth on near-ties; "reliable" adds to "rich" each unimodal path's predicted reliability (`dcr.reliability`) and
    its product with the audio/video disagreement 1 - sum_c p_audio,c p_video,c."""
    folds: int = 5
    """Cross-fitting (our choice): when the arbiter is scored on the set it is fitted on
    (`scripts/fit_arbiter.py` on DATA), the samples are split into `folds` seeded folds and each fold is
    scored by an arbiter fitted on the other folds only, so no sample is scored by an arbiter that saw it.
    The saved arbiter is fitted on all of DATA (for use on other data)."""
    fuse_margin: float = 0.0
    """Preference for fusion (our choice): a unimodal arm is picked only when its expected reward beats the
    fused arm's by more than this margin (0 = plain greedy). Dropping a modality on a clip where the paths
    agree can only lose; a margin keeps fusion on near-ties."""
    reward: Literal["answer", "head"] = "answer"
    """What an arm's correctness term is judged on (our choice). "answer": the answer the model generates from
    that arm's modalities (what the arbiter decides with `answer="arm"`; `scripts/fit_arbiter.py` generates
    each arm's answer on the fitting data, three more prediction passes); "head": the arm's head argmax.
    The calibration term always reads the arm's head probabilities."""
    answer: Literal["arm", "fused"] = "arm"
    """What the generated answer sees once an arbiter is fitted (our choice). "arm": a clip the arbiter routes
    to a unimodal arm is answered again from that modality alone (the other modalities' tokens absent from
    the prompt; text = the subtitle only), so the model's *answer* drops to one modality as ADA decides;
    "fused": the answer always sees every modality and the arbiter only fills `arbiter_label`."""


@dataclass(frozen=True)
class DCRConfig:
    """Dual-path conflict resolution: unimodal paths with their own LoRA adapters and heads, AFD, ADA."""

    enabled: bool = False
    """Add the text-, audio- and video-only paths (own peft LoRA adapter `dcr_<path>` and head
    `fusion_<path>` each) beside the fused path, with AFD; their probabilities join `cls_logits`."""
    schedule: Literal["joint", "staged"] = "joint"
    """"joint": every DCR loss and the student feed are on from step 0; "staged": the unimodal paths and
    the fused path train from step 0, while AFD and the student feed into the fused head switch on at
    optimizer step `stage1_steps` (once the audio/video teachers have learned something)."""
    stage1_steps: int = 50
    """Schedule "staged": the optimizer step (`batch["train_step"]`, set by the training loop) at which AFD
    and the student feed start; batches without a step (evaluation, inference) count as stage 2."""
    path_loss_weight: float = 1.0
    """Weight of each unimodal path's cross-entropy (`aux_losses["dcr_text" | "dcr_audio" | "dcr_video"]`)."""
    afd_weight: float = 0.5
    """Weight of the AFD distillation loss (`aux_losses["dcr_afd"]`) in the total loss."""
    afd_temperature: float = 2.0
    """tau: teacher and student distributions are softened by tau; the KL is scaled by tau^2."""
    afd_agreement_power: float = 1.0
    """gamma: a sample's AFD term is weighted by floor + (1 - floor) * g^gamma with the teachers' agreement
    g = 1 - JS(p_audio, p_video) / ln 2; gamma = 0: no gating."""
    afd_agreement_floor: float = 0.25
    """floor (our choice): the least weight of a sample's AFD term, so the student is still taught on
    conflict clips (teachers disagreeing, g near 0); 0 = the plain agreement gating."""
    afd_conflict_target: Literal["mix", "confident"] = "confident"
    """The teacher target when the teachers disagree (our choice). "mix": the teachers' confidence-weighted
    mixture p_mix whatever their agreement; "confident": g * p_mix + (1 - g) * p_conf, p_conf the tempered
    distribution of the teacher with the larger evidential confidence c_m, so on a conflict clip the student
    learns the teacher that is surer of itself (learned from the data: nothing says which modality that is)."""
    feed_student: bool = True
    """Add g * log_softmax(text logits) (detached; g a learned scalar, 0 at start) to the fused logits."""
    reliability: bool = True
    """Fit a reliability head per path after training (our choice; `mllm_mer.fusion.dcr.reliability`): a
    ridge regression, fitted in closed form on the training split in one extra forward pass, that predicts
    from the path's detached hidden states the probability the path's head gives the true class; the arbiter's
    state "reliable" reads it. false = no reliability heads (runs trained before they existed load with false)."""
    arbiter: ArbiterConfig = field(default_factory=ArbiterConfig)

    def problems(self) -> list[str]:
        """Every problem with these values, one line each (empty = valid)."""
        return range_problems("dcr", self, {
            "stage1_steps": (0, None), "path_loss_weight": (0, None), "afd_weight": (0, None),
            "afd_temperature": (0.05, None), "afd_agreement_power": (0, None),
            "afd_agreement_floor": (0, 1),
        }) + range_problems("dcr.arbiter", self.arbiter, {
            "ridge": (1e-6, None), "alpha": (0, None), "calibration_weight": (0, None), "epochs": (1, None),
            "folds": (2, None), "fuse_margin": (0, None),
        }) + ([] if not self.enabled or self.reliability or self.arbiter.state != "reliable" else [
            "dcr.arbiter.state=reliable (the default) reads the reliability heads, but dcr.reliability=false: "
            "set dcr.arbiter.state=rich, or dcr.reliability=true"
        ]) + ([] if self.arbiter.reward == "head" or self.arbiter.answer == "arm" else [
            "dcr.arbiter.reward=answer judges each arm by the answer from its modalities, but "
            "dcr.arbiter.answer=fused never answers from one modality: set dcr.arbiter.reward=head"])

    @property
    def fits_reliability(self) -> bool:
        """Whether a run with these settings has reliability heads to read (DCR on and `reliability` on)."""
        return self.enabled and self.reliability

    @property
    def loss_weights(self) -> dict[str, float]:
        """Weights of the DCR entries of `MerOutput.aux_losses` in the total loss."""
        return {**{f"dcr_{p}": self.path_loss_weight for p in PATHS}, "dcr_afd": self.afd_weight}
