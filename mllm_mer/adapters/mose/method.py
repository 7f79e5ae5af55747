"""The `MOSE` method (`adapter: mose`): modality-specific LoRA experts injected into the thinker.

Hooks: `apply` injects `MoSELinear` layers (`apply_mose`), `backbone_scope` binds each call's token
modalities to them (`bound_modalities`), `contribute` turns the routing records of the fused call into the
regularizers and gate statistics, `save` / `load` use `mose.safetensors` (config in its metadata).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from mllm_mer.adapters.mose.model import (
    MOSE_WEIGHTS,
    PARAM_MARK,
    apply_mose,
    bound_modalities,
    checkpoint_context_fn,
    load_mose_weights,
    mose_aux_losses,
    save_mose_weights,
    summarize_gates,
)
from mllm_mer.config import RunConfig
from mllm_mer.methods import ForwardState, Method

log = logging.getLogger(__name__)


class MoSEMethod(Method):
    """MoSE experts on `mose.target_modules`, routed by each token's modality."""

    name = "mose"
    section = "mose"
    param_marker = PARAM_MARK
    weights_file = MOSE_WEIGHTS

    def enabled(self, cfg: RunConfig) -> bool:
        return cfg.adapter == "mose"

    def apply(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        targets = apply_mose(model, cfg.mose)
        log.info("MoSE on %d modules (%s routing, %d experts per modality)", len(targets), cfg.mose.routing,
                 cfg.mose.experts)
        return model

    def checkpoint_context(self, model: nn.Module):
        return checkpoint_context_fn(model)

    def backbone_scope(self, mer: nn.Module, token_modality: torch.Tensor, collect: bool) -> AbstractContextManager:
        return bound_modalities(mer.backbone, token_modality, collect)

    def contribute(self, mer: nn.Module, state: ForwardState) -> None:
        records = state.scope.get(self.name)
        if records:
            state.aux_losses.update(mose_aux_losses(records))
            state.gate_stats.update(summarize_gates(records))

    def save(self, mer: nn.Module, state: dict[str, torch.Tensor], out_dir: Path, cfg: RunConfig) -> None:
        save_mose_weights(self.state_dict(mer, state), out_dir / MOSE_WEIGHTS, cfg.mose)

    def load(self, mer: nn.Module, run_dir: Path, cfg: RunConfig) -> None:
        load_mose_weights(mer.backbone, run_dir / MOSE_WEIGHTS)

    def export_note(self, cfg: RunConfig) -> str:
        return "MoSE modality-routed experts (mose.safetensors; routing needs token_modality)"


MOSE = MoSEMethod()
