"""Attention share per modality: how much of a query position's attention mass lands on text / audio / video.

`attention_shares(model, batch)` runs one forward of the thinker (bare, peft-wrapped, or inside a
`MerModel`) and returns, for every language-model layer, the mean over heads (and over samples) of the
fraction of the query position's attention mass that falls on text, audio and video key tokens
(`token_modality`; padding keys excluded via `attention_mask`). The default query is the last prompt
position, i.e. the position that generates the answer.

How the weights are read (transformers 5.23): `sdpa` and the flash/flex kernels never materialise the
attention matrix (`output_attentions=True` under sdpa returns an empty tuple and warns), while the
`eager` attention function returns it from every language-model attention call (`Qwen2_5OmniAttention`,
`Qwen3OmniMoeThinkerTextAttention`). So, for one call, the
language model is switched to `eager` with `set_attn_implementation({"text_config": "eager"})` (only the
language model: the towers keep their kernels) and the previous implementation is restored in `finally`.
Attention reallocation on sdpa ("mllm_mer_ar_sdpa") is swapped the same way for its eager twin
(`WEIGHT_RETURNING_TWIN`), which keeps AR and returns the reallocated weights, so shares can be measured
inside `attention_reallocation(...)`. Any other implementation is kept and must return its weights.

Instead of `output_attentions=True`, which keeps every layer's (B, H, T, T) matrix alive until the end of
the forward (gigabytes on a 7B model), a forward hook on each language-model attention module reduces
its weights to (B, 3) shares as soon as they exist; the hooks live for this one call. The result equals
the reduction of `output_attentions` (unit-tested).

`plot_shares` draws the per-layer audio and video shares of several conditions (e.g. before/after).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypedDict

import torch
from torch import Tensor, nn

from mllm_mer.backbone.families import find_thinker, text_attention_modules
from mllm_mer.data.collate import model_inputs
from mllm_mer.data.schema import Modality
from mllm_mer.model import MerModel

MODALITIES: tuple[str, ...] = tuple(m.key for m in Modality)
"""Column order of every share tensor: ("text", "audio", "video")."""

NO_WEIGHT_IMPLEMENTATIONS: frozenset[str] = frozenset(
    {"sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"}
)
"""Attention backends that never return weights; switched to "eager" for the duration of one call."""

WEIGHT_RETURNING_TWIN: dict[str, str] = {"mllm_mer_ar_sdpa": "mllm_mer_ar_eager"}
"""Registered functions without weights and their weight-returning twin (AR on sdpa -> AR on eager), so
shares can be measured while attention reallocation is active."""



class AttentionShares(TypedDict):
    """What `attention_shares` returns.

    Attributes:
        shares: (L, 3) float32, mean over samples of `per_sample`; columns in `MODALITIES` order.
        per_sample: (B, L, 3) float32, per sample and layer, the mean over heads and selected query
            positions of the share of attention mass on text / audio / video keys (rows sum to 1).
        modalities: the column names, `MODALITIES`.
    """

    shares: Tensor
    per_sample: Tensor
    modalities: tuple[str, ...]


@contextmanager
def weights_returning_attention(model: nn.Module) -> Iterator[str]:
    """Make the language model's attention return its weights for the duration of the block.

    A backend in `NO_WEIGHT_IMPLEMENTATIONS` is replaced by "eager", one in `WEIGHT_RETURNING_TWIN` by its
    twin, for the language model only, and restored in `finally` (also on error); any other backend is
    left untouched.

    Args:
        model: the thinker, a peft wrapper around it, or a `MerModel`.
    Yields:
        The language model's attention implementation inside the block.
    """
    thinker = find_thinker(model)
    previous = thinker.config.text_config._attn_implementation
    replacement = WEIGHT_RETURNING_TWIN.get(previous, "eager")
    if previous not in NO_WEIGHT_IMPLEMENTATIONS and previous not in WEIGHT_RETURNING_TWIN:
        yield previous
        return
    thinker.set_attn_implementation({"text_config": replacement})
    try:
        yield replacement
    finally:
        thinker.set_attn_implementation({"text_config": previous})


def query_mask_for(batch: Mapping, query: str | Tensor = "last") -> Tensor:
    """The (B, T) bool mask of query positions whose attention is measured.

    Args:
        batch: collator output with `attention_mask` (B, T) and `prompt_mask` (B, T) bool.
        query: "last" = the last prompt position of each sample (the generating position: the last
            token of a left-padded inference batch, the token before the answer in a training batch),
            or a (B, T) bool mask; padding positions are removed from it.
    Returns:
        (B, T) bool.
    Raises:
        ValueError: unknown `query` string, wrong mask shape, or a sample without any query position.
    """
    attention = batch["attention_mask"].bool()
    B, T = attention.shape
    if isinstance(query, str):
        if query != "last":
            raise ValueError(f"query={query!r} unknown; valid: 'last' or a (B, T) bool tensor")
        prompt = batch.get("prompt_mask")
        prompt = attention if prompt is None else prompt.bool() & attention
        positions = torch.arange(T, device=attention.device).expand(B, T)
        last = torch.where(prompt, positions, torch.full_like(positions, -1)).amax(dim=1)  # (B,)
        mask = positions == last[:, None]
    else:
        if query.shape != (B, T):
            raise ValueError(f"query mask has shape {tuple(query.shape)}; expected (B, T) = {(B, T)}")
        mask = query.bool().to(attention.device)
    mask = mask & attention
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"samples {empty} of the batch have no (non-padding) query position")
    return mask


def shares_from_weights(weights: Tensor, key_onehot: Tensor, query_mask: Tensor) -> Tensor:
    """Reduce one layer's attention weights to per-sample modality shares.

    Args:
        weights: (B, H, T_q, T_k) attention probabilities (rows sum to 1 over keys).
        key_onehot: (B, T_k, 3) float32, one-hot modality of every key, all zero on padding keys.
        query_mask: (B, T_q) bool, the query positions to average over (at least one per sample).
    Returns:
        (B, 3) float32: per sample, mean over heads and selected queries of each modality's share of
        the mass on non-padding keys (sums to 1).
    """
    rows = query_mask.nonzero(as_tuple=True)  # selected (b, q) pairs, Q of them
    w = weights[rows[0], :, rows[1], :].float()  # (Q, H, T_k)
    mass = torch.einsum("qhk,qkm->qhm", w, key_onehot[rows[0]])  # (Q, H, 3)
    total = mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    share = (mass / total).mean(dim=1)  # (Q, 3): mean over heads
    out = torch.zeros(query_mask.shape[0], 3, dtype=torch.float32, device=share.device)
    out.index_add_(0, rows[0], share)
    return out / query_mask.sum(dim=1, keepdim=True).to(out.dtype)


def _run_forward(model: nn.Module, batch: Mapping) -> None:
    if isinstance(model, MerModel):
        model(batch, compute_lm_loss=False)
        return
    model(**model_inputs(batch), use_audio_in_video=bool(batch.get("use_audio_in_video", False)), use_cache=False)


@torch.no_grad()
def attention_shares(model: nn.Module, batch: Mapping, query: str | Tensor = "last") -> AttentionShares:
    """Per-layer share of the query positions' attention mass on text / audio / video tokens.

    Runs one forward (no gradients) of `model`: a `MerModel` through its own forward (so adapters and
    any method-specific routing are active), anything else (the thinker or a peft wrapper) with the
    batch's model inputs. Put the model in eval mode first (attention dropout would perturb the shares).
    The model is left as it was: same attention implementation, no hooks.

    Args:
        model: the thinker, a peft-wrapped thinker, or a `MerModel`.
        batch: collator output (`mllm_mer.data.collate`): model inputs plus `token_modality` (B, T) long,
            `attention_mask` (B, T) and `prompt_mask` (B, T) bool.
        query: "last" (the last prompt position, default) or a (B, T) bool mask of query positions
            (padding positions are ignored); see `query_mask_for`.
    Returns:
        `AttentionShares`: `shares` (L, 3), `per_sample` (B, L, 3), `modalities`.
    Raises:
        ValueError: bad `query`.
        TypeError: no thinker inside `model`.
        RuntimeError: the active attention implementation returned no weights.
    """
    query_mask = query_mask_for(batch, query)
    key_valid = batch["attention_mask"].bool()  # (B, T)
    key_onehot = torch.nn.functional.one_hot(batch["token_modality"].long(), len(MODALITIES)).float()
    key_onehot = key_onehot * key_valid[..., None].float()  # (B, T, 3), zero on padding keys
    modules = text_attention_modules(find_thinker(model))
    per_layer: list[Tensor | None] = [None] * len(modules)

    def hook(index: int, module: nn.Module, args: tuple, output: tuple) -> None:
        weights = output[1]
        if weights is None:
            raise RuntimeError(
                f"language-model layer {index} returned no attention weights under attn_implementation="
                f"{find_thinker(model).config.text_config._attn_implementation!r}; a function that wraps "
                "sdpa must have an eager twin in WEIGHT_RETURNING_TWIN, or be entered inside "
                "weights_returning_attention(model) so that it wraps eager"
            )
        per_layer[index] = shares_from_weights(
            weights, key_onehot.to(weights.device), query_mask.to(weights.device)
        ).cpu()

    handles = []
    try:
        with weights_returning_attention(model):
            for i, module in enumerate(modules):
                handles.append(module.register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o)))
            _run_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, s in enumerate(per_layer) if s is None]
    if missing:
        raise RuntimeError(f"language-model layers {missing} did not run during the forward")
    per_sample = torch.stack(per_layer, dim=1)  # L x (B, 3) -> (B, L, 3)
    return AttentionShares(shares=per_sample.mean(dim=0), per_sample=per_sample, modalities=MODALITIES)


def collect_attention_shares(model: nn.Module, batches: Iterable[Mapping], query: str = "last") -> Tensor:
    """`attention_shares(...)["per_sample"]` of every batch, concatenated in order.

    Args:
        model: as for `attention_shares`.
        batches: collator outputs (e.g. a DataLoader).
        query: as for `attention_shares` (a string: masks differ per batch).
    Returns:
        (N, L, 3) float32, N = total number of samples.
    """
    return torch.cat([attention_shares(model, batch, query)["per_sample"] for batch in batches], dim=0)


def plot_shares(shares_by_name: Mapping[str, Tensor], path: str | Path, title: str | None = None) -> Path:
    """Line plots of the audio and video attention share per layer, one line per condition.

    Args:
        shares_by_name: {condition name: (L, 3) shares in `MODALITIES` order}, e.g.
            {"backbone": ..., "fine-tuned": ...}.
        path: output image file (PNG by extension); parent directories are created.
        title: optional figure title.
    Returns:
        `path` as a Path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not shares_by_name:
        raise ValueError("plot_shares needs at least one condition")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, modality in zip(axes, (Modality.AUDIO, Modality.VIDEO), strict=True):
        for name, shares in shares_by_name.items():
            values = torch.as_tensor(shares, dtype=torch.float32)[:, int(modality)]
            ax.plot(range(len(values)), values.tolist(), marker="o", label=name)
        ax.set_title(f"{modality.key} tokens")
        ax.set_xlabel("language-model layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of attention mass")
    axes[0].set_ylim(0.0, 1.0)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
