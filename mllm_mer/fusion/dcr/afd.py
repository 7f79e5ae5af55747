"""Affective fusion distillation (AFD, DCR Path I): audio/visual teachers -> textual student.

Reverse distillation with temporally weighted class evidence. The paper ("To Fuse or to Drop?", 2026) is
public as an abstract only; the formulas below are ours.

Per teacher m in {audio, video} and per token t of that modality (its "time steps"), the teacher head's
token logits z_t (B, T, C) give evidential (Dirichlet) class evidence

    e_t = softplus(z_t) >= 0,   S_t = sum_c e_t,c + C,   confidence w_t = sum_c e_t,c / S_t in [0, 1)

(w_t = 1 - u_t, with u_t = C / S_t the Dirichlet uncertainty mass). Steps are weighted by their confidence,
a_t = w_t / sum_t' w_t', and aggregated into the teacher's Dirichlet parameters

    alpha_m = 1 + sum_t a_t e_t   (B, C),   c_m = sum_t a_t w_t   (its sample confidence).

The teacher distribution at temperature tau is p_m = softmax(log(alpha_m) / tau) (tau = 1 gives the Dirichlet
mean alpha_m / sum alpha_m); the teachers present in a sample are mixed by confidence,
p_T = sum_m c_m p_m / sum_m c_m. Teacher agreement g = 1 - JS(mean_a, mean_v) / ln 2 in [0, 1] is computed on
the Dirichlet means (tau = 1); g = 1 when only one teacher is present. The loss is

    L_AFD = tau^2 * sum_b w_b KL(p_T,b || softmax(s_b / tau)) / #{b with a teacher},
    w_b = floor + (1 - floor) * g_b^gamma

for student logits s (the text path). The floor (`dcr.afd_agreement_floor`) keeps the student taught on
conflict clips, where g is near 0. With `conflict_target="confident"` the target is
p_T = g * p_mix + (1 - g) * p_conf, p_mix the confidence-weighted mixture above and p_conf the tempered
distribution of the present teacher with the larger confidence c_m: agreeing teachers teach their mixture,
disagreeing ones the surer teacher (which one that is comes from the teachers' own evidence, per sample). Teachers are detached by the caller: distillation moves the student
only. L_AFD is exactly zero when the student's tempered distribution equals the teachers'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_EPS = 1e-12


@dataclass
class TeacherEvidence:
    """One teacher's evidence aggregated over its time steps.

    Attributes:
        alpha: (B, C) float32 Dirichlet parameters, 1 + confidence-weighted evidence.
        confidence: (B,) float32 confidence-weighted mean step confidence c_m in [0, 1).
        present: (B,) bool, the sample has at least one token of this teacher's modality.
    """

    alpha: torch.Tensor
    confidence: torch.Tensor
    present: torch.Tensor


def token_evidence(token_logits: torch.Tensor) -> torch.Tensor:
    """Evidential class evidence per step: softplus of the logits.

    Args:
        token_logits: (B, T, C) any float dtype.
    Returns:
        (B, T, C) float32, >= 0.
    """
    return F.softplus(token_logits.float())


def aggregate_evidence(token_logits: torch.Tensor, token_mask: torch.Tensor) -> TeacherEvidence:
    """Confidence-weighted temporal aggregation of one teacher's per-step evidence (module docstring).

    Args:
        token_logits: (B, T, C) teacher logits per token.
        token_mask: (B, T) bool, True on this teacher's modality tokens (its time steps).
    Returns:
        The aggregated `TeacherEvidence`; samples without steps get alpha = 1 (uniform), confidence 0.
    """
    evidence = token_evidence(token_logits)  # (B, T, C)
    C = evidence.shape[-1]
    total = evidence.sum(-1)  # (B, T)
    step_conf = total / (total + C)  # (B, T), w_t = 1 - u_t
    w = step_conf * token_mask.float()
    weights = w / w.sum(1, keepdim=True).clamp_min(_EPS)  # (B, T), a_t
    alpha = 1.0 + torch.einsum("bt,btc->bc", weights, evidence)
    confidence = (weights * step_conf).sum(1)
    return TeacherEvidence(alpha=alpha, confidence=confidence, present=token_mask.any(1))


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in nats (0 .. ln 2) between rows of two distributions.

    Args:
        p: (..., C) probabilities.
        q: (..., C) probabilities.
    Returns:
        (...) float.
    """
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (a.clamp_min(_EPS).log() - b.clamp_min(_EPS).log())).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def teacher_distribution(
    teachers: list[TeacherEvidence], temperature: float, conflict_target: str = "mix"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix the teachers into one tempered target and measure their agreement.

    Args:
        teachers: one or two `TeacherEvidence` (audio, video) over the same batch.
        temperature: tau > 0.
        conflict_target: "mix" (the confidence-weighted mixture) or "confident" (module docstring).
    Returns:
        p_T: (B, C) float32 target distribution (uniform where no teacher is present).
        agreement: (B,) float32 g in [0, 1]; 1 unless two teachers are present.
        valid: (B,) bool, at least one teacher present.
    """
    tempered = [torch.softmax(t.alpha.log() / temperature, dim=-1) for t in teachers]  # each (B, C)
    mix = torch.stack([t.confidence * t.present.float() for t in teachers])  # (M, B)
    # a present teacher whose steps carry no evidence at all still counts (equal share)
    present = torch.stack([t.present.float() for t in teachers])  # (M, B)
    mix = torch.where(mix.sum(0, keepdim=True) > _EPS, mix, present)
    mix = mix / mix.sum(0, keepdim=True).clamp_min(_EPS)
    p_t = torch.einsum("mb,mbc->bc", mix, torch.stack(tempered))
    valid = present.sum(0) > 0
    C = p_t.shape[-1]
    p_t = torch.where(valid[:, None], p_t, torch.full_like(p_t, 1.0 / C))
    agreement = torch.ones_like(p_t[:, 0])
    if len(teachers) == 2:
        means = [t.alpha / t.alpha.sum(-1, keepdim=True) for t in teachers]
        both = teachers[0].present & teachers[1].present
        g = 1.0 - js_divergence(means[0], means[1]) / math.log(2.0)
        agreement = torch.where(both, g.clamp(0.0, 1.0), agreement)
    if conflict_target == "confident":
        conf = torch.stack([t.confidence * t.present.float() - (~t.present).float() for t in teachers])  # (M, B)
        surest = conf.argmax(0)  # (B,), the first teacher on ties
        p_conf = torch.stack(tempered)[surest, torch.arange(p_t.shape[0], device=p_t.device)]  # (B, C)
        p_conf = torch.where(valid[:, None], p_conf, p_t)
        p_t = agreement[:, None] * p_t + (1.0 - agreement[:, None]) * p_conf
    elif conflict_target != "mix":
        raise ValueError(f"unknown AFD conflict target {conflict_target!r}; valid: 'mix', 'confident'")
    return p_t, agreement, valid


def afd_loss(
    student_logits: torch.Tensor,
    teachers: list[TeacherEvidence],
    temperature: float = 2.0,
    agreement_power: float = 1.0,
    sample_mask: torch.Tensor | None = None,
    agreement_floor: float = 0.0,
    conflict_target: str = "mix",
) -> torch.Tensor:
    """Agreement-gated KL from the mixed teacher evidence to the student (module docstring).

    Args:
        student_logits: (B, C) student (text path) logits; the only input that should carry gradient.
        teachers: the aggregated teachers (detached by the caller).
        temperature: tau > 0.
        agreement_power: gamma >= 0 (0 turns the gating off).
        sample_mask: optional (B,) bool, samples allowed to contribute (e.g. labelled ones).
        agreement_floor: the least weight of a sample, in [0, 1] (0 = plain agreement gating).
        conflict_target: "mix" or "confident" (module docstring).
    Returns:
        Scalar float32 loss (0 when no sample has a teacher).
    """
    p_t, agreement, valid = teacher_distribution(teachers, temperature, conflict_target)
    if sample_mask is not None:
        valid = valid & sample_mask
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (p_t * (p_t.clamp_min(_EPS).log() - log_q)).sum(-1)  # (B,)
    weight = (agreement_floor + (1.0 - agreement_floor) * agreement.pow(agreement_power)) * valid.float()
    return temperature**2 * (weight * kl).sum() / valid.sum().clamp_min(1)
