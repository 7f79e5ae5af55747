"""`MoSELinear`: one frozen nn.Linear plus modality-specific LoRA experts routed per token.

For a token x of modality m (0 text, 1 audio, 2 video; `mllm_mer.data.schema.Modality`):

    y = W x + b + (alpha / r) * w_m * sum_e g_e(x) * B[m, e] (A dropout(x))

- A (r, D_in) is shared by every expert of every modality; B[m, e] (D_out, r) is expert e of modality m.
  B starts at zero, so a fresh adapter leaves the base output unchanged (as LoRA).
- g(x) (E,) is the gate of modality m: softmax(G[m] x) over m's own E experts, then routed by
  `MoSEConfig.routing` ("soft", "top_k" or "top1_st", see there). With E = 1 there is no gate (g = 1).
- w_m is the dynamic modality weight of this layer: 2 * sigmoid(s_m) with s_m learned from 0, or 1.
- With `mose.sample_gate` the audio and video tokens of a sample are further scaled by that sample's
  (w_a, w_v) = 2 * softmax(U [mean of x over its audio tokens, mean over its video tokens]), U (2, 2 D_in)
  learned from 0 (so 1, 1 at start): a per-sample gate that weighs the audio adaptation against the video
  one. Only media tokens are pooled (never the answer), so a cache-free generation step and the prompt
  pass see the same gate; a KV-cached step carries only new text tokens, which are not gated.

Only the experts of the token's own modality enter its output: the mixture is built in the rank space as
z[m', e] = [m' == m] * w_m * g_e * (A x) and the delta is one matmul with all B's, so the blocks of the
other modalities are exact zeros (their B's get exactly zero gradient from that token; every parameter
still takes part in every forward, which keeps DDP free of unused parameters).

Trainable parameters are named `mose_*` (`mllm_mer.trainable` recognises them). The token modalities reach
the layer as the keyword `token_modality`, injected by `bound_modalities` (`.model`); the layer refuses to
run without them. When given a list as `mose_records`, the layer appends a `RoutingRecord` with its gate
and delta statistics (what the regularizers and the gate statistics are computed from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mllm_mer.adapters.mose.config import MoSEConfig
from mllm_mer.data.schema import Modality

NUM_MODALITIES = len(Modality)


@dataclass
class RoutingRecord:
    """What one MoSELinear call saw (M = 3 modalities, E experts); all per modality group.

    Attributes:
        tokens: (M,) float, number of tokens of each modality (no grad).
        gate_mass: (M, E) float32, mean gate probability per expert over the group's tokens (with grad).
        expert_usage: (M, E) float32, share of the group's tokens whose most probable expert is e (no grad).
        contribution: (M,) float32, mean squared norm of the adapter delta per token (with grad).
        modality_weights: (M,) float32, the layer's w_m (no grad).
        sample_gate: (M,) float32, mean per-sample gate (w_t = 1, w_a, w_v) over the call's samples (no grad).
    """

    tokens: torch.Tensor
    gate_mass: torch.Tensor
    expert_usage: torch.Tensor
    contribution: torch.Tensor
    modality_weights: torch.Tensor
    sample_gate: torch.Tensor | None = None


def route(probs: torch.Tensor, routing: str, top_k: int = 1) -> torch.Tensor:
    """Expert weights from gate probabilities.

    Args:
        probs: (..., E) softmax probabilities.
        routing: "soft" (probs as they are), "top_k" (the top_k largest keep their value, others 0) or
            "top1_st" (one-hot of the argmax in the forward pass, gradient of `probs`).
        top_k: experts kept with "top_k".
    Returns:
        (..., E), same dtype as `probs`.
    Raises:
        ValueError: unknown `routing`.
    """
    if routing == "soft":
        return probs
    if routing == "top_k":
        keep = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)
        return probs * keep
    if routing == "top1_st":
        hard = F.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)
        return hard + probs - probs.detach()  # forward: exactly `hard`; backward: d/dprobs
    raise ValueError(f"mose.routing={routing!r} unknown; valid: ['soft', 'top_k', 'top1_st']")


class MoSELinear(nn.Module):
    """An nn.Linear with a shared LoRA A and per-modality groups of expert B matrices.

    Args:
        base_layer: the frozen linear layer to wrap (kept as `base_layer`, weights untouched).
        cfg: the MoSE settings (rank, experts, routing, initialisation, modality weights).
    Raises:
        TypeError: `base_layer` is not an nn.Linear.
        ValueError: `cfg.r` or `cfg.experts` < 1.
    """

    adapter_layer_names = ("mose_A", "mose_B", "mose_gate", "mose_modality_logit", "mose_sample_gate")
    """The trainable parameters this layer adds (the last three may be None, see `__init__`)."""

    def __init__(self, base_layer: nn.Linear, cfg: MoSEConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"MoSE wraps torch.nn.Linear only, got {type(base_layer).__name__}; "
                f"narrow mose.target_modules to linear projections"
            )
        if cfg.r < 1 or cfg.experts < 1:
            raise ValueError(f"mose.r={cfg.r} and mose.experts={cfg.experts} must both be >= 1")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = cfg.r
        self.num_experts = cfg.experts
        self.scaling = cfg.scaling
        self.routing = cfg.routing
        self.top_k = cfg.top_k
        self.mose_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = {"device": base_layer.weight.device, "dtype": torch.float32}  # adapter in fp32 (as peft)
        M, E = NUM_MODALITIES, cfg.experts
        self.mose_A = nn.Parameter(torch.empty(cfg.r, self.in_features, **kw))
        self.mose_B = nn.Parameter(torch.zeros(M, E, self.out_features, cfg.r, **kw))
        self.mose_gate = nn.Parameter(torch.empty(M, E, self.in_features, **kw)) if E > 1 else None
        learned = cfg.modality_weights == "learned"
        self.mose_modality_logit = nn.Parameter(torch.zeros(M, **kw)) if learned else None
        self.mose_sample_gate = nn.Parameter(torch.zeros(2, 2 * self.in_features, **kw)) if cfg.sample_gate else None
        self.reset_parameters(cfg.gate_init_scale)

    def reset_parameters(self, gate_init_scale: float) -> None:
        """A as LoRA (Kaiming-uniform), every B zero, gate N(0, scale^2 / D_in), modality logits 0."""
        nn.init.kaiming_uniform_(self.mose_A, a=math.sqrt(5))
        nn.init.zeros_(self.mose_B)
        if self.mose_gate is not None:
            nn.init.normal_(self.mose_gate, std=gate_init_scale / math.sqrt(self.in_features))
        if self.mose_modality_logit is not None:
            nn.init.zeros_(self.mose_modality_logit)
        if self.mose_sample_gate is not None:
            nn.init.zeros_(self.mose_sample_gate)

    def modality_weights(self) -> torch.Tensor:
        """(M,) float32 w_m: 2 * sigmoid(s_m) when learned (1 at init), else ones."""
        if self.mose_modality_logit is None:
            return self.mose_A.new_ones(NUM_MODALITIES)
        return 2.0 * torch.sigmoid(self.mose_modality_logit)

    def sample_weights(self, x: torch.Tensor, token_modality: torch.Tensor) -> torch.Tensor:
        """Per-sample modality scales (1, w_a, w_v), see the module docstring.

        Args:
            x: (B, T, D_in) float32 layer input.
            token_modality: (B, T) long.
        Returns:
            (B, M) float32; all ones without `mose.sample_gate`.
        """
        B = x.shape[0]
        ones = x.new_ones(B, NUM_MODALITIES)
        if self.mose_sample_gate is None:
            return ones
        means = []
        for m in (Modality.AUDIO, Modality.VIDEO):
            w = (token_modality == int(m)).to(x.dtype)  # (B, T)
            means.append(torch.einsum("bt,btd->bd", w, x) / w.sum(1, keepdim=True).clamp_min(1.0))
        gate = 2.0 * torch.softmax(F.linear(torch.cat(means, dim=-1), self.mose_sample_gate), dim=-1)  # (B, 2)
        return torch.cat([ones[:, :1], gate], dim=-1)

    def gate_probs(self, x: torch.Tensor, token_modality: torch.Tensor) -> torch.Tensor:
        """Softmax over the experts of each token's own modality.

        Args:
            x: (B, T, D_in) float32 gate input.
            token_modality: (B, T) long, values in `Modality`.
        Returns:
            (B, T, E) float32 (all ones when E = 1).
        """
        E = self.num_experts
        if self.mose_gate is None:
            return x.new_ones(*x.shape[:-1], 1)
        logits = F.linear(x, self.mose_gate.flatten(0, 1)).unflatten(-1, (NUM_MODALITIES, E))  # (B,T,M,E)
        index = token_modality[..., None, None].expand(*token_modality.shape, 1, E)  # (B,T,1,E)
        return logits.gather(-2, index).squeeze(-2).softmax(dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        token_modality: torch.Tensor | None = None,
        mose_records: list[RoutingRecord] | None = None,
    ) -> torch.Tensor:
        """Base projection plus the routed expert delta of each token's modality.

        Args:
            x: (B, T, D_in) activations, any float dtype.
            token_modality: (B, T) long, values in `Modality` (injected by `bound_modalities`).
            mose_records: a list to append this call's `RoutingRecord` to, or None.
        Returns:
            (B, T, D_out), same dtype as the base layer's output.
        Raises:
            RuntimeError: called without `token_modality` (outside `bound_modalities`).
            ValueError: `token_modality` does not have the shape of `x` without its last dimension.
        """
        result = self.base_layer(x)
        if token_modality is None:
            raise RuntimeError(
                "MoSELinear called without token_modality: run the model inside "
                "mllm_mer.adapters.mose.bound_modalities(model, token_modality)"
            )
        if token_modality.shape != x.shape[:-1]:
            raise ValueError(
                f"token_modality has shape {tuple(token_modality.shape)}, x has {tuple(x.shape)}"
            )
        xf = x.to(self.mose_A.dtype)
        h = F.linear(self.mose_dropout(xf), self.mose_A)  # (B,T,r)
        probs = self.gate_probs(xf, token_modality)  # (B,T,E)
        weights = route(probs, self.routing, self.top_k)  # (B,T,E)
        onehot = F.one_hot(token_modality, NUM_MODALITIES).to(xf.dtype)  # (B,T,M)
        w = self.modality_weights()  # (M,)
        sample = self.sample_weights(xf, token_modality)  # (B,M): 1, w_a, w_v of each sample
        coef = onehot * w * sample[:, None, :]  # (B,T,M): own modality only, 0 elsewhere
        # (B,T,M,1,1) * (B,T,1,E,r) -> (B,T,M,E,r): the rank-space mixture, zero outside the own modality
        z = coef[..., None, None] * (weights[..., None] * h[..., None, :])[..., None, :, :]
        K = z.shape[-3] * z.shape[-2] * z.shape[-1]
        b = self.mose_B.transpose(-1, -2).reshape(K, self.out_features)  # (K, D_out), rows ordered like z
        delta = (z.reshape(-1, K) @ b).view(*z.shape[:-3], self.out_features) * self.scaling  # (B,T,D_out)
        if mose_records is not None:
            mose_records.append(self._record(z, delta, probs, onehot, w, sample))
        return result + delta.to(result.dtype)

    def _record(
        self, z: torch.Tensor, delta: torch.Tensor, probs: torch.Tensor, onehot: torch.Tensor, w: torch.Tensor,
        sample: torch.Tensor,
    ) -> RoutingRecord:
        """Statistics of one call, per modality group (see `RoutingRecord`).

        Args:
            z: (B,T,M,E,r) the rank-space mixture; delta: (B,T,D_out) float32 the adapter delta (scaled);
            probs: (B,T,E) gate probabilities; onehot: (B,T,M) token modalities; w: (M,) modality weights;
            sample: (B,M) per-sample modality gates (1, w_a, w_v).
        """
        E = self.num_experts
        zf = z.flatten(-3)  # (B,T,K), K = M*E*r
        if self.out_features <= zf.shape[-1]:  # |delta|^2 directly: the cheaper exact form here
            sq = delta.square().sum(-1)  # (B,T)
        else:  # |delta|^2 = z^T (B^T B) z * scaling^2: no (B,T,D_out) product kept for backward
            b = self.mose_B.permute(2, 0, 1, 3).flatten(1)  # (D_out, K), columns ordered like zf
            sq = ((zf @ (b.T @ b)) * zf).sum(-1).clamp_min(0) * self.scaling**2  # (B,T)
        top1 = F.one_hot(probs.detach().argmax(-1), E).to(probs.dtype)  # (B,T,E)
        # one product for every per-group sum: [gate mass E | top-1 counts E | squared delta 1 | tokens 1]
        per_token = torch.cat([probs, top1, sq[..., None], torch.ones_like(sq)[..., None]], dim=-1)
        sums = onehot.flatten(0, 1).T @ per_token.flatten(0, 1)  # (M, 2E+2)
        tokens = sums[:, -1].detach()  # (M,)
        denom = tokens.clamp_min(1.0)
        return RoutingRecord(
            tokens=tokens,
            gate_mass=sums[:, :E] / denom[:, None],
            expert_usage=(sums[:, E : 2 * E] / denom[:, None]).detach(),
            contribution=sums[:, 2 * E] / denom,
            modality_weights=w.detach(),
            sample_gate=sample.detach().mean(0),
        )

    def extra_repr(self) -> str:
        return (f"r={self.r}, experts={self.num_experts}x{NUM_MODALITIES}, routing={self.routing}, "
                f"scaling={self.scaling:g}")
