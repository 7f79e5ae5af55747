"""MerModel: the frozen backbone (with its adapters) plus the classification heads, one forward.

`build_mer_model` is the ONE place that lists the methods (`METHODS`); everything else asks
`active_methods(cfg)` (see `mllm_mer.methods` for the contract). It wraps a loaded `Backbone` with the parts
the config switches on (plain LoRA via peft or MoSE experts, per `adapter`; DCR paths; DnR parts; AR at
inference) and a fused head on modality-pooled hidden states. `MerModel.forward` returns a `MerOutput` with
the weighted total loss, the LM loss on the answer tokens, the classification loss, logits per path and the
methods' regularizers and statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mllm_mer.adapters.lora.method import LORA
from mllm_mer.adapters.mose.method import MOSE
from mllm_mer.attention.method import AR
from mllm_mer.backbone.loader import Backbone
from mllm_mer.config import RunConfig
from mllm_mer.data.collate import MODEL_INPUT_KEYS
from mllm_mer.encoders import backbone_inputs, unwrap_thinker
from mllm_mer.fusion.dcr.method import DCR
from mllm_mer.fusion.dnr.method import DNR
from mllm_mer.fusion.heads import FusedHead, pool_by_modality
from mllm_mer.methods import ForwardState, Method
from mllm_mer.rope import RopePositions

log = logging.getLogger(__name__)

METHODS: tuple[Method, ...] = (LORA, MOSE, DCR, DNR, AR)
"""Every method, in the order their hooks run (adapters before paths; DnR last in the forward, so that its
component ablation sees every other contribution to the fused logits as its base). Add a method here."""

HEAD_PREFIX = "fusion_"
"""Attribute prefix of every head module on MerModel (what trains besides adapters)."""
HEADS_FILE = "heads.safetensors"
BASE_FILE = "trainable_base.safetensors"
"""Unfrozen backbone weights of a run (`model.freeze.*` off), beside the heads."""


def active_methods(cfg: RunConfig, methods: Sequence[Method] | None = None) -> tuple[Method, ...]:
    """The methods `cfg` switches on, in `METHODS` order (or `methods`' order)."""
    return tuple(m for m in (METHODS if methods is None else methods) if m.enabled(cfg))


@dataclass
class MerOutput:
    """Everything one forward produces.

    Attributes:
        loss: scalar, weighted sum of the enabled losses (None when no targets were given).
        lm_loss: scalar LM loss on the answer tokens, or None.
        cls_loss: scalar cross-entropy of the fused head, or None.
        cls_logits: {"fused": (B, C)} float32 logits per path; methods add paths (DCR: "text", "audio", "video").
        pooled: (B, S, D) pooled hidden states fed to the heads.
        aux_losses: unweighted regularizers by name (their weighted sum is part of `loss` when it is not None);
            the weights are the active methods' `loss_weights`.
        gate_stats: detached statistics (MoSE gates, see `mllm_mer.adapters.mose.model.summarize_gates`).
        parts: per-method outputs by method name, e.g. "dcr" -> `mllm_mer.fusion.dcr.paths.PathsOutput`,
            "dnr" -> `mllm_mer.fusion.dnr.model.DnROutput`.
    """

    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    cls_loss: torch.Tensor | None
    cls_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    gate_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, Any] = field(default_factory=dict)


class MerModel(nn.Module):
    """Backbone + heads. `backbone` is the (possibly peft-wrapped) thinker.

    Args:
        backbone: the thinker, with the adapters of `methods` already applied.
        hidden_size: D of the language model.
        num_classes: C.
        cfg: the run config (kept as `self.cfg`; methods read their settings from it).
        methods: the active methods (`active_methods(cfg)`).
    """

    def __init__(
        self, backbone: nn.Module, hidden_size: int, num_classes: int, cfg: RunConfig, methods: Sequence[Method]
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.fusion_head = FusedHead(hidden_size, num_classes)
        self.cfg = cfg
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.methods: tuple[Method, ...] = tuple(methods)
        self.lm_loss_weight = cfg.train.lm_loss_weight
        self.cls_loss_weight = cfg.train.cls_loss_weight
        self.aux_loss_weights = {k: v for m in self.methods for k, v in m.loss_weights(cfg).items()}
        self.rope_positions = RopePositions()  # each distinct row's 3-D position ids, computed once

    def method(self, name: str) -> Method | None:
        """The active method called `name`, or None."""
        return next((m for m in self.methods if m.name == name), None)

    @contextmanager
    def backbone_scope(self, token_modality: torch.Tensor, collect: bool = False) -> Iterator[dict[str, Any]]:
        """Every active method's `backbone_scope` for calls of `self.backbone` inside the block (e.g. MoSE binds
        the token modalities). Wrap calls made outside `forward` in it, e.g. `self.backbone.generate(...)`.

        Args:
            token_modality: (B, T) long modality codes of the call's tokens.
            collect: ask the methods for statistics (yielded as {method name: value}).
        """
        with ExitStack() as stack:
            yield {m.name: stack.enter_context(m.backbone_scope(self, token_modality, collect)) for m in self.methods}

    def forward(self, batch: dict, compute_lm_loss: bool | None = None) -> MerOutput:
        """Run the backbone and the heads on a collated batch (see `mllm_mer.data.collate`).

        Args:
            batch: collator output; `labels` (B, T) and `class_id` (B,) are optional targets.
            compute_lm_loss: default: when the batch has `labels` and the LM loss weight is > 0.
        """
        inputs = backbone_inputs(self.backbone, batch, MODEL_INPUT_KEYS)  # cache / ZeRO-3: inputs_embeds
        fam = batch.get("feature_attention_mask")
        positions = self.rope_positions(
            unwrap_thinker(self.backbone), batch, fam.sum(dim=1) if fam is not None else None
        )
        if positions is not None:  # else the thinker computes them (get_rope_index)
            inputs["position_ids"] = positions
        labels = batch.get("labels")
        if compute_lm_loss is None:
            compute_lm_loss = labels is not None and self.lm_loss_weight > 0
        with self.backbone_scope(batch["token_modality"], collect=True) as scope:
            out = self.backbone(
                **inputs,
                labels=labels if compute_lm_loss else None,
                use_audio_in_video=bool(batch.get("use_audio_in_video", False)),
                output_hidden_states=True,
                use_cache=False,
            )
        hidden = out.hidden_states[-1]  # (B, T, D), after the final norm
        pooled = pool_by_modality(hidden, batch["token_modality"], batch["prompt_mask"])
        state = ForwardState(batch=batch, hidden_states=out.hidden_states, pooled=pooled,
                             logits=self.fusion_head(pooled), scope=scope)
        for m in self.methods:
            m.contribute(self, state)
        cls_loss = None
        class_id = batch.get("class_id")
        if class_id is not None and (class_id >= 0).any():
            cls_loss = F.cross_entropy(state.logits, class_id, ignore_index=-100)
        lm_loss = out.loss if compute_lm_loss else None
        terms = []
        if lm_loss is not None:
            terms.append(self.lm_loss_weight * lm_loss)
        if cls_loss is not None and self.cls_loss_weight > 0:
            terms.append(self.cls_loss_weight * cls_loss)
        if terms:  # regularizers only join a loss that has a target
            terms.extend(self.aux_loss_weights[k] * v for k, v in state.aux_losses.items())
        loss = torch.stack(terms).sum() if terms else None
        return MerOutput(
            loss=loss, lm_loss=lm_loss, cls_loss=cls_loss, cls_logits={"fused": state.logits, **state.path_logits},
            pooled=pooled, aux_losses=state.aux_losses, gate_stats=state.gate_stats, parts=state.parts,
        )

    def explain(self, out: MerOutput) -> dict[str, list]:
        """Per-sample explanations of the active methods for prediction rows ({row key: one value per sample},
        e.g. DnR's "dnr_ablation"); empty when no method explains."""
        rows: dict[str, list] = {}
        for m in self.methods:
            rows.update(m.explain(self, out.parts) or {})
        return rows

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """State of every head (names prefixed `fusion_`), for safetensors."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k.startswith(HEAD_PREFIX)}


class _Together(ExitStack):
    """Enters several context managers as one (for a composed checkpoint `context_fn`)."""

    def __init__(self, contexts: list[AbstractContextManager]) -> None:
        super().__init__()
        self._contexts = contexts

    def __enter__(self) -> _Together:
        super().__enter__()
        for c in self._contexts:
            self.enter_context(c)
        return self


def _composed_context_fn(fns: list[Callable]) -> Callable:
    """One checkpoint `context_fn` entering every fn's (forward, recompute) contexts together."""

    def context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
        pairs = [fn() for fn in fns]
        return _Together([f for f, _ in pairs]), _Together([r for _, r in pairs])

    return context_fn


def build_mer_model(
    backbone: Backbone, cfg: RunConfig, run_dir: str | Path | None = None, methods: Sequence[Method] | None = None
) -> MerModel:
    """Wrap a loaded backbone with the configured methods and heads (trainability is set separately).

    Args:
        backbone: the loaded (frozen) backbone; its model is adapted in place.
        cfg: the run config.
        run_dir: a finished run directory to load the trained adapters, heads and unfrozen base weights
            from (safetensors only); None = fresh adapters and heads.
        methods: the method list to choose from (default `METHODS`; tests add their own).
    """
    active = active_methods(cfg, methods)
    model = backbone.model
    for m in active:
        model = m.apply(model, cfg)
    hidden = backbone.model.config.text_config.hidden_size
    mer = MerModel(model, hidden, len(cfg.data.labels), cfg, active)
    for m in active:
        m.add_heads(mer, cfg)
    if cfg.train.gradient_checkpointing:
        gc_kwargs: dict[str, Any] = {"use_reentrant": False}
        context_fns = [fn for fn in (m.checkpoint_context(model) for m in active) if fn is not None]
        if context_fns:  # e.g. re-bind MoSE's token modalities / DCR's active adapter when backward recomputes
            gc_kwargs["context_fn"] = context_fns[0] if len(context_fns) == 1 else _composed_context_fn(context_fns)
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        backbone.model.enable_input_require_grads()
    if run_dir is not None:
        run_dir = Path(run_dir)
        for m in active:
            m.load(mer, run_dir, cfg)
        load_run_weights(mer, run_dir)
    else:
        for m in active:
            m.init_fresh(mer, cfg)
    return mer


def load_run_weights(model: MerModel, run_dir: str | Path) -> None:
    """Load `heads.safetensors` (and `trainable_base.safetensors` if present) into `model`, strictly."""
    run_dir = Path(run_dir)
    heads = load_file(str(run_dir / HEADS_FILE))
    expected = set(model.head_state_dict())
    if set(heads) != expected:
        raise ValueError(
            f"{run_dir / HEADS_FILE} does not match the configured heads: "
            f"missing {sorted(expected - set(heads))[:5]}, unexpected {sorted(set(heads) - expected)[:5]}"
        )
    state = dict(heads)
    base_file = run_dir / BASE_FILE
    if base_file.is_file():
        state.update(load_file(str(base_file)))
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"weights in {run_dir} name parameters this model does not have: {unknown[:5]}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatch, e.g. other data.labels (torch's message spans lines)
        detail = " ".join(str(exc).split())[:300]
        raise ValueError(f"the weights in {run_dir} do not fit the configured model: {detail}") from None
