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
        tokens: (M,) float32, `counts` as a tensor; denom: (M,) float32, `tokens` clamped to at least 1.
        mean_t: (M, N) float32, 1 / denom[m] where token n has modality m, else 0: `mean_t @ v` is the
            per-group mean of a per-token (N, ...) value.
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
        self.tokens = self.onehot.new_tensor(self.counts)
        self.denom = self.tokens.clamp_min(1.0)
        self.mean_t = self.onehot.flatten(0, 1).T / self.denom[:, None]
        media = (int(Modality.AUDIO), int(Modality.VIDEO))
        self.media_mask = self.onehot[..., list(media)].transpose(1, 2)  # (B, 2, T)
        self.media_count = self.media_mask.sum(-1, keepdim=True).clamp_min(1.0)
        self._gate_index: dict[int, torch.Tensor] = {}
        self._cast: tuple | None = None  # (key of the input, its cast)
        self._means: tuple | None = None  # (key of the input, its media means)

    def gate_index(self, experts: int) -> torch.Tensor:
        """(1, E, N) long: each token's modality, expanded to gather its E gate logits from (M, E, N)."""
        index = self._gate_index.get(experts)
        if index is None:
            flat = self.token_modality.reshape(1, 1, -1)
            index = self._gate_index[experts] = flat.expand(1, experts, flat.shape[-1])
        return index

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


def argmax_onehot(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """One-hot of the argmax of `probs` along `dim` (shape and dtype of `probs`, no gradient)."""
    probs = probs.detach()
    first = probs.max(dim, keepdim=True).indices  # the first maximum, as argmax (which is slow over dim 0 on CPU)
    return torch.zeros_like(probs).scatter_(dim, first, 1.0)


def route(
    probs: torch.Tensor, routing: str, top_k: int = 1, hard: torch.Tensor | None = None, dim: int = -1
) -> torch.Tensor:
    """Expert weights from gate probabilities.

    Args:
        probs: (..., E) softmax probabilities (E along `dim`).
        routing: "soft" (probs as they are), "top_k" (the top_k largest keep their value, others 0) or
            "top1_st" (one-hot of the argmax in the forward pass, gradient of `probs`).
        top_k: experts kept with "top_k".
        hard: `argmax_onehot(probs, dim)` when already computed (used by "top1_st").
        dim: the experts' dimension of `probs`.
    Returns:
        The shape and dtype of `probs`.
    Raises:
        ValueError: unknown `routing`.
    """
    if routing == "soft":
        return probs
    if routing == "top_k":
        keep = torch.zeros_like(probs).scatter_(dim, probs.topk(top_k, dim=dim).indices, 1.0)
        return probs * keep
    if routing == "top1_st":
        hard = argmax_onehot(probs, dim) if hard is None else hard
        return hard + probs - probs.detach()  # forward: exactly `hard`; backward: d/dprobs
    raise ValueError(f"mose.routing={routing!r} unknown; valid: ['soft', 'top_k', 'top1_st']")


class _ModalityDelta(torch.autograd.Function):
    """out[rows of group m] += z_m^T b_m for each modality m (in place), optionally |z_m^T b_m|^2, in one node.

    Forward args: out (N, D_out) the base output (any float dtype, modified in place); z (K, N) the rank-space
    mixture of the tokens sorted by modality; b (M, K, D_out) each modality's B's; order: (N,) the rows of
    `out` in z's token order (`TokenPlan.order`); counts: the M group sizes N_m; squares: also return (M,)
    the summed squared norm of each group's delta (else None).

    One node instead of a matmul and a `dot` per group and an `index_add_`: the groups' products are written
    into one (N, D_out) buffer, added to `out` in one `index_add_`; the backward gathers the delta gradient
    once (grad_out's rows, plus 2 * grad_sq[m] * delta_m in place) and writes the gradients of z and b into
    one buffer each. The products are exactly those autograd would compute.
    """

    @staticmethod
    def forward(ctx, out, z, b, order, counts, squares):
        delta = z.new_empty(z.shape[1], b.shape[2])  # (N, D_out), sorted like z
        deltas = delta.split(counts)
        for g, b_m, d in zip(z.split(counts, dim=1), b, deltas, strict=True):
            torch.mm(g.t(), b_m, out=d)
        out.index_add_(0, order, delta.to(out.dtype))
        ctx.mark_dirty(out)
        ctx.order, ctx.counts = order, counts
        if not squares:
            ctx.save_for_backward(z, b)
            return out, None
        ctx.save_for_backward(z, b, delta)
        return out, torch.stack([torch.dot(d.view(-1), d.view(-1)) for d in deltas])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_sq):
        z, b, *delta = ctx.saved_tensors
        grad_z = torch.empty_like(z) if ctx.needs_input_grad[1] else None
        grad_b = torch.empty_like(b) if ctx.needs_input_grad[2] else None
        grad = grad_out.index_select(0, ctx.order).to(z.dtype)  # (N, D_out): d loss / d delta, sorted like z
        grads, z_groups = grad.split(ctx.counts), z.split(ctx.counts, dim=1)
        if grad_sq is not None:  # d |delta_m|^2 / d delta_m = 2 delta_m
            for g, d, gs in zip(grads, delta[0].split(ctx.counts), (2.0 * grad_sq).unbind(), strict=True):
                g.addcmul_(d, gs)
        if grad_z is not None:
            for g, b_m, out in zip(grads, b, grad_z.split(ctx.counts, dim=1), strict=True):
                torch.mm(b_m, g.t(), out=out)
        if grad_b is not None:
            for g, z_m, out in zip(grads, z_groups, grad_b, strict=True):
                torch.mm(z_m, g, out=out)
        return grad_out, grad_z, grad_b, None, None, None


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
        if self.mose_sample_gate is None:
            return x.new_ones(x.shape[0], NUM_MODALITIES)
        plan = plan if plan is not None else TokenPlan(token_modality)
        means = plan.media_means(x)  # (B, 2 D_in): [mean over audio tokens | mean over video tokens]
        gate = 2.0 * torch.softmax(F.linear(means, self.mose_sample_gate), dim=-1)  # (B, 2)
        return F.pad(gate, (1, 0), value=1.0)  # text: 1

    def gate_probs(
        self, x: torch.Tensor, token_modality: torch.Tensor, plan: TokenPlan | None = None
    ) -> torch.Tensor:
        """Softmax over the experts of each token's own modality, experts first.

        Args:
            x: (B, T, D_in) float32 gate input.
            token_modality: (B, T) long, values in `Modality`.
            plan: `TokenPlan(token_modality)` when already built.
        Returns:
            (E, N) float32, N = B * T tokens in (b, t) order (all ones when E = 1). Experts first: torch's CPU
            kernels (softmax, argmax, sums) are slow over a short last dimension.
        """
        E, N = self.num_experts, token_modality.numel()
        if self.mose_gate is None:
            return x.new_ones(1, N)
        plan = plan if plan is not None else TokenPlan(token_modality)
        # (M*E, N): computed this way round the narrow product is faster, and x's gradient keeps x's layout
        logits = torch.mm(self.mose_gate.flatten(0, 1), x.reshape(N, -1).t()).view(NUM_MODALITIES, E, N)
        return logits.gather(0, plan.gate_index(E)).view(E, N).softmax(dim=0)  # own modality's E logits

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
        N, E, r = plan.order.numel(), self.num_experts, self.r
        xf = plan.cast(x, self.mose_A.dtype)
        h = F.linear(self.mose_dropout(xf.reshape(N, -1)), self.mose_A)  # (N,r), as LoRA
        probs = self.gate_probs(xf, token_modality, plan)  # (E,N)
        top1 = argmax_onehot(probs, dim=0)  # (E,N) no grad
        weights = route(probs, self.routing, self.top_k, hard=top1, dim=0)  # (E,N)
        w = self.modality_weights()  # (M,)
        sample = self.sample_weights(xf, token_modality, plan)  # (B,M): 1, w_a, w_v of each sample
        coef = (w * sample).gather(1, token_modality).view(1, N)  # w_m * sample gate of the token's own m
        # the rank-space mixture z[e] = coef * g_e * (A x) of each token's own modality, built on the tokens
        # sorted by modality (groups in modality order), then one matmul per group with its modality's B's;
        # the rank space comes first (K, N), K = E*r: the fast layout on CPU for these short dimensions
        gated = (coef * weights).index_select(1, plan.order)  # (E,N) sorted
        z = (gated[:, None, :] * h.t().index_select(1, plan.order)[None, :, :]).view(E * r, N)  # (K,N)
        b = self.mose_B.transpose(-1, -2).reshape(NUM_MODALITIES, E * r, self.out_features)
        b = b * self.scaling  # (M, K, D_out), rows ordered like z; the delta's alpha / r folded in
        # each group's delta z_m^T b_m, added to its own rows of the base output. A plain linear does not
        # keep its output for backward (it saves its input), so the rows are added in place.
        out = self.base_layer(x.reshape(N, self.in_features))
        if type(self.base_layer) is not nn.Linear:  # e.g. a 4-bit linear: its output may be a view or saved
            out = out.clone()
        direct = mose_records is not None and self.out_features <= b.shape[1] ** 2
        out, sq = _ModalityDelta.apply(out, z, b, plan.order, plan.counts, direct)
        if mose_records is not None:
            mose_records.append(self._record(z, b, sq, probs, top1, plan, w, sample))
        return out.view(*x.shape[:-1], self.out_features)

    def _record(
        self, z: torch.Tensor, b: torch.Tensor, sq: torch.Tensor | None, probs: torch.Tensor,
        top1: torch.Tensor, plan: TokenPlan, w: torch.Tensor, sample: torch.Tensor,
    ) -> RoutingRecord:
        """Statistics of one call, per modality group (see `RoutingRecord`).

        Args:
            z: (K, N) the rank-space mixture of the tokens sorted by modality (K = E*r, `plan.order`);
            b: (M, K, D_out) the B's of each modality times alpha / r, rows ordered like z's K;
            sq: (M,) float32 the summed squared norm of each group's adapter delta, or None (then computed
                here from `z` and `b`);
            probs: (E,N) gate probabilities; top1: (E,N) one-hot of their argmax; plan: the call's
            `TokenPlan`; w: (M,) modality weights; sample: (B,M) per-sample modality gates (1, w_a, w_v).
        """
        if sq is None:  # |delta|^2 = z^T (B B^T) z per group: no (N, D_out) product kept for backward
            sq = torch.stack([(((b[m] @ b[m].T) @ g) * g).sum(0).clamp_min(0).sum()
                              for m, g in enumerate(z.split(plan.counts, dim=1))])  # (M,)
        return RoutingRecord(
            tokens=plan.tokens,
            gate_mass=plan.mean_t @ probs.t(),
            expert_usage=plan.mean_t @ top1.t(),
            contribution=sq / plan.denom,
            modality_weights=w.detach(),
            sample_gate=sample.detach().mean(0),
        )

    def extra_repr(self) -> str:
        return (f"r={self.r}, experts={self.num_experts}x{NUM_MODALITIES}, routing={self.routing}, "
                f"scaling={self.scaling:g}")
