"""Attention reallocation (AR): move attention mass between audio and video tokens at inference time.

AR is the second, training-free part of MoSEAR: while the frozen backbone generates, look at how the
generating positions spread their attention over text, audio and video tokens, and move mass from the
over-attended of audio/video toward the under-attended one. Related training-free methods intervene on
the attention of the generating (last) query in intermediate layers ("Pay More Attention To Audio",
2025, for Qwen2.5-Omni-class models; PAI's boosting of image tokens). No AR formula is public: the one
below is OURS, and every choice in it is a field of `mllm_mer.config.ARConfig` (`ar.*` in the YAML).

The formula, for one sample, targeted layer, head h in `ar.heads` and selected query row:

    p_k         attention probabilities of the row over its keys (padding and future keys masked)
    m_A, m_V    mass on audio / video keys (from `token_modality`; keys beyond the prompt, i.e. generated
                tokens, are text)
    s  = m_A / (m_A + m_V)             audio share of the audio + video mass
    s' = s + alpha * (tau - s)         alpha = ar.strength in [0, 1], tau = ar.target_audio_share in (0, 1)

    mode "probs" (default, after softmax): p_k <- p_k * s'/s on audio keys, p_k * (1-s')/(1-s) on video
        keys. The row still sums to 1; the text mass and the distribution inside each modality are kept:
        mass only moves from the over-attended modality to the under-attended one.
    mode "scores" (before softmax): z_k <- z_k + |logit(s') - logit(s)| on the keys of the under-attended
        modality (audio when s < tau, else video), then softmax. The audio share of the audio + video
        mass is again exactly s'; the boosted modality also takes mass from text (PAI-style boost).

    Both are one additive bias per modality on the scores: "probs" is z + log(s'/s) on audio and
    z + log((1-s')/(1-s)) on video keys (its softmax normaliser is exactly 1), "scores" shifts the pair so
    the over-attended modality keeps its scores. Computed as m_A' - m_A = strength * (tau * m_V -
    (1 - tau) * m_A) and the relative gains (m_A' - m_A) / m_A, -(m_A' - m_A) / m_V.

Per sample (`attention_reallocation(..., sample_targets=(tau, alpha))`, `ar.target_mode: paths`): each clip b
uses its own tau_b and alpha_b instead of `ar.target_audio_share` and `ar.strength` (`mllm_mer.attention.sample`);
the layers stay untouched when `ar.strength` is 0.

Where: rows with m_A or m_V <= `ar.min_mass` (a clip without audio, say) and heads outside `ar.heads`
keep their probabilities. Query rows (`ar.query`): "generated" (default) = the rows at absolute positions
>= T - 1 (T: prompt length), i.e. the last prompt position in a plain forward (what the classification
heads and the first generated token read) and each new token's query during KV-cached decoding (a
cache-free forward over prompt + generated tokens selects the same rows, so both give the same tokens);
"all" = every query row. `ar.layers` (None = the middle half of the language model, layers
L//4 .. 3L//4-1) picks the layers.

How it is wired (no class patching): `attention_reallocation(model, token_modality, cfg)` registers an
attention function through transformers' `AttentionInterface` (plus the wrapped backend's own mask
function through `AttentionMaskInterface`) under "mllm_mer_ar_sdpa" / "mllm_mer_ar_eager", selects it for
the language model only (`set_attn_implementation({"text_config": ...})`; the audio and vision towers
keep theirs) and restores the exact previous implementation in `finally`. Untargeted layers, and the rows
before the first selected one, go through the wrapped implementation (sdpa or eager) untouched, so they
are bitwise identical, and `ar.strength=0` is an exact (bitwise) no-op. The selected rows of a targeted
layer are computed here in float32 eager math (one (B, H, Q_sel, T_k) score block, Q_sel = 1 while
decoding; where nothing is reallocated they equal the backend's rows up to float rounding); during a
decoding step the wrapped implementation is not called at all for a targeted layer. Flash-attention and
flex backends never materialise the weights, so the context raises `RuntimeError` for them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mllm_mer.attention.config import ARConfig
from mllm_mer.backbone.families import find_thinker, text_attention_modules
from mllm_mer.data.schema import Modality

AR_PREFIX = "mllm_mer_ar_"
"""Name prefix of the registered attention functions: AR_PREFIX + the wrapped implementation."""

WRAPPABLE: tuple[str, ...] = ("sdpa", "eager")
"""Language-model attention implementations AR can wrap (they expose, or let us recompute, the weights)."""

_TINY = torch.finfo(torch.float32).tiny


@dataclass
class ARMonitor:
    """Attention shares of the targeted rows before and after reallocation, per layer (filled when `record`).

    Sums run over every call inside the block (prefill and each decoding step), the heads in `ar.heads`
    and the selected query rows that attend to at least one key. Column order: text, audio, video.
    """

    record: bool = False
    before: dict[int, Tensor] = field(default_factory=dict)
    """layer -> (B, 3) float32, summed shares before AR."""
    after: dict[int, Tensor] = field(default_factory=dict)
    """layer -> (B, 3) float32, summed shares after AR."""
    rows: dict[int, Tensor] = field(default_factory=dict)
    """layer -> (B,) float32, number of rows summed."""

    def add(self, layer: int, before: Tensor, after: Tensor, selected: Tensor) -> None:
        """Accumulate one call.

        Args:
            layer: language-model layer index.
            before: (B, H, Q, 3) float32 shares before AR.
            after: (B, H, Q, 3) float32 shares after AR.
            selected: (B, H, Q) bool, the rows to count.
        """
        weight = selected.float()[..., None]  # (B, H, Q, 1)
        b = (before * weight).sum(dim=(1, 2)).detach().cpu()  # (B, 3)
        a = (after * weight).sum(dim=(1, 2)).detach().cpu()
        n = selected.sum(dim=(1, 2)).float().cpu()  # (B,)
        if layer in self.before:
            b, a, n = b + self.before[layer], a + self.after[layer], n + self.rows[layer]
        self.before[layer], self.after[layer], self.rows[layer] = b, a, n

    def shares(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Per layer, the mean shares (before, after), each (B, 3) float32 (rows without data are NaN)."""
        out = {}
        for layer in sorted(self.before):
            n = self.rows[layer][:, None]
            out[layer] = (self.before[layer] / n, self.after[layer] / n)
        return out


@dataclass
class _Scope:
    """State of one active `attention_reallocation` block (one model)."""

    cfg: ARConfig
    layers: frozenset[int]
    heads: Tensor | None  # (H, 1) bool, or None = every head
    modality: Tensor  # (B, T) long, the prompt's token modality
    monitor: ARMonitor
    coef: Tensor  # (2,) float32 [-strength * (1 - target), strength * target]: (m_A, m_V) -> m_A' - m_A
    sign: Tensor  # (2,) float32 [1, -1]
    zero: Tensor  # () float32 0
    low: Tensor  # () float32, the most negative float32 (masked scores)
    sample_coef: Tensor | None = None  # (B, 2) per-sample coef (per-sample targets), or None = `coef`
    paused: bool = False  # inside `reallocation_paused`: every call passes through unchanged
    _buffers: dict[int, Tensor] = field(default_factory=dict)  # batch size -> (B, >= K, 2) indicators

    def coef_for(self, batch: int) -> Tensor | None:
        """The per-sample coefficients for a call with `batch` rows ((B, 2), repeated like the prompts), or None."""
        if self.sample_coef is None:
            return None
        B = self.sample_coef.shape[0]
        return self.sample_coef if batch == B else self.sample_coef.repeat_interleave(batch // B, dim=0)

    def key_indicators(self, batch: int, keys: int) -> Tensor:
        """Audio / video indicators of the keys of a call with `batch` rows and `keys` keys.

        Returns:
            (B, K, 2) float32: column 0 is 1.0 on audio keys, column 1 on video keys; keys beyond the
            prompt (generated tokens) are text (zero). A batch that is a multiple of the prompt batch (beam
            search, several sequences per prompt) repeats each sample in place.
        """
        T = self.modality.shape[1]
        if keys < T:
            raise RuntimeError(
                f"the language model attends over {keys} keys but the prompt given to attention_reallocation "
                f"has {T} tokens; enter the context with the token_modality of the batch being run"
            )
        buffer = self._buffers.get(batch)
        if buffer is None or buffer.shape[1] < keys:  # rebuilt rarely: room for K more keys each time
            B = self.modality.shape[0]
            if batch % B:
                raise RuntimeError(
                    f"attention reallocation was set up for a batch of {B} prompts but the language model "
                    f"ran a batch of {batch}; enter attention_reallocation with that batch's token_modality"
                )
            modality = self.modality.repeat_interleave(batch // B, dim=0)
            prompt = torch.stack([modality == int(Modality.AUDIO), modality == int(Modality.VIDEO)], dim=-1)
            buffer = torch.nn.functional.pad(prompt.float(), (0, 0, 0, keys))  # (B, T + K, 2), zeros past T
            self._buffers[batch] = buffer
        return buffer[:, :keys]


_SCOPES: dict[int, _Scope] = {}
"""id(text config) -> the active scope of that model; entries live only inside `attention_reallocation`."""


def _ar_attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs
) -> tuple[Tensor, Tensor | None]:
    """The registered attention function: the wrapped implementation, with AR on the targeted rows.

    Untargeted layers, and the rows before the first selected one, come from the wrapped implementation
    unchanged. The selected rows of a targeted layer are computed here (float32, eager math); when every
    row is selected (a decoding step, or `ar.query="all"`) the wrapped implementation is not called.

    Args:
        module: the language model's attention module (`layer_idx`, `num_key_value_groups`, `scaling`).
        query: (B, H, Q, D).
        key, value: (B, H_kv, T_k, D), KV cache included.
        attention_mask: what the wrapped implementation's mask function built: (B, 1, Q, T_k) bool (sdpa)
            or additive float (eager), or None (sdpa with a plain causal mask).
    Returns:
        (B, Q, H, D) attention output and the weights (B, H, Q, T_k) under eager, None under sdpa.
    """
    scope = _SCOPES.get(id(module.config))
    if scope is None:
        raise RuntimeError(
            f"attention implementation {module.config._attn_implementation!r} is only valid inside "
            "mllm_mer.attention.realloc.attention_reallocation(); it was selected outside of it"
        )
    base = _base_function(module)
    if scope.paused or module.layer_idx not in scope.layers:
        return base(module, query, key, value, attention_mask, **kwargs)
    Q, K = query.shape[2], key.shape[2]
    first = 0 if scope.cfg.query == "all" else max(0, scope.modality.shape[1] - 1 - (K - Q))  # first row
    if first >= Q:
        return base(module, query, key, value, attention_mask, **kwargs)
    scaling = kwargs.get("scaling")
    rows, weights = _reallocate(scope, module, query, key, value, attention_mask, first,
                                module.scaling if scaling is None else scaling)
    if first == 0:  # every row is ours; eager returns weights, sdpa does not
        returns_weights = module.config._attn_implementation == AR_PREFIX + "eager"
        if query.dtype != torch.float32:
            rows, weights = rows.to(query.dtype), weights.to(query.dtype)
        return rows, (weights if returns_weights else None)
    out, base_weights = base(module, query, key, value, attention_mask, **kwargs)
    out = torch.cat([out[:, :first], rows.to(out.dtype)], dim=1)
    if base_weights is not None:  # eager returns its weights: keep them consistent with the output
        base_weights = torch.cat([base_weights[:, :, :first], weights.to(base_weights.dtype)], dim=2)
    return out, base_weights


def _reallocate(
    scope: _Scope, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
    first: int, scaling: float,
) -> tuple[Tensor, Tensor]:
    """Attention of the query rows `first:` with reallocated probabilities (see the module docstring).

    Rows are handled flat, (B, H * Q_sel, T_k), with few tensor ops: while decoding this runs once per
    targeted layer and generated token.

    Returns:
        (B, Q_sel, H, D) float32 output rows (the layout of attention outputs) and their (B, H, Q_sel, T_k)
        float32 attention probabilities.
    """
    cfg = scope.cfg
    B, H, Q, D = query.shape
    H_kv, K = key.shape[1], key.shape[2]
    av = scope.key_indicators(B, K)  # (B, K, 2)
    Qs, g = Q - first, H // H_kv
    q = (_f32(query[:, :, first:] if first else query) * scaling).reshape(B * H_kv, g * Qs, D)  # h = kv*g + j
    scores = torch.bmm(q, _f32(key).reshape(B * H_kv, K, D).transpose(1, 2)).view(B, H, Qs, K)
    if mask is not None:
        m = mask[:, :, first:, :K] if first or mask.shape[-1] != K else mask
        scores = torch.where(m, scores, scope.low) if m.dtype == torch.bool else scores + _f32(m)
    elif Q > 1:  # sdpa passed no mask: plain causal attention, the query rows are the last Q positions
        rows = torch.arange(K - Qs, K, device=scores.device)
        scores = scores.masked_fill(torch.arange(K, device=scores.device) > rows[:, None], scope.low)
    scores = scores.view(B, H * Qs, K)
    probs = torch.softmax(scores, dim=-1)
    mass = torch.bmm(probs, av)  # (B, H * Qs, 2): audio and video mass of each row
    active = (mass > cfg.min_mass).all(dim=-1)  # (B, H * Qs)
    if cfg.query == "all":  # fully masked rows (left padding) stay as they are
        active = active & (scores.amax(dim=-1) > scope.low / 2)
    if scope.heads is not None:
        active = (active.view(B, H, Qs) & scope.heads).view(B, H * Qs)
    # m_A' - m_A = (s' - s)(m_A + m_V) = strength * (target * m_V - (1 - target) * m_A), moved from video
    per_sample = scope.coef_for(B)
    delta = torch.matmul(mass, scope.coef) if per_sample is None else (mass * per_sample[:, None, :]).sum(-1)
    shift = torch.where(active, delta, scope.zero)  # (B, H * Qs)
    gain = shift[..., None] * scope.sign / mass.clamp_min(_TINY)  # relative change of (m_A, m_V)
    if cfg.mode == "probs":  # p_k x (1 + gain of k's modality): s'/s on audio, (1-s')/(1-s) on video keys
        new = torch.addcmul(probs, probs, torch.bmm(gain, av.transpose(1, 2)))
    else:  # scores + |logit(s') - logit(s)| on the under-attended modality's keys, then softmax
        gap = torch.log1p(gain[..., 0]) - torch.log1p(gain[..., 1])  # logit(s') - logit(s), 0 if inactive
        bias = torch.stack([gap.clamp_min(0), (-gap).clamp_min(0)], dim=-1)  # (B, H * Qs, 2)
        new = torch.softmax(torch.baddbmm(scores, bias, av.transpose(1, 2)), dim=-1)
    if scope.monitor.record:
        valid = scores.amax(dim=-1) > scope.low / 2
        sel = valid if scope.heads is None else (valid.view(B, H, Qs) & scope.heads).view(B, H * Qs)
        scope.monitor.add(module.layer_idx, _with_text(mass).view(B, H, Qs, 3),
                          _with_text(torch.bmm(new, av)).view(B, H, Qs, 3), sel.view(B, H, Qs))
    rows_out = torch.bmm(new.view(B * H_kv, g * Qs, K), _f32(value).reshape(B * H_kv, K, D)).view(B, H, Qs, D)
    return rows_out.transpose(1, 2), new.view(B, H, Qs, K)


def _f32(x: Tensor) -> Tensor:
    """`x` as float32 (no dispatch when it already is: this runs per generated token)."""
    return x if x.dtype == torch.float32 else x.float()


def _with_text(audio_video_mass: Tensor) -> Tensor:
    """(..., 2) audio / video mass -> (..., 3) text / audio / video shares (rows sum to 1)."""
    return torch.cat([1 - audio_video_mass.sum(-1, keepdim=True), audio_video_mass], dim=-1)


def _register() -> None:
    """Register AR_PREFIX + base for every wrappable base, with the base's own mask function (idempotent)."""
    for base in WRAPPABLE:
        name = AR_PREFIX + base
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _ar_attention_forward)
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


def _base_function(module: nn.Module) -> Callable:
    """The attention function the model itself would call for the implementation AR wraps.

    The base is read from the current name at each call, so a switch from "mllm_mer_ar_sdpa" to
    "mllm_mer_ar_eager" inside the block (e.g. to read the weights) keeps AR and changes the kernel.
    """
    function = ALL_ATTENTION_FUNCTIONS.get(module.config._attn_implementation.removeprefix(AR_PREFIX))
    if function is None:  # "eager": the modeling module's own function, as the attention module does
        function = sys.modules[type(module).__module__].eager_attention_forward
    return function


def check_attn_backend(implementation: str) -> None:
    """Raise unless AR can wrap the language model's attention `implementation`.

    Raises:
        RuntimeError: a flash-attention / flex / other backend that never exposes the weights, or AR
            already active on this model.
    """
    if implementation.startswith(AR_PREFIX):
        raise RuntimeError("attention reallocation is already active on this model (blocks do not nest)")
    if implementation not in WRAPPABLE:
        raise RuntimeError(
            f"attention reallocation needs the language model's attention weights, but its backend is "
            f"{implementation!r}, which never materialises them (flash-attention / flex kernels); supported: "
            f"{list(WRAPPABLE)}. Load the backbone with model.attn_implementation=sdpa (or eager)"
        )


@contextmanager
def reallocation_paused(model: nn.Module) -> Iterator[None]:
    """Inside the block, an active AR scope of `model` leaves every call unchanged (no-op without one).

    For forwards on other prompts than the one AR was set up for, e.g. DCR's unimodal sub-batches inside a
    prediction batch's scope: AR acts on the fused prompt's answer rows only.
    """
    scope = _SCOPES.get(id(find_thinker(model).config.text_config))
    if scope is None:
        yield
        return
    previous = scope.paused
    scope.paused = True
    try:
        yield
    finally:
        scope.paused = previous


def default_layers(num_layers: int) -> tuple[int, ...]:
    """`ar.layers=None`: the middle half of the language model, layers L//4 .. 3L//4-1 (at least one)."""
    start = num_layers // 4
    return tuple(range(start, max(start + 1, (3 * num_layers) // 4)))


@contextmanager
def attention_reallocation(
    model: nn.Module, token_modality: Tensor, cfg: ARConfig, record: bool = False,
    sample_targets: tuple[Tensor, Tensor] | None = None,
) -> Iterator[ARMonitor]:
    """Apply AR to every forward of `model`'s language model inside the block (see module docstring).

    The block always applies AR (callers read `cfg.enabled`); `cfg.strength == 0` is an exact no-op. On
    exit, also through an exception, the language model's previous attention implementation is restored
    and nothing of AR remains on the model.

    Args:
        model: the thinker, a peft wrapper around it, or a `MerModel`; in eval mode.
        token_modality: (B, T) long, values in `Modality`, of the (left-padded) prompt batch that the
            forwards / `generate()` inside the block run on.
        cfg: the AR settings (`RunConfig.ar`).
        record: fill the yielded `ARMonitor` with the targeted rows' shares before and after AR.
        sample_targets: per-sample (tau (B,) in (0, 1), alpha (B,) in [0, 1]) replacing
            `cfg.target_audio_share` / `cfg.strength` for each prompt (None = the fixed ones).
    Yields:
        An `ARMonitor` (empty unless `record`).
    Raises:
        RuntimeError: unsupported attention backend (flash-attention, flex), AR already active on the
            model, or the model in training mode.
        ValueError: invalid `cfg` (e.g. a layer index outside the model) or `token_modality`.
    """
    thinker = find_thinker(model)
    text_config = thinker.config.text_config
    previous = text_config._attn_implementation
    check_attn_backend(previous)
    if thinker.training:
        raise RuntimeError("attention reallocation is an inference method: call model.eval() first")
    modules = text_attention_modules(thinker)
    problems = cfg.problems(len(modules), text_config.num_attention_heads)
    if problems:
        raise ValueError("invalid AR settings:\n" + "\n".join(f"  - {p}" for p in problems))
    if token_modality.dim() != 2 or token_modality.is_floating_point() or token_modality.dtype == torch.bool:
        raise ValueError(f"token_modality must be a (B, T) integer tensor, got {token_modality.dtype} "
                         f"{tuple(token_modality.shape)}")
    if token_modality.numel() and not 0 <= int(token_modality.min()) <= int(token_modality.max()) <= 2:
        raise ValueError("token_modality values must be Modality codes (0 text, 1 audio, 2 video)")
    layers = cfg.layers if cfg.layers is not None else default_layers(len(modules))
    heads = None
    if cfg.heads is not None:
        heads = torch.zeros(text_config.num_attention_heads, dtype=torch.bool)
        heads[list(cfg.heads)] = True
    device = next(thinker.parameters()).device
    sample_coef = None
    if sample_targets is not None:
        tau, alpha = (t.detach().to(device=device, dtype=torch.float32).reshape(-1) for t in sample_targets)
        if len(tau) != token_modality.shape[0] or len(alpha) != token_modality.shape[0]:
            raise ValueError(f"sample_targets need one (tau, alpha) per prompt ({token_modality.shape[0]}), "
                             f"got {len(tau)} / {len(alpha)}")
        if not (bool(((tau > 0) & (tau < 1)).all()) and bool(((alpha >= 0) & (alpha <= 1)).all())):
            raise ValueError("sample_targets: every tau must lie in (0, 1) and every alpha in [0, 1]")
        sample_coef = torch.stack([-alpha * (1 - tau), alpha * tau], dim=-1)  # (B, 2)
    monitor = ARMonitor(record=record)
    scope = _Scope(
        cfg=cfg,
        layers=frozenset(i % len(modules) for i in layers) if cfg.strength > 0 else frozenset(),
        heads=None if heads is None else heads.to(device)[:, None],
        modality=token_modality.to(device=device, dtype=torch.long),
        monitor=monitor,
        coef=torch.tensor([-cfg.strength * (1 - cfg.target_audio_share), cfg.strength * cfg.target_audio_share],
                          device=device),
        sign=torch.tensor([1.0, -1.0], device=device),
        zero=torch.zeros((), device=device),
        low=torch.tensor(torch.finfo(torch.float32).min, device=device),
        sample_coef=sample_coef,
    )
    _register()
    _SCOPES[id(text_config)] = scope
    try:
        thinker.set_attn_implementation({"text_config": AR_PREFIX + previous})
        yield monitor
    finally:
        try:
            thinker.set_attn_implementation({"text_config": previous})
        finally:
            del _SCOPES[id(text_config)]
