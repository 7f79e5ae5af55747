"""MerModel: the frozen backbone (with its adapters) plus the classification heads, one forward.

`build_mer_model` wraps a loaded `Backbone` with the parts the config switches on (plain LoRA via peft
today) and a fused head on modality-pooled hidden states. `MerModel.forward` returns a `MerOutput` with
the weighted total loss, the LM loss on the answer tokens, the classification loss and logits per path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mllm_mer.backbone.loader import Backbone
from mllm_mer.config import RunConfig
from mllm_mer.fusion.heads import FusedHead, pool_by_modality

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
        cls_logits: {"fused": (B, C)} float32 logits per path.
        pooled: (B, S, D) pooled hidden states fed to the heads.
    """

    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    cls_loss: torch.Tensor | None
    cls_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled: torch.Tensor | None = None


class MerModel(nn.Module):
    """Backbone + heads. `backbone` is the (possibly peft-wrapped) thinker."""

    def __init__(self, backbone: nn.Module, hidden_size: int, num_classes: int, cfg: RunConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.fusion_head = FusedHead(hidden_size, num_classes)
        self.lm_loss_weight = cfg.train.lm_loss_weight
        self.cls_loss_weight = cfg.train.cls_loss_weight

    def forward(self, batch: dict, compute_lm_loss: bool | None = None) -> MerOutput:
        """Run the backbone and the heads on a collated batch (see `mllm_mer.data.collate`).

        Args:
            batch: collator output; `labels` (B, T) and `class_id` (B,) are optional targets.
            compute_lm_loss: default: when the batch has `labels` and the LM loss weight is > 0.
        """
        inputs = {k: batch[k] for k in _MODEL_INPUTS if batch.get(k) is not None}
        labels = batch.get("labels")
        if compute_lm_loss is None:
            compute_lm_loss = labels is not None and self.lm_loss_weight > 0
        out = self.backbone(
            **inputs,
            labels=labels if compute_lm_loss else None,
            use_audio_in_video=bool(batch.get("use_audio_in_video", False)),
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = out.hidden_states[-1]  # (B, T, D), after the final norm
        pooled = pool_by_modality(hidden, batch["token_modality"], batch["prompt_mask"])
        logits = self.fusion_head(pooled)
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
        loss = torch.stack(parts).sum() if parts else None
        return MerOutput(loss=loss, lm_loss=lm_loss, cls_loss=cls_loss, cls_logits={"fused": logits}, pooled=pooled)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """State of every head (names prefixed `fusion_`), for safetensors."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k.startswith(HEAD_PREFIX)}


def apply_lora(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Wrap the thinker with a peft LoRA adapter on the language model only; returns the PeftModel.

    Raises:
        ValueError: the target regex matches no module, or matches a module outside the language model.
    """
    lcfg = cfg.lora
    peft_cfg = peft.LoraConfig(
        r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=lcfg.target_modules,
        bias="none",
    )
    try:
        wrapped = peft.get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ValueError(f"lora.target_modules={lcfg.target_modules!r} matched nothing: {exc}") from None
    outside = sorted({n.rsplit(".lora_", 1)[0] for n, _ in wrapped.named_parameters() if ".lora_" in n
                      and ".language_model." not in n})
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
    if cfg.lora.enabled:
        if run_dir is not None:
            model = peft.PeftModel.from_pretrained(model, str(Path(run_dir) / "adapter"), is_trainable=False)
        else:
            model = apply_lora(model, cfg)
    hidden = backbone.model.config.text_config.hidden_size
    mer = MerModel(model, hidden, len(cfg.data.labels), cfg)
    if cfg.train.gradient_checkpointing:
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        backbone.model.enable_input_require_grads()
    if run_dir is not None:
        load_run_weights(mer, run_dir)
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
