"""MerModel: the frozen backbone (with its adapters) plus the classification heads, one forward.

`build_mer_model` wraps a loaded `Backbone` with the parts the config switches on (plain LoRA via peft,
or MoSE experts when `mose.enabled`) and a fused head on modality-pooled hidden states. `MerModel.forward`
returns a `MerOutput` with the weighted total loss, the LM loss on the answer tokens, the classification
loss, logits per path and, with MoSE, the regularizers and gate statistics.
"""

from __future__ import annotations

import logging
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mllm_mer.adapters.mose import (
    MOSE_WEIGHTS,
    apply_mose,
    bound_modalities,
    checkpoint_context_fn,
    load_mose_weights,
    mose_aux_losses,
    summarize_gates,
)
from mllm_mer.backbone.families import family_of
from mllm_mer.backbone.loader import Backbone
from mllm_mer.config import RunConfig
from mllm_mer.encoders import backbone_inputs
from mllm_mer.fusion.dcr.paths import (
    PathsOutput,
    StudentFeed,
    UnimodalHead,
    attach_path_adapters,
    run_unimodal_paths,
)
from mllm_mer.fusion.dcr.paths import checkpoint_context_fn as adapter_checkpoint_context_fn
from mllm_mer.fusion.dcr.paths import loss_weights as dcr_loss_weights
from mllm_mer.fusion.dnr import DnRHead, DnROutput, ablation_rows, component_ablation, load_divide_weights
from mllm_mer.fusion.heads import FusedHead, pool_by_modality

log = logging.getLogger(__name__)

HEAD_PREFIX = "fusion_"
"""Attribute prefix of every head module on MerModel (what trains besides adapters)."""

_MODEL_INPUTS = (
    "input_ids", "attention_mask", "input_features", "feature_attention_mask", "pixel_values_videos",
    "video_grid_thw", "video_second_per_grid", "pixel_values", "image_grid_thw",
)


@dataclass
class MerOutput:
    """Everything one forward produces.

    Attributes:
        loss: scalar, weighted sum of the enabled losses (None when no targets were given).
        lm_loss: scalar LM loss on the answer tokens, or None.
        cls_loss: scalar cross-entropy of the fused head, or None.
        cls_logits: {"fused": (B, C)} float32 logits per path; with `dcr.enabled` also "text", "audio",
            "video" (the unimodal paths).
        pooled: (B, S, D) pooled hidden states fed to the heads.
        aux_losses: unweighted regularizers, e.g. {"mose_load_balance": scalar, "mose_modality_balance":
            scalar} with MoSE (their weighted sum is part of `loss` when `loss` is not None).
        gate_stats: MoSE gate statistics averaged over layers (detached; see
            `mllm_mer.adapters.mose.summarize_gates`): tokens (M,), expert_usage (M, E), gate_mass (M, E),
            modality_weights (M,), delta_share (M,); empty without MoSE.
        dnr: DnR parts, base and DnR logits (`mllm_mer.fusion.dnr.DnROutput`) when `dnr.enabled`; its
            losses are in `aux_losses` ("dnr_*") and "fused" already includes its logits.
        dcr: the unimodal paths' output (`mllm_mer.fusion.dcr.paths.PathsOutput`) when `dcr.enabled`; its
            losses are in `aux_losses` ("dcr_*") and "fused" already includes the student feed.
    """

    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    cls_loss: torch.Tensor | None
    cls_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    gate_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    dnr: DnROutput | None = None
    dcr: PathsOutput | None = None


class MerModel(nn.Module):
    """Backbone + heads. `backbone` is the (possibly peft-wrapped) thinker."""

    def __init__(self, backbone: nn.Module, hidden_size: int, num_classes: int, cfg: RunConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.fusion_head = FusedHead(hidden_size, num_classes)
        # DnR plug-in, built after fusion_head so that its initialisation does not depend on dnr.enabled
        self.fusion_dnr = DnRHead(hidden_size, num_classes, cfg.dnr) if cfg.dnr.enabled else None
        self.dcr = cfg.dcr if cfg.dcr.enabled else None
        if self.dcr is not None:  # DCR unimodal-path heads and the student feed (mllm_mer.fusion.dcr.paths)
            self.fusion_text = UnimodalHead(hidden_size, num_classes)
            self.fusion_audio = UnimodalHead(hidden_size, num_classes)
            self.fusion_video = UnimodalHead(hidden_size, num_classes)
            self.fusion_dcr_feed = StudentFeed()
        self.lm_loss_weight = cfg.train.lm_loss_weight
        self.cls_loss_weight = cfg.train.cls_loss_weight
        self.mose = cfg.mose.enabled
        self.aux_loss_weights = {
            "mose_load_balance": cfg.mose.load_balance_weight,
            "mose_modality_balance": cfg.mose.modality_balance_weight,
            **cfg.dnr.loss_weights,
            **dcr_loss_weights(cfg.dcr),
        }

    def routing(self, token_modality: torch.Tensor, collect: bool = False) -> AbstractContextManager:
        """Context binding (B, T) `token_modality` to the MoSE layers (a no-op context without MoSE).

        Wrap calls of `self.backbone` made outside `forward` in it, e.g. `self.backbone.generate(...)`.
        """
        return bound_modalities(self.backbone, token_modality, collect) if self.mose else nullcontext()

    def forward(self, batch: dict, compute_lm_loss: bool | None = None) -> MerOutput:
        """Run the backbone and the heads on a collated batch (see `mllm_mer.data.collate`).

        Args:
            batch: collator output; `labels` (B, T) and `class_id` (B,) are optional targets.
            compute_lm_loss: default: when the batch has `labels` and the LM loss weight is > 0.
        """
        inputs = backbone_inputs(self.backbone, batch, _MODEL_INPUTS)  # cache / ZeRO-3: inputs_embeds
        labels = batch.get("labels")
        if compute_lm_loss is None:
            compute_lm_loss = labels is not None and self.lm_loss_weight > 0
        with self.routing(batch["token_modality"], collect=True) as records:
            out = self.backbone(
                **inputs,
                labels=labels if compute_lm_loss else None,
                use_audio_in_video=bool(batch.get("use_audio_in_video", False)),
                output_hidden_states=True,
                use_cache=False,
            )
        aux_losses = mose_aux_losses(records) if records is not None else {}
        gate_stats = summarize_gates(records) if records is not None else {}
        hidden = out.hidden_states[-1]  # (B, T, D), after the final norm
        pooled = pool_by_modality(hidden, batch["token_modality"], batch["prompt_mask"])
        logits = self.fusion_head(pooled)
        dcr = run_unimodal_paths(self, batch) if self.dcr is not None else None
        if dcr is not None:  # unimodal paths (own adapters and heads) + AFD; the text student feeds "fused"
            if dcr.feed is not None:
                logits = logits + dcr.feed
            aux_losses = {**aux_losses, **dcr.losses}
        dnr = None
        if self.fusion_dnr is not None:  # adds its logits to "fused" (exactly 0 at initialisation); last, so
            # that its ablation (`explain`) sees every other contribution to "fused" as its base
            dnr = self.fusion_dnr(out.hidden_states, batch["token_modality"], batch["prompt_mask"], logits,
                                  batch.get("class_id"), batch.get("train_step"))
            logits = dnr.fused_logits
            aux_losses = {**aux_losses, **dnr.losses}
        cls_loss = None
        class_id = batch.get("class_id")
        if class_id is not None and (class_id >= 0).any():
            cls_loss = F.cross_entropy(logits, class_id, ignore_index=-100)
        lm_loss = out.loss if compute_lm_loss else None
        parts = []
        if lm_loss is not None:
            parts.append(self.lm_loss_weight * lm_loss)
        if cls_loss is not None and self.cls_loss_weight > 0:
            parts.append(self.cls_loss_weight * cls_loss)
        if parts:  # regularizers only join a loss that has a target
            parts.extend(self.aux_loss_weights[k] * v for k, v in aux_losses.items())
        loss = torch.stack(parts).sum() if parts else None
        return MerOutput(
            loss=loss, lm_loss=lm_loss, cls_loss=cls_loss,
            cls_logits={"fused": logits, **(dcr.logits if dcr is not None else {})}, pooled=pooled,
            aux_losses=aux_losses, gate_stats=gate_stats, dnr=dnr, dcr=dcr,
        )

    def explain(self, out: MerOutput) -> list[dict] | None:
        """Per-sample DnR component ablation of `out` (see `mllm_mer.fusion.dnr.component_ablation`).

        Returns:
            One {component: {"kl", "delta_p"}} dict per sample, or None without DnR.
        """
        if self.fusion_dnr is None or out.dnr is None:
            return None
        return ablation_rows(component_ablation(self.fusion_dnr, out.dnr))

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """State of every head (names prefixed `fusion_`), for safetensors."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k.startswith(HEAD_PREFIX)}


def apply_lora(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Wrap the thinker with a peft LoRA adapter on the language model only; returns the PeftModel.

    The regex is checked against the thinker's module names first (a match outside the language model is
    refused). peft is also given the family's `exclude_modules` (the towers): on MoE language models
    (Qwen3-Omni) peft 0.21 turns a regex into leaf names, which would silently reach the audio tower's
    `q_proj/k_proj/v_proj`. The result is checked once more: no adapter weight outside the language model.

    Raises:
        ValueError: the target regex matches no module, or matches a module outside the language model.
    """
    lcfg = cfg.lora
    family = family_of(model.config)
    pattern = re.compile(lcfg.target_modules)
    lm_prefix = family.language_model + "."
    outside = [n for n, _ in model.named_modules() if pattern.fullmatch(n) and not n.startswith(lm_prefix)]
    if outside:
        raise ValueError(f"lora.target_modules reaches modules outside the language model: {outside[:5]}")
    peft_cfg = peft.LoraConfig(
        r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=lcfg.target_modules,
        exclude_modules=family.adapter_exclude, bias="none",
    )
    try:
        wrapped = peft.get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ValueError(f"lora.target_modules={lcfg.target_modules!r} matched nothing: {exc}") from None
    outside = sorted({n.rsplit(".lora_", 1)[0] for n, _ in wrapped.named_parameters() if ".lora_" in n
                      and f".{lm_prefix}" not in n})
    if outside:
        raise ValueError(f"lora.target_modules reaches modules outside the language model: {outside[:5]}")
    return wrapped


def build_mer_model(backbone: Backbone, cfg: RunConfig, run_dir: str | Path | None = None) -> MerModel:
    """Wrap a loaded backbone with the configured parts and heads (trainability is set separately).

    Args:
        backbone: the loaded (frozen) backbone; its model is wrapped in place.
        cfg: the run config.
        run_dir: a finished run directory to load the trained adapter, heads and unfrozen base weights
            from (safetensors only); None = fresh adapters and heads.
    """
    model = backbone.model
    if cfg.mose.enabled:  # MoSE replaces plain LoRA (lora.* unused)
        targets = apply_mose(model, cfg.mose)
        log.info("MoSE on %d modules (%s routing, %d experts per modality)%s", len(targets), cfg.mose.routing,
                 cfg.mose.experts, "; it replaces plain LoRA (lora.* unused)" if cfg.lora.enabled else "")
        if run_dir is not None:
            load_mose_weights(model, Path(run_dir) / MOSE_WEIGHTS)
    elif cfg.lora.enabled:
        if run_dir is not None:
            model = peft.PeftModel.from_pretrained(model, str(Path(run_dir) / "adapter"), is_trainable=False)
        else:
            model = apply_lora(model, cfg)
    if cfg.dcr.enabled:  # one LoRA adapter per unimodal path beside "default" (mllm_mer.fusion.dcr.paths)
        attach_path_adapters(model, run_dir)
    hidden = backbone.model.config.text_config.hidden_size
    mer = MerModel(model, hidden, len(cfg.data.labels), cfg)
    if cfg.train.gradient_checkpointing:
        gc_kwargs = {"use_reentrant": False}
        if cfg.mose.enabled:  # re-bind token modalities when backward recomputes a layer
            gc_kwargs["context_fn"] = checkpoint_context_fn(backbone.model)
        elif cfg.dcr.enabled:  # recompute a layer under the peft adapter of the path that ran it
            gc_kwargs["context_fn"] = adapter_checkpoint_context_fn(model)
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        backbone.model.enable_input_require_grads()
    if run_dir is not None:
        load_run_weights(mer, run_dir)
    elif cfg.dnr.enabled and cfg.dnr.init_from:
        load_divide_weights(mer.fusion_dnr, cfg.dnr.init_from)
    if cfg.dnr.enabled and run_dir is None:
        if cfg.dnr.stage == "refine" and not cfg.dnr.init_from:
            log.warning("dnr.stage=refine without dnr.init_from: the frozen Divide heads stay random")
        if cfg.dnr.stage != "refine" and cfg.train.batch_size < 8:
            log.warning("dnr: train.batch_size=%d; the push/pull correlations are per-batch statistics and "
                        "degenerate for small batches (|corr| = 1 at 2 samples); use 8 or more",
                        cfg.train.batch_size)
    return mer


def load_run_weights(model: MerModel, run_dir: str | Path) -> None:
    """Load `heads.safetensors` (and `trainable_base.safetensors` if present) into `model`, strictly."""
    run_dir = Path(run_dir)
    heads = load_file(str(run_dir / "heads.safetensors"))
    expected = set(model.head_state_dict())
    if set(heads) != expected:
        raise ValueError(
            f"{run_dir / 'heads.safetensors'} does not match the configured heads: "
            f"missing {sorted(expected - set(heads))[:5]}, unexpected {sorted(set(heads) - expected)[:5]}"
        )
    state = dict(heads)
    base_file = run_dir / "trainable_base.safetensors"
    if base_file.is_file():
        state.update(load_file(str(base_file)))
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"weights in {run_dir} name parameters this model does not have: {unknown[:5]}")
    model.load_state_dict(state, strict=False)
