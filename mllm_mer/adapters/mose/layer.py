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

Only the experts of the token's own modality enter its output, and only they are computed: the mixture
is built in the rank space as z[e] = w_m * g_e * (A x) (E * r values per token), the tokens are grouped
by modality (one stable sort per bound call, `TokenPlan`) and each group takes one matmul with its own
modality's B's. Other modalities' B's get exactly zero gradient from that token; every parameter still
takes part in every forward (a modality absent from the batch multiplies an empty group), which keeps DDP
free of unused parameters.

Trainable parameters are named `mose_*` (`mllm_mer.trainable` recognises them). The token modalities reach
the layer as the keyword `token_modality`, injected by `bound_modalities` (`.model`); the layer refuses to
run without them; with them comes one `TokenPlan` (the sort by modality, the masks) that every layer of
the call shares. When given a list as `mose_records`, the layer appends a `RoutingRecord` with its gate
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


class TokenPlan:
    """What every MoSELinear of one bound call derives from the token modalities, computed once.

    Args:
        token_modality: (B, T) long, values in `Modality`.
    Attributes:
        token_modality: the (B, T) input.
        onehot: (B, T, M) float32.
        order: (N,) long, N = B * T: the flat token positions sorted by modality (stable).
        counts: M ints, tokens of each modality (the groups of `order`, in modality order; read to the host
            once per bound call).
        media_mask: (B, 2, T) float32, the audio and the video tokens of each sample.
        media_count: (B, 2, 1) float32, their numbers (at least 1).

    The layers that read the same input tensor (q, k and v of one attention block) also share what depends
    only on that tensor and the plan: its cast to the adapter dtype (`cast`) and the per-sample means of its
    audio and video tokens (`media_means`), computed by the first of them and reused while the same tensor
    object comes back unchanged (same in-place version, same grad mode; inference tensors, which have no
    version, are never shared). The shared tensor's backward then runs once on the layers' summed gradients:
    the same values up to float rounding.
    """

    def __init__(self, token_modality: torch.Tensor) -> None:
        self.token_modality = token_modality
        self.onehot = F.one_hot(token_modality, NUM_MODALITIES).to(torch.float32)
        flat = token_modality.reshape(-1)
        self.order = torch.sort(flat, stable=True).indices
        self.counts = torch.bincount(flat, minlength=NUM_MODALITIES).tolist()
        media = (int(Modality.AUDIO), int(Modality.VIDEO))
        self.media_mask = self.onehot[..., list(media)].transpose(1, 2)  # (B, 2, T)
        self.media_count = self.media_mask.sum(-1, keepdim=True).clamp_min(1.0)
        self._cast: tuple | None = None  # (key of the input, its cast)
        self._means: tuple | None = None  # (key of the input, its media means)

    @staticmethod
    def _key(x: torch.Tensor, *extra) -> tuple | None:
        """What identifies an input: the tensor object (held, so its id cannot be reused), its in-place
        version and the grad mode; None for an inference tensor (no version to tell an in-place change)."""
        if x.is_inference():
            return None
        return (x, x._version, torch.is_grad_enabled(), *extra)

    @staticmethod
    def _hit(entry: tuple | None, key: tuple | None) -> bool:
        """`entry` (key, value) holds the value for `key`."""
        if key is None or entry is None or entry[0] is None:
            return False
        return entry[0][0] is key[0] and entry[0][1:] == key[1:]

    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x.to(dtype)`, shared by the layers called on the same tensor `x`."""
        if x.dtype == dtype:
            return x
        key = self._key(x, dtype)
        if not self._hit(self._cast, key):
            self._cast = (key, x.to(dtype))
        return self._cast[1]

    def media_means(self, x: torch.Tensor) -> torch.Tensor:
        """[mean of x over each sample's audio tokens | mean over its video tokens], shared as `cast`.

        Args:
            x: (B, T, D) float.
        Returns:
            (B, 2 D), dtype of `x` (zeros where a sample has no such tokens).
        """
        key = self._key(x)
        if not self._hit(self._means, key):
            means = torch.bmm(self.media_mask.to(x.dtype), x) / self.media_count.to(x.dtype)  # (B, 2, D)
            self._means = (key, means.flatten(1))
        return self._means[1]


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

    def sample_weights(
        self, x: torch.Tensor, token_modality: torch.Tensor, plan: TokenPlan | None = None
    ) -> torch.Tensor:
        """Per-sample modality scales (1, w_a, w_v), see the module docstring.

        Args:
            x: (B, T, D_in) float32 layer input.
            token_modality: (B, T) long.
            plan: `TokenPlan(token_modality)` when already built.
        Returns:
            (B, M) float32; all ones without `mose.sample_gate`.
        """
        B = x.shape[0]
        ones = x.new_ones(B, NUM_MODALITIES)
        if self.mose_sample_gate is None:
            return ones
        plan = plan if plan is not None else TokenPlan(token_modality)
        means = plan.media_means(x)  # (B, 2 D_in): [mean over audio tokens | mean over video tokens]
        gate = 2.0 * torch.softmax(F.linear(means, self.mose_sample_gate), dim=-1)  # (B, 2)
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
        mose_plan: TokenPlan | None = None,
    ) -> torch.Tensor:
        """Base projection plus the routed expert delta of each token's modality.

        Args:
            x: (B, T, D_in) activations, any float dtype.
            token_modality: (B, T) long, values in `Modality` (injected by `bound_modalities`).
            mose_records: a list to append this call's `RoutingRecord` to, or None.
            mose_plan: `TokenPlan(token_modality)`, shared by the layers of one bound call (built here
                when None).
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
        plan = mose_plan if mose_plan is not None else TokenPlan(token_modality)
        xf = plan.cast(x, self.mose_A.dtype)
        h = F.linear(self.mose_dropout(xf), self.mose_A)  # (B,T,r)
        probs = self.gate_probs(xf, token_modality)  # (B,T,E)
        weights = route(probs, self.routing, self.top_k)  # (B,T,E)
        w = self.modality_weights()  # (M,)
        sample = self.sample_weights(xf, token_modality, plan)  # (B,M): 1, w_a, w_v of each sample
        coef = (w * sample).gather(1, token_modality)  # (B,T): w_m * sample gate of the token's own m
        # the rank-space mixture z[e] = coef * g_e * (A x) of each token's own modality, built on the tokens
        # sorted by modality (groups in modality order), then one matmul per group with its modality's B's
        N, E = plan.order.numel(), self.num_experts
        gated = (coef[..., None] * weights).reshape(N, E).index_select(0, plan.order)  # (N,E)
        z = gated[:, :, None] * h.reshape(N, self.r).index_select(0, plan.order)[:, None, :]  # (N,E,r)
        groups = z.flatten(1).split(plan.counts)  # per modality: (N_m, K), K = E*r
        b = self.mose_B.transpose(-1, -2).reshape(NUM_MODALITIES, E * self.r, self.out_features)
        b = b * self.scaling  # (M, K, D_out), rows ordered like z; the delta's alpha / r folded in
        delta = torch.cat([g @ b[m] for m, g in enumerate(groups)])  # (N, D_out), sorted order
        if mose_records is not None:
            mose_records.append(self._record(groups, b, delta, probs, plan, w, sample))
        # unsort and add in one op: each output row gets its own delta row exactly once
        out = result.reshape(N, self.out_features).index_add(0, plan.order, delta.to(result.dtype))
        return out.view(result.shape)

    def _record(
        self, groups: tuple[torch.Tensor, ...], b: torch.Tensor, delta: torch.Tensor, probs: torch.Tensor,
        plan: TokenPlan, w: torch.Tensor, sample: torch.Tensor,
    ) -> RoutingRecord:
        """Statistics of one call, per modality group (see `RoutingRecord`).

        Args:
            groups: per modality, (N_m, K) the rank-space mixture of its tokens (K = E*r, `plan.order`);
            b: (M, K, D_out) the B's of each modality times alpha / r, rows ordered like the groups;
            delta: (N, D_out) float32 the adapter delta, in `plan.order`; probs: (B,T,E) gate probabilities;
            plan: the call's `TokenPlan`; w: (M,) modality weights; sample: (B,M) per-sample modality
            gates (1, w_a, w_v).
        """
        E = self.num_experts
        K = b.shape[1]
        if self.out_features <= K * K:  # sum of |delta|^2 over each group's rows directly: cheaper here
            flat = delta.split(plan.counts)
            sq = torch.stack([torch.dot(d.flatten(), d.flatten()) for d in flat])  # (M,)
        else:  # |delta|^2 = z^T (B B^T) z per group: no (N, D_out) product kept for backward
            sq = torch.stack([((g @ (b[m] @ b[m].T)) * g).sum(-1).clamp_min(0).sum()
                              for m, g in enumerate(groups)])  # (M,)
        top1 = F.one_hot(probs.detach().argmax(-1), E).to(probs.dtype)  # (B,T,E)
        # one product for the per-group sums of the gate mass and the top-1 counts
        sums = plan.onehot.to(probs.dtype).flatten(0, 1).T @ torch.cat([probs, top1], dim=-1).flatten(0, 1)
        tokens = probs.new_tensor(plan.counts)  # (M,)
        denom = tokens.clamp_min(1.0)
        return RoutingRecord(
            tokens=tokens,
            gate_mass=sums[:, :E] / denom[:, None],
            expert_usage=(sums[:, E : 2 * E] / denom[:, None]).detach(),
            contribution=sq / denom,
            modality_weights=w.detach(),
            sample_gate=sample.detach().mean(0),
        )

    def extra_repr(self) -> str:
        return (f"r={self.r}, experts={self.num_experts}x{NUM_MODALITIES}, routing={self.routing}, "
                f"scaling={self.scaling:g}")
