"""Injecting MoSE into a model, binding token modalities for one call, regularizers, statistics, I/O.

- `apply_mose(model, cfg)` replaces every nn.Linear whose full name matches `cfg.target_modules` (language
  model only) by a `MoSELinear` on the one model instance and returns the replaced names.
- `bound_modalities(model, token_modality)` passes `token_modality` to every MoSELinear through forward
  pre-hooks that exist only inside the `with` block (as peft's poly `_manage_pre_hooks`), together with
  one `TokenPlan` per call shape, built by the first layer and shared by the others. The hooks are
  idempotent (they set keywords), so nesting or re-entry is harmless. Under gradient checkpointing the
  decoder layers run forward again during backward, after the block has exited: `checkpoint_context_fn`
  (given to the checkpoint function by `mllm_mer.model.build_mer_model`) re-binds the same tensor for
  exactly that recompute (torch's non-reentrant checkpoint `context_fn`).
- Lengths during generation: the bound (B, T) covers the prompt. With a KV cache every forward after the
  prompt carries only the new tokens: a call on fewer than T tokens treats them all as generated text.
  Without a cache each step sees the whole sequence: a call on more than T tokens appends text codes. A
  batch expanded by `generate` (beams, several sequences per prompt) repeats each row's modalities.
- Regularizers (`mose_aux_losses`), our formulas:
  load balance, per layer and modality group with tokens, with f = expert usage (share of tokens whose
  most probable expert is e), P = gate mass (mean gate probability) and u = 1/E:
  E * sum_e [(f_e - u)^2 + (f_e - u)(P_e - u) + (P_e - u)^2]
  = (E sum f P - 1) [Switch] + (E sum P^2 - 1) [CV^2 of importance] + (E sum f^2 - 1) [CV^2 of load];
  a^2 + ab + b^2 = 3/4 (a + b)^2 + 1/4 (a - b)^2, so it is zero exactly when f and P are uniform and
  positive otherwise; its gradient is Switch's plus the importance term's (f carries no gradient).
  Modality balance, per layer, with c_a, c_v the mean squared norms of the (weighted) adapter delta on
  audio and on video tokens: ((c_a - c_v) / (c_a + c_v))^2 = (share_a - share_v)^2, zero exactly at
  balance, 1 when one modality takes the whole delta; 0 for a batch without both modalities. Through w_m
  (the dynamic modality weights) and the B's it pulls the audio and video adaptations to equal size.
  Both are averaged over layers.
  Decision balance (`decision_balance_loss`, with `mose.decision_balance_weight` > 0): with lp the mean
  log-probability of a sample's answer tokens (teacher-forced) given the full prompt, and lp_-m given the
  prompt rendered without modality m (its tokens removed, not zeroed), D_m = mean over the batch's samples
  that have m of |lp - lp_-m|; the loss ((D_a - D_v) / (D_a + D_v))^2 is zero when removing either modality
  moves the answer equally, 1 when only one modality matters. It acts on the *decision*, not on adapter
  sizes; the per-sample gate (`mose.sample_gate`) is free to follow either modality per clip.
- Weights are saved as `mose.safetensors` (names relative to the thinker, metadata: the MoSE config).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mllm_mer.adapters.mose.config import MoSEConfig
from mllm_mer.adapters.mose.layer import MoSELinear, RoutingRecord, TokenPlan
from mllm_mer.data.schema import Modality

MOSE_WEIGHTS = "mose.safetensors"
"""File name of the MoSE weights in a run directory."""
PARAM_MARK = ".mose_"
"""Every MoSE parameter name contains this (`mllm_mer.trainable.part_of` keys on it)."""
_BINDING = "_mose_binding"
"""Attribute set on the bound root module while `bound_modalities` is open: (token_modality, collect)."""
_EPS = 1e-12


def mose_layers(model: nn.Module) -> list[MoSELinear]:
    """Every MoSELinear inside `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, MoSELinear)]


def apply_mose(model: nn.Module, cfg: MoSEConfig) -> list[str]:
    """Replace the target linear layers of the language model by MoSELinear (in place).

    Args:
        model: the thinker (or any module holding `...language_model...` linear layers).
        cfg: MoSE settings; `cfg.target_modules` is matched against full module names (re.fullmatch).
    Returns:
        The replaced module names, sorted.
    Raises:
        ValueError: nothing matches, a match lies outside the language model, or MoSE is already applied.
        TypeError: a match is not an nn.Linear.
    """
    pattern = re.compile(cfg.target_modules)
    names = [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]
    if not names:
        raise ValueError(
            f"mose.target_modules={cfg.target_modules!r} matches no module; it must fully match names "
            f"such as 'model.language_model.layers.0.self_attn.q_proj'"
        )
    if mose_layers(model):
        raise ValueError("MoSE is already applied to this model (it holds MoSELinear layers)")
    outside = [n for n in names if ".language_model." not in f".{n}"]
    if outside:
        raise ValueError(f"mose.target_modules reaches modules outside the language model: {outside[:5]}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, MoSELinear(getattr(parent, child), cfg))
    return sorted(names)


def _aligned(token_modality: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bound (B, T) modalities for a call on `shape` = (B_x, T_x) tokens (see module docstring)."""
    B, T = token_modality.shape
    B_x, T_x = shape
    if B_x != B:
        if B_x % B:
            raise ValueError(f"bound token_modality has batch {B}, the layer got {B_x} (not a multiple)")
        token_modality = token_modality.repeat_interleave(B_x // B, dim=0)
    if T_x == T:
        return token_modality
    if T_x > T:  # the whole sequence again (generation without a cache): prompt + generated text
        return torch.cat([token_modality, token_modality.new_full((B_x, T_x - T), int(Modality.TEXT))], dim=1)
    return token_modality.new_full((B_x, T_x), int(Modality.TEXT))  # new tokens only (KV cache steps)


def _bind_pre_hook(
    module: MoSELinear, args: tuple, kwargs: dict, *, token_modality: torch.Tensor,
    records: list[RoutingRecord] | None, plans: dict[tuple, TokenPlan],
) -> tuple[tuple, dict]:
    x = args[0] if args else kwargs["x"]
    key = (x.device, *x.shape[:-1])  # the layers of one call share the aligned modalities and their plan
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = TokenPlan(_aligned(token_modality.to(x.device), x.shape[:-1]))
    kwargs["token_modality"] = plan.token_modality
    kwargs["mose_plan"] = plan
    kwargs["mose_records"] = records
    return args, kwargs


@contextmanager
def bound_modalities(
    model: nn.Module, token_modality: torch.Tensor, collect: bool = False
) -> Iterator[list[RoutingRecord] | None]:
    """Pass `token_modality` to every MoSELinear of `model` for the calls made inside the block.

    Args:
        model: a module holding MoSELinear layers (bind the same root that `checkpoint_context_fn` got).
        token_modality: (B, T) long, values in `Modality` (from the collator).
        collect: yield a list that every MoSELinear call appends its `RoutingRecord` to.
    Yields:
        The record list (collect=True) or None.
    Raises:
        ValueError: `model` has no MoSELinear, or `token_modality` is not (B, T) with valid codes.
    """
    layers = mose_layers(model)
    if not layers:
        raise ValueError("bound_modalities: the model has no MoSELinear layers (apply_mose first)")
    if token_modality.dim() != 2 or token_modality.dtype != torch.long:
        raise ValueError(
            f"token_modality must be (B, T) long, got {tuple(token_modality.shape)} {token_modality.dtype}"
        )
    records: list[RoutingRecord] | None = [] if collect else None
    hook = partial(_bind_pre_hook, token_modality=token_modality, records=records, plans={})
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    previous = getattr(model, _BINDING, None)
    setattr(model, _BINDING, (token_modality, collect))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
        setattr(model, _BINDING, previous)


ContextFn = Callable[[], tuple[AbstractContextManager, AbstractContextManager]]


def checkpoint_context_fn(model: nn.Module) -> ContextFn:
    """A `context_fn` for torch's non-reentrant checkpoint that re-binds the modalities for the recompute.

    Called at each checkpointed forward; returns (forward context, recompute context). The recompute
    context binds the tensor bound on `model` at that moment (with a throwaway record list when records
    were collected, so the recomputed operations are exactly the original ones).
    """

    def context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
        binding = getattr(model, _BINDING, None)
        if binding is None:
            return nullcontext(), nullcontext()
        token_modality, collect = binding
        return nullcontext(), bound_modalities(model, token_modality, collect=collect)

    return context_fn


# ------------------------------------------------------------------------------------------ regularizers
def load_balance_loss(usage: torch.Tensor, gate_mass: torch.Tensor) -> torch.Tensor:
    """Within-group load balance (see module docstring): zero iff both inputs are uniform, else > 0.

    Args:
        usage: (..., E) f, shares of tokens per expert (sums to 1; no gradient needed).
        gate_mass: (..., E) P, mean gate probabilities (sums to 1).
    Returns:
        (...) float.
    """
    E = gate_mass.shape[-1]
    a, b = usage - 1.0 / E, gate_mass - 1.0 / E
    return E * (a * a + a * b + b * b).sum(-1)


def modality_balance_loss(audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """((c_a - c_v) / (c_a + c_v))^2 elementwise: 0 exactly at c_a == c_v (also both 0), in (0, 1] otherwise.

    Args:
        audio: (...) non-negative contributions c_a.
        video: (...) non-negative contributions c_v.
    """
    return ((audio - video) / (audio + video + _EPS)) ** 2


def mose_aux_losses(records: list[RoutingRecord]) -> dict[str, torch.Tensor]:
    """Unweighted regularizers from one forward's records, each averaged over the layers.

    Returns:
        {"mose_load_balance": scalar, "mose_modality_balance": scalar} (float32, with grad).
    Raises:
        ValueError: `records` is empty.
    """
    if not records:
        raise ValueError("no MoSE routing records: run the forward inside bound_modalities(collect=True)")
    tokens = torch.stack([r.tokens for r in records])  # (L, M)
    present = (tokens > 0).to(torch.float32)
    usage = torch.stack([r.expert_usage for r in records])  # (L, M, E)
    mass = torch.stack([r.gate_mass for r in records])  # (L, M, E)
    lb = (load_balance_loss(usage, mass) * present).sum(-1) / present.sum(-1).clamp_min(1.0)  # (L,)
    contrib = torch.stack([r.contribution for r in records])  # (L, M)
    audio, video = int(Modality.AUDIO), int(Modality.VIDEO)
    both = present[:, audio] * present[:, video]
    mb = modality_balance_loss(contrib[:, audio], contrib[:, video]) * both  # (L,)
    return {"mose_load_balance": lb.mean(), "mose_modality_balance": mb.mean()}


# ----------------------------------------------------------------------------------------- statistics
def answer_logprob(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Mean log-probability of each sample's answer tokens (teacher-forced), from its last hidden states.

    Args:
        hidden: (B, T, D) hidden states after the final norm.
        labels: (B, T) long LM labels (-100 outside the answer), aligned with the inputs (shifted here).
        lm_head: the language model's output projection.
    Returns:
        (B,) float32 (0 for a sample without answer tokens).
    """
    target = labels[:, 1:]
    keep = target != -100  # (B, T-1)
    rows = keep.nonzero(as_tuple=True)[0]
    logits = lm_head(hidden[:, :-1][keep]).float()  # (N, V): answer positions only
    lp = torch.log_softmax(logits, dim=-1).gather(1, target[keep][:, None]).squeeze(1)  # (N,)
    total = torch.zeros(hidden.shape[0], device=hidden.device).index_add(0, rows, lp)
    return total / keep.sum(1).clamp_min(1).float()


def decision_balance_loss(
    full: torch.Tensor, without: dict[str, torch.Tensor], present: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """((D_a - D_v) / (D_a + D_v))^2 from answer log-probabilities (module docstring).

    Args:
        full: (B,) answer log-probability with the full prompt.
        without: {"audio": (B,), "video": (B,)} with that modality removed from the prompt.
        present: {"audio": (B,) bool, "video": (B,) bool} the sample has that modality in the full prompt.
    Returns:
        (scalar loss, (2,) detached [D_a, D_v]); the loss is 0 (in the graph) when a modality is absent.
    """
    d = []
    for m in ("audio", "video"):
        keep = present[m].float()
        d.append(((full - without[m]).abs() * keep).sum() / keep.sum().clamp_min(1.0))
    d_a, d_v = d
    loss = modality_balance_loss(d_a, d_v)
    if not (bool(present["audio"].any()) and bool(present["video"].any())):
        loss = loss * 0.0
    return loss, torch.stack([d_a, d_v]).detach()


def summarize_gates(records: list[RoutingRecord]) -> dict[str, torch.Tensor]:
    """Gate statistics of one forward, averaged over the MoSE layers (all detached, float32).

    Returns:
        tokens (M,): tokens per modality; expert_usage (M, E): share of each modality's tokens whose most
        probable expert is e; gate_mass (M, E): mean gate probability; modality_weights (M,): mean w_m;
        delta_share (M,): each modality's share of the summed per-token squared delta norms; with
        `mose.sample_gate` also sample_gate (M,): the mean per-sample gate (1, w_a, w_v).
    """
    contrib = torch.stack([r.contribution.detach() for r in records])  # (L, M)
    share = contrib / (contrib.sum(-1, keepdim=True) + _EPS)
    extra = {}
    if records[0].sample_gate is not None:
        extra["sample_gate"] = torch.stack([r.sample_gate for r in records]).mean(0)
    return {
        "tokens": records[0].tokens,
        "expert_usage": torch.stack([r.expert_usage for r in records]).mean(0),
        "gate_mass": torch.stack([r.gate_mass.detach() for r in records]).mean(0),
        "modality_weights": torch.stack([r.modality_weights for r in records]).mean(0),
        "delta_share": share.mean(0),
        **extra,
    }


def gate_stats_dict(stats: dict[str, torch.Tensor]) -> dict[str, dict]:
    """JSON-ready nested form: {modality: {stat: float or [float per expert]}}."""
    out: dict[str, dict] = {}
    for m in Modality:
        out[m.key] = {k: v[int(m)].tolist() for k, v in stats.items()}
    return out


def flatten_gate_stats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar form for TensorBoard: "audio/expert_usage/e0", "video/modality_weights", ..."""
    flat: dict[str, float] = {}
    for modality, values in gate_stats_dict(stats).items():
        for name, v in values.items():
            if isinstance(v, list):
                flat.update({f"{modality}/{name}/e{i}": float(x) for i, x in enumerate(v)})
            else:
                flat[f"{modality}/{name}"] = float(v)
    return flat


class GateStatsMean:
    """Token-weighted running mean of `summarize_gates` outputs (e.g. over a training run)."""

    def __init__(self) -> None:
        self.steps = 0
        self._tokens: torch.Tensor | None = None
        self._sums: dict[str, torch.Tensor] = {}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        """Accumulate one forward's statistics; each modality's rows are weighted by its token count."""
        tokens = stats["tokens"].detach().float().cpu()  # (M,)
        for k, v in stats.items():
            if k == "tokens":
                continue
            v = v.detach().float().cpu()  # (M,) or (M, E)
            self._sums[k] = self._sums.get(k, 0) + v * (tokens[:, None] if v.dim() == 2 else tokens)
        self._tokens = tokens if self._tokens is None else self._tokens + tokens
        self.steps += 1

    def summary(self) -> dict[str, dict]:
        """{modality: {stat: mean}} plus "steps"; modalities never seen have zeros."""
        if self._tokens is None:
            return {"steps": 0}
        denom = self._tokens.clamp_min(1.0)
        stats = {"tokens": self._tokens}
        for k, v in self._sums.items():
            stats[k] = v / (denom[:, None] if v.dim() == 2 else denom)
        return {"steps": self.steps, **gate_stats_dict(stats)}


# ---------------------------------------------------------------------------------------------- I/O
def mose_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every MoSE parameter of `model` (names relative to it), detached, on CPU, contiguous."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if PARAM_MARK in k}


def save_mose_weights(state: dict[str, torch.Tensor], path: str | Path, cfg: MoSEConfig) -> None:
    """Write MoSE tensors (names relative to the thinker) as safetensors, with the config as metadata.

    Raises:
        ValueError: `state` is empty or holds a non-MoSE name.
    """
    bad = [k for k in state if PARAM_MARK not in k]
    if not state or bad:
        raise ValueError(f"save_mose_weights needs MoSE tensors only; got {len(state)}, non-MoSE: {bad[:5]}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"format": "pt", "mose_config": json.dumps(dataclasses.asdict(cfg))}
    save_file(tensors, str(path), metadata=metadata)


def load_mose_weights(model: nn.Module, path: str | Path) -> None:
    """Load `path` into the MoSE layers of `model` (names relative to `model`), strictly.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the saved names or shapes differ from the model's MoSE parameters (e.g. the run's
            `mose.*` settings changed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run was not trained with adapter=mose")
    saved = load_file(str(path))
    own = {k: v for k, v in model.state_dict().items() if PARAM_MARK in k}
    if set(saved) != set(own):
        raise ValueError(
            f"{path} does not match the model's MoSE layers: missing {sorted(set(own) - set(saved))[:5]}, "
            f"unexpected {sorted(set(saved) - set(own))[:5]}"
        )
    wrong = [f"{k}: saved {tuple(v.shape)}, model {tuple(own[k].shape)}"
             for k, v in saved.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path} shapes differ from the run's mose.r / mose.experts: {wrong[:2]}")
    model.load_state_dict(saved, strict=False)
