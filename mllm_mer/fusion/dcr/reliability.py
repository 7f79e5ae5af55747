"""Closed-form fit of the DCR reliability heads after training (`dcr.reliability`; ours).

Each unimodal path's `ReliabilityHead` predicts p_path(y), the probability the path's own head gives the true
class, from f = [mean of the path's last hidden states over its modality tokens; the hidden state at the last
prompt position] (`ReliabilityHead.features`). After the gradient steps, one no-grad pass over the training
loader collects f and the (in-sample) target p_path(y) of every labelled sample that has the path's modality,
and a ridge regression on the standardized features is solved exactly, its penalty chosen among
`RIDGE_ALPHAS` by exact leave-one-out error (the ridge hat-matrix identity, as scikit-learn's `RidgeCV`).

Why closed form: the heads first trained by gradient steps alongside the paths (an MSE loss on p_path(y));
on the conflict testbed they stayed at the mean target (r ~ 0.82 on every clip type), although a ridge fit
on the same features separates faint-voice from clear-voice clips almost perfectly: clips whose display
does not show the label are a small share of each batch, and a few hundred Adam steps do not find that
direction. A closed-form fit uses every training clip at once and costs one forward pass.

Under DDP / DeepSpeed every rank runs its shard; the features are gathered and every rank solves the same
(deterministic, float64) problem, so the heads stay identical across ranks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mllm_mer.fusion.dcr.config import PATHS
from mllm_mer.fusion.dcr.paths import PathsOutput, ReliabilityHead, reliability_name

log = logging.getLogger(__name__)

RIDGE_ALPHAS: tuple[float, ...] = tuple(10.0**k for k in range(-2, 6))
"""Ridge penalties tried on standardized features; the one with the least leave-one-out error is kept (ours)."""
MIN_SAMPLES = 4
"""Fewest usable samples a path needs for a fit; with fewer its head stays unfitted (r = 0.5, not used)."""


@dataclass(frozen=True)
class RidgeFit:
    """A ridge regression y ~ ((x - mean) / scale) . weight + bias.

    Attributes:
        mean, scale: (F,) float64 standardization of the features (scale 1 where a feature is constant).
        weight: (F,) float64; bias: the mean target.
        alpha: the chosen penalty; loo_mse: its mean squared leave-one-out error; samples: N.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: float
    alpha: float
    loo_mse: float
    samples: int


def ridge_loo(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge with an unpenalized intercept on already standardized features, and its leave-one-out residuals.

    With Xc = X - mean(X) = U S V^T (thin SVD) the fit is w = V diag(S / (S^2 + alpha)) U^T (y - mean(y)) and
    the hat matrix H = 11^T / N + U diag(S^2 / (S^2 + alpha)) U^T; the leave-one-out residual of sample i is
    exactly (y_i - yhat_i) / (1 - H_ii).

    Args:
        x: (N, F) float64; y: (N,) float64; alpha: > 0.
    Returns:
        (w (F,), loo residuals (N,)).
    """
    n = x.shape[0]
    xc, yc = x - x.mean(0), y - y.mean()
    u, s, vh = torch.linalg.svd(xc, full_matrices=False)
    shrink = s**2 / (s**2 + alpha)  # (K,)
    uty = u.T @ yc
    w = vh.T @ (s / (s**2 + alpha) * uty)
    residual = yc - u @ (shrink * uty)
    leverage = 1.0 / n + (u**2) @ shrink
    return w, residual / (1.0 - leverage).clamp_min(1e-9)


def fit_ridge(features: torch.Tensor, target: torch.Tensor, alphas: Sequence[float] = RIDGE_ALPHAS) -> RidgeFit:
    """Standardize `features` (N, F), then the ridge fit whose penalty in `alphas` has the least mean squared
    leave-one-out error on `target` (N,) (the first on ties)."""
    x, y = features.double(), target.double()
    mean = x.mean(0)
    scale = x.std(0, unbiased=False)
    scale = torch.where(scale > 1e-6 * scale.max().clamp_min(1e-30), scale, torch.ones_like(scale))
    z = (x - mean) / scale
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in alphas:
        w, loo = ridge_loo(z, y, float(alpha))
        mse = float((loo**2).mean())
        if best is None or mse < best[1]:
            best = (float(alpha), mse, w)
    assert best is not None, "alphas is empty"
    return RidgeFit(mean=mean, scale=scale, weight=best[2], bias=float(y.mean()), alpha=best[0],
                    loo_mse=best[1], samples=len(y))


def true_class_probability(logits: torch.Tensor, class_id: torch.Tensor) -> torch.Tensor:
    """p(y) per sample from (B, C) logits and (B,) class ids (negative ids give 0); returns (B,) float32."""
    p = torch.softmax(logits.detach().float(), dim=-1)
    return p.gather(1, class_id.clamp_min(0)[:, None]).squeeze(1) * (class_id >= 0)


@torch.no_grad()
def fit_reliability(model: nn.Module, mer: nn.Module, batches: Iterable[dict], accelerator) -> dict[str, dict]:
    """Fit every path's `ReliabilityHead` of `mer` on the batches (module docstring).

    Args:
        model: what to call on a batch (`mer`, or its DDP / DeepSpeed wrapper); switched to eval for the pass.
        mer: the MerModel that owns the heads.
        batches: the training loader (with DCR's unimodal sub-batches).
        accelerator: gathers each rank's features (`gather_for_metrics`).
    Returns:
        {path: {"samples", "alpha", "loo_rmse", "target_mean", "target_std"}}; a path with fewer than
        `MIN_SAMPLES` usable samples gets {"samples": n, "fitted": False} and keeps an unfitted head.
    """
    heads = {p: getattr(mer, reliability_name(p), None) for p in PATHS}
    if any(h is None for h in heads.values()):
        raise ValueError("fit_reliability needs the reliability heads (dcr.enabled=true, dcr.reliability=true)")
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in PATHS}
    targets: dict[str, list[torch.Tensor]] = {p: [] for p in PATHS}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            out = model(batch)
            paths = out.parts.get("dcr")
            if not isinstance(paths, PathsOutput):
                raise RuntimeError("the model returned no DCR paths: is dcr.enabled on?")
            class_id = batch["class_id"]
            for p in PATHS:
                keep = (paths.present[p] & (class_id >= 0)).float()
                tcp = true_class_probability(paths.logits[p], class_id)
                f, t, k = accelerator.gather_for_metrics((paths.reliability_features[p], tcp, keep))
                usable = k > 0
                feats[p].append(f[usable].cpu())
                targets[p].append(t[usable].cpu())
    finally:
        model.train(was_training)
    summary: dict[str, dict] = {}
    for p, head in heads.items():
        assert isinstance(head, ReliabilityHead)
        x = torch.cat(feats[p]) if feats[p] else torch.zeros(0, head.mean.numel())
        y = torch.cat(targets[p]) if targets[p] else torch.zeros(0)
        if len(y) < MIN_SAMPLES:
            log.warning("dcr reliability: the %s path has %d usable training samples; its head stays unfitted",
                        p, len(y))
            summary[p] = {"samples": len(y), "fitted": False}
            continue
        fit = fit_ridge(x, y)
        head.load_fit(fit.mean, fit.scale, fit.weight, fit.bias)
        summary[p] = {"samples": fit.samples, "fitted": True, "alpha": fit.alpha, "loo_rmse": math.sqrt(fit.loo_mse),
                      "target_mean": float(y.double().mean()), "target_std": float(y.double().std(unbiased=False))}
    return summary
