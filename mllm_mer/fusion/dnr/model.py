"""DnR (Divide and Refine, WACV 2026) as a plug-in of the fused head: per-modality unique / redundant /
synergy parts of the backbone's pooled hidden states, their objectives, recombination and explanations.

Upstream (github mattam301/DnR-WACV2026) works on pre-extracted unimodal features of non-LLM MERC
backbones. Here the inputs are the backbone's own hidden states, pooled per modality (`pool_modalities`):

- **Divide**: per modality m a LayerNorm + linear head gives three `part_dim` vectors u_m, r_m, s_m
  (unique, redundant, synergy). Objectives (`divide_losses`): push = mean |Pearson correlation| (per
  feature, over the batch) of u-r, u-s, r-s within each modality; pull = 1 - mean |correlation| of the
  r parts of each modality pair; synergy = cross-entropy of a joint probe on [s_t, s_a, s_v] plus a
  hinge that wants the unimodal probes' cross-entropy to exceed the joint one by `margin` (`synergy_loss`).
  The unimodal probes read s_m through a gradient-reversal layer: they learn to predict the label from
  one s_m, the Divide heads learn to make a single s_m uninformative.
- **Refine**: views of the parts (one modality kept or dropped at a time; the r parts noised with each
  sigma of `noise_sigmas`) go through the recombination layer; a symmetric InfoNCE (`info_nce`) pulls
  the views of one sample together. The views are built from *detached* parts, so the Divide heads
  never receive a Refine gradient ("frozen" for Refine); with `stage: refine` they are frozen outright
  by `mllm_mer.trainable` (no `requires_grad`).
- **Recombination**: z = GELU(W [u, r, s per modality]). With `head_input: features` (default, ours) z is
  fed to the head as features: [LN-normalised pooled states of the fused head, z] -> Linear -> GELU ->
  Linear (the last layer starts at zero), so the decision depends on z and the pooled states jointly; with
  `head_input: logits` a zero-initialised linear classifier reads z alone. Either way the logits are
  *added* to the fused head's logits. DnR off builds nothing (the fused head's output is the untouched
  code path); DnR on leaves the fused logits bitwise unchanged at initialisation (base + 0). See `DnRHead`.
- **Schedule** (`stage: phased`, default): the seed's two phases in one run: Divide objectives for the
  first `divide_fraction` of the optimizer steps, then Refine starting from the divided model (the Divide
  objectives stop; the synergy probes stay in the graph with weight 0 so DDP sees every parameter).
- **Explanations**: `component_ablation` zeroes one part (u/r/s of one modality) at a time and reports
  the KL divergence KL(p_full || p_ablated) of the fused class distribution and the drop of the
  predicted class's probability, per sample.

Pooling choice (`layer`, `text_tokens`): in a causal LM, text after the media has attended to the audio
and video, and audio tokens (placed after the video) have attended to the video, so deeper layers mix
modalities before DnR can divide them. The default `layer: 0` pools the language model's *input*
states: the audio/vision encoders' projected outputs for audio/video tokens and the token embeddings
for text, i.e. genuinely unimodal vectors, as upstream's unimodal features. Text pools the prompt text
*after* the last media token (the instruction with the subtitle; the system prompt before the media is
identical for every sample). Deeper layers (`layer: -1` is the final normed state) are allowed and
documented as mixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mllm_mer.data.schema import Modality
from mllm_mer.fusion.dnr.config import DIVIDE_PREFIX, DnRConfig
from mllm_mer.logs import say

MODALITIES: tuple[Modality, ...] = (Modality.TEXT, Modality.AUDIO, Modality.VIDEO)
"""Order of the modality axis of every DnR tensor."""
PARTS: tuple[str, ...] = ("unique", "redundant", "synergy")
"""Order of the part axis of every DnR tensor."""
COMPONENTS: tuple[str, ...] = tuple(f"{m.key}.{p}" for m in MODALITIES for p in PARTS)
"""The nine ablatable components, "text.unique" ... "video.synergy", in (modality, part) order."""


# ------------------------------------------------------------------------------------------ pooling
def pool_modalities(
    hidden: torch.Tensor, token_modality: torch.Tensor, prompt_mask: torch.Tensor,
    text_tokens: str = "after_media",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean of prompt hidden states per modality, with the modality-presence mask.

    Args:
        hidden: (B, T, D) hidden states of one layer.
        token_modality: (B, T) long, values in `Modality`.
        prompt_mask: (B, T) bool, True on (non-padding) prompt tokens.
        text_tokens: "after_media" (text after the last audio/video prompt token; all text when there is
            none) or "all".
    Returns:
        pooled: (B, 3, D) float32 in `MODALITIES` order (zeros where a modality is absent).
        present: (B, 3) bool, True where the sample has at least one token of that modality.
    """
    B, T, _ = hidden.shape
    masks = [(token_modality == int(m)) & prompt_mask for m in MODALITIES]
    if text_tokens == "after_media":
        positions = torch.arange(T, device=hidden.device).expand(B, T)
        media = (token_modality != int(Modality.TEXT)) & prompt_mask
        last_media = torch.where(media, positions, torch.full_like(positions, -1)).amax(dim=1, keepdim=True)
        masks[0] = masks[0] & (positions > last_media)
    elif text_tokens != "all":
        raise ValueError(f"dnr.text_tokens={text_tokens!r} unknown; valid: ['after_media', 'all']")
    w = torch.stack(masks, dim=1).to(torch.float32)  # (B, 3, T)
    present = w.sum(dim=2) > 0
    pooled = torch.einsum("bmt,btd->bmd", w, hidden.float()) / w.sum(dim=2, keepdim=True).clamp_min(1.0)
    return pooled, present


# ------------------------------------------------------------------------------------------- losses
def feature_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pearson correlation of each feature of `a` with the same feature of `b`, over the batch.

    Args:
        a, b: (N, P) float.
    Returns:
        (P,) in [-1, 1]; zeros (kept in the autograd graph) when N < 2.
    """
    if a.shape[0] < 2:
        return (a * b).sum(dim=0) * 0.0
    a = a - a.mean(dim=0, keepdim=True)
    b = b - b.mean(dim=0, keepdim=True)
    a = a / a.std(dim=0, unbiased=False, keepdim=True).clamp_min(eps)
    b = b / b.std(dim=0, unbiased=False, keepdim=True).clamp_min(eps)
    return (a * b).mean(dim=0).clamp(-1.0, 1.0)


def push_loss(parts: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Decorrelation within each modality: mean |corr| of u-r, u-s and r-s (0 = decorrelated, 1 = identical).

    Args:
        parts: (B, M, 3, P) float, parts in `PARTS` order.
        present: (B, M) bool; only samples that have the modality count for its terms.
    Returns:
        scalar, the mean over modalities and the three pairs.
    """
    terms = []
    for m in range(parts.shape[1]):
        rows = parts[present[:, m], m]  # (N, 3, P)
        for i, j in ((0, 1), (0, 2), (1, 2)):
            terms.append(feature_correlation(rows[:, i], rows[:, j]).abs().mean())
    return torch.stack(terms).mean()


def pull_loss(redundant: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Alignment of the redundant parts across modalities: 1 - mean |corr| over modality pairs.

    Args:
        redundant: (B, M, P) float, the r part of each modality.
        present: (B, M) bool; a pair uses the samples that have both modalities.
    Returns:
        scalar in [0, 1] (0 = perfectly (anti-)correlated r parts); 0 when M < 2.
    """
    M = redundant.shape[1]
    terms = []
    for i in range(M):
        for j in range(i + 1, M):
            both = present[:, i] & present[:, j]
            if int(both.sum()) < 2:
                continue
            terms.append(1.0 - feature_correlation(redundant[both, i], redundant[both, j]).abs().mean())
    if not terms:
        return redundant.sum() * 0.0
    return torch.stack(terms).mean()


def synergy_loss(
    joint_logits: torch.Tensor, single_logits: torch.Tensor, target: torch.Tensor, margin: float,
    gap_cap: float = 3.0,
) -> torch.Tensor:
    """Joint probe cross-entropy plus a hinge on its margin over the unimodal probes.

    value = J + relu(margin - clamp(S - J, 0, gap_cap)), J = CE(joint), S = mean CE of the unimodal
    probes. The unimodal probes' own training term enters as S - S.detach() (zero value, gradient of S),
    so they learn to predict the label while the gradient-reversal layer in front of them (see
    `DnRHead`) makes the synergy parts individually uninformative; the hinge uses S detached and only
    drives J down.

    Args:
        joint_logits: (N, C) logits of the joint probe on the concatenated s parts.
        single_logits: (M, N, C) logits of the unimodal probes.
        target: (N,) long class ids.
        margin: required gap in nats.
        gap_cap: upper clamp of the gap.
    Returns:
        scalar >= 0; ~0 when the joint probe is right and confident and the unimodal probes are worse
        by at least `margin`.
    """
    joint = F.cross_entropy(joint_logits, target)
    M, N, C = single_logits.shape
    single = F.cross_entropy(single_logits.reshape(M * N, C), target.repeat(M))
    gap = (single.detach() - joint).clamp(0.0, gap_cap)
    return joint + F.relu(margin - gap) + (single - single.detach())


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between two views: sample i of `z1` matches sample i of `z2`.

    Args:
        z1, z2: (B, P) float representations of the same B samples.
        temperature: divides the cosine similarities.
    Returns:
        scalar: mean of the cross-entropies z1 -> z2 and z2 -> z1 (log B for uninformative views).
    """
    sim = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / temperature  # (B, B)
    target = torch.arange(z1.shape[0], device=z1.device)
    return 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.alpha * grad, None


def grad_reverse(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Identity forward; the backward multiplies the gradient by -alpha."""
    return _GradReverse.apply(x, alpha)


# ------------------------------------------------------------------------------------------- module
@dataclass
class DnROutput:
    """What `DnRHead.forward` produces for one batch.

    Attributes:
        parts: (B, 3, 3, P) float32 parts (modality x part; absent modalities are zeros).
        present: (B, 3) bool modality presence.
        base_logits: (B, C) the fused head's logits without DnR.
        pooled: (B, S, D) the fused head's pooled states (input of the feature head), or None.
        dnr_logits: (B, C) the recombination classifier's logits.
        fused_logits: (B, C) base_logits + dnr_logits (what MerModel reports as "fused").
        losses: unweighted DnR objectives by `LOSS_NAMES` key (only those that ran).
    """

    parts: torch.Tensor
    present: torch.Tensor
    base_logits: torch.Tensor
    dnr_logits: torch.Tensor
    fused_logits: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled: torch.Tensor | None = None


class DivideBranch(nn.Module):
    """One modality's Divide head: LayerNorm + one linear map to [u, r, s]."""

    def __init__(self, hidden_size: int, part_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, len(PARTS) * part_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, 3, P) in `PARTS` order."""
        return self.proj(self.norm(x)).unflatten(-1, (len(PARTS), -1))


class SynergyProbes(nn.Module):
    """The joint probe on [s_t, s_a, s_v] and one unimodal probe per modality (upstream's sizes)."""

    def __init__(self, part_dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        P, C, n = part_dim, num_classes, len(MODALITIES)
        self.joint = nn.Sequential(nn.Linear(n * P, P), nn.ReLU(), nn.Dropout(dropout), nn.Linear(P, C))
        self.single = nn.ModuleList(
            nn.Sequential(nn.Linear(P, P // 2), nn.ReLU(), nn.Linear(P // 2, C)) for _ in range(n)
        )


class FeatureHead(nn.Module):
    """The head that reads the recombined representation as features beside the fused head's pooled states:
    LayerNorm(S*D + P) -> Linear(S*D + P, P) -> GELU -> Linear(P, C), the last layer zero-initialised."""

    def __init__(self, in_features: int, part_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.hidden = nn.Linear(in_features, part_dim)
        self.out = nn.Linear(part_dim, num_classes)
        nn.init.zeros_(self.out.weight)  # DnR adds exactly 0 to the fused logits at initialisation
        nn.init.zeros_(self.out.bias)

    def forward(self, pooled: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, S, D) pooled states, (B, P) z -> (B, C) float32 logits."""
        x = torch.cat([pooled.flatten(1).float(), z.float()], dim=-1)
        return self.out(F.gelu(self.hidden(self.norm(x))))


class DnRHead(nn.Module):
    """Divide heads, synergy probes, recombination and the head that reads it (features or logits).

    Parameter names (under MerModel's `fusion_dnr`): `divide.branches.{0,1,2}.*` and `divide.synergy.*`
    (the Divide side, `DIVIDE_PREFIX`), `recombine.*` and `feature_head.*` (`head_input: features`) or
    `classifier.*` (`head_input: logits`) (the Refine side).

    Args:
        hidden_size: D of the pooled hidden states.
        num_classes: C.
        cfg: the DnR settings.
        pooled_slots: S, the number of pooled vectors of the fused head (`head_input: features`).
    """

    def __init__(self, hidden_size: int, num_classes: int, cfg: DnRConfig, pooled_slots: int = 4) -> None:
        super().__init__()
        P = cfg.part_dim
        self.cfg = cfg
        self.divide = nn.ModuleDict({
            "branches": nn.ModuleList(DivideBranch(hidden_size, P) for _ in MODALITIES),
            "synergy": SynergyProbes(P, num_classes, cfg.probe_dropout),
        })
        self.recombine = nn.Linear(len(MODALITIES) * len(PARTS) * P, P)
        if cfg.head_input == "features":
            self.feature_head = FeatureHead(pooled_slots * hidden_size + P, P, num_classes)
        else:
            self.classifier = nn.Linear(P, num_classes)
            nn.init.zeros_(self.classifier.weight)  # DnR adds exactly 0 to the fused logits at initialisation
            nn.init.zeros_(self.classifier.bias)

    def represent(self, parts: torch.Tensor) -> torch.Tensor:
        """(B, 3, 3, P) parts (or a view of them) -> (B, P) recombined representation z."""
        return F.gelu(self.recombine(parts.flatten(1)))

    def classify(self, parts: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, 3, P) parts (and (B, S, D) pooled states with `head_input: features`) -> (B, C) DnR logits."""
        z = self.represent(parts)
        if self.cfg.head_input == "logits":
            return self.classifier(z)
        if pooled is None:
            raise ValueError("dnr.head_input=features needs the fused head's pooled states (pooled=...)")
        return self.feature_head(pooled, z)

    def divide_parts(self, pooled: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, 3, D) pooled, (B, 3) present -> (B, 3, 3, P) parts, zero for absent modalities."""
        parts = torch.stack([b(pooled[:, i]) for i, b in enumerate(self.divide["branches"])], dim=1)
        return parts * present[:, :, None, None].to(parts.dtype)

    def forward(
        self,
        hidden_states: tuple[torch.Tensor, ...],
        token_modality: torch.Tensor,
        prompt_mask: torch.Tensor,
        base_logits: torch.Tensor,
        class_id: torch.Tensor | None = None,
        train_step: int | None = None,
        pooled: torch.Tensor | None = None,
        total_steps: int | None = None,
    ) -> DnROutput:
        """Parts, DnR logits added to the fused logits and (with targets) the stage's objectives.

        Args:
            hidden_states: the backbone's hidden states, each (B, T, D); `cfg.layer` picks one.
            token_modality: (B, T) long.
            prompt_mask: (B, T) bool.
            base_logits: (B, C) float32 fused-head logits.
            class_id: (B,) long targets (-100 = unlabelled); objectives run only with a labelled sample.
            train_step: the current optimizer step (gates Refine in stages "joint" and "phased"); Refine
                also needs training mode (its views are random).
            pooled: (B, S, D) the fused head's pooled states (needed with `head_input: features`).
            total_steps: the run's optimizer steps (stage "phased": where Divide ends).
        Returns:
            A `DnROutput`.
        """
        cfg = self.cfg
        if not -len(hidden_states) <= cfg.layer < len(hidden_states):
            raise ValueError(f"dnr.layer={cfg.layer} is outside the backbone's {len(hidden_states)} hidden "
                             f"states (valid: {-len(hidden_states)} .. {len(hidden_states) - 1})")
        hidden = hidden_states[cfg.layer]  # (B, T, D)
        modality_means, present = pool_modalities(hidden, token_modality, prompt_mask, cfg.text_tokens)
        parts = self.divide_parts(modality_means, present)
        dnr_logits = self.classify(parts, pooled)
        out = DnROutput(parts, present, base_logits, dnr_logits, base_logits + dnr_logits, pooled=pooled)
        labelled = class_id >= 0 if class_id is not None else None
        if labelled is None or not bool(labelled.any()):
            return out
        if cfg.divide_active(train_step, total_steps):
            out.losses["dnr_push"] = push_loss(parts, present)
            out.losses["dnr_pull"] = pull_loss(parts[:, :, 1], present)
            out.losses["dnr_synergy"] = self.synergy(parts[labelled], class_id[labelled])
        elif cfg.stage == "phased":  # Refine phase: the probes stay in the graph (weight 0) for DDP
            out.losses["dnr_synergy"] = 0.0 * sum(p.sum() for p in self.divide["synergy"].parameters())
        if self.training and cfg.refine_active(train_step, total_steps):
            out.losses["dnr_refine"] = self.refine_loss(parts.detach(), present)
        return out

    def synergy(self, parts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`synergy_loss` of the probes on (N, 3, 3, P) labelled parts with (N,) targets."""
        probes = self.divide["synergy"]
        s = parts[:, :, 2]  # (N, 3, P)
        joint = probes.joint(s.flatten(1))
        alpha = self.cfg.grl_alpha
        single = torch.stack([p(grad_reverse(s[:, i], alpha)) for i, p in enumerate(probes.single)])
        return synergy_loss(joint, single, target, self.cfg.margin, self.cfg.gap_cap)

    def views(
        self, parts: torch.Tensor, present: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Refine views of (B, 3, 3, P) parts: masked views (modalities present in the batch) and noised ones.

        Returns:
            masked: one (B, 3, 3, P) view per modality present in at least one sample ("keep_one": only
                that modality's parts kept; "drop_one": that modality's parts zeroed).
            noised: one view per `noise_sigmas` entry, redundant parts + N(0, sigma^2) noise (present
                modalities only).
        """
        masked = []
        for m in range(parts.shape[1]):
            if not bool(present[:, m].any()):
                continue
            keep = torch.zeros(parts.shape[1], dtype=parts.dtype, device=parts.device)
            keep[m] = 1.0
            if self.cfg.view_mask == "drop_one":
                keep = 1.0 - keep
            masked.append(parts * keep[None, :, None, None])
        noised = []
        for sigma in self.cfg.noise_sigmas:
            noise = torch.zeros_like(parts)
            noise[:, :, 1] = torch.randn_like(parts[:, :, 1]) * sigma
            noised.append(parts + noise * present[:, :, None, None].to(parts.dtype))
        return masked, noised

    def refine_loss(self, parts: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Mean InfoNCE over (masked, noised) view pairs and the pairs of noised views.

        Args:
            parts: (B, 3, 3, P) parts, detached (the Divide heads receive no Refine gradient).
            present: (B, 3) bool.
        """
        masked, noised = self.views(parts, present)
        z_masked = [self.represent(v) for v in masked]
        z_noised = [self.represent(v) for v in noised]
        pairs = [(a, b) for a in z_masked for b in z_noised]
        n = len(z_noised)
        pairs += [(z_noised[i], z_noised[j]) for i in range(n) for j in range(i + 1, n)]
        return torch.stack([info_nce(a, b, self.cfg.temperature) for a, b in pairs]).mean()


# ------------------------------------------------------------------------------------- explanations
@torch.no_grad()
def component_ablation(head: DnRHead, out: DnROutput) -> dict[str, torch.Tensor]:
    """Zero one part at a time and measure the change of the fused class distribution.

    Args:
        head: the DnR head that produced `out`.
        out: its output for a batch of B samples.
    Returns:
        {"pred": (B,) long predicted class of the full model, "kl": (B, 9) KL(p_full || p_ablated) in nats,
        "delta_p": (B, 9) p_full[pred] - p_ablated[pred]} with columns in `COMPONENTS` order.
    """
    full = F.log_softmax(out.fused_logits.float(), dim=-1)  # (B, C)
    pred = full.argmax(dim=-1)
    kls, deltas = [], []
    M, K = out.parts.shape[1:3]
    for m in range(M):
        for k in range(K):
            parts = out.parts.clone()
            parts[:, m, k] = 0.0
            ablated = F.log_softmax((out.base_logits + head.classify(parts, out.pooled)).float(), dim=-1)
            kls.append((full.exp() * (full - ablated)).sum(dim=-1).clamp_min(0.0))
            deltas.append((full.exp() - ablated.exp()).gather(1, pred[:, None]).squeeze(1))
    return {"pred": pred, "kl": torch.stack(kls, dim=1), "delta_p": torch.stack(deltas, dim=1)}


def ablation_rows(table: dict[str, torch.Tensor]) -> list[dict[str, dict[str, float]]]:
    """Per-sample rows of a `component_ablation` table: [{component: {"kl": x, "delta_p": y}}] (B rows)."""
    kl, dp = table["kl"].tolist(), table["delta_p"].tolist()
    return [
        {c: {"kl": kl[i][j], "delta_p": dp[i][j]} for j, c in enumerate(COMPONENTS)} for i in range(len(kl))
    ]


# ------------------------------------------------------------------------------------------ loading
def load_divide_weights(head: DnRHead, run_dir: str | Path) -> int:
    """Copy `fusion_dnr.divide.*` from `<run_dir>/heads.safetensors` into `head` (`dnr.init_from`).

    Returns:
        The number of tensors loaded.
    Raises:
        FileNotFoundError: no heads.safetensors in `run_dir`.
        ValueError: the file has no (or mismatching) Divide weights.
    """
    path = Path(run_dir) / "heads.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"dnr.init_from={str(run_dir)!r}: no heads.safetensors (not a finished run)")
    saved = load_file(str(path))
    state = {k[len(DIVIDE_PREFIX):]: v for k, v in saved.items() if k.startswith(DIVIDE_PREFIX)}
    own = head.divide.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ValueError(
            f"dnr.init_from={str(run_dir)!r}: its Divide weights do not match this model (same backbone, "
            f"dnr.part_dim and labels needed); missing {sorted(set(own) - set(state))[:3]}"
        )
    head.divide.load_state_dict(state)
    say(f"DnR: Divide heads loaded from {path} ({len(state)} tensors)")  # the refine stage's start point
    return len(state)
