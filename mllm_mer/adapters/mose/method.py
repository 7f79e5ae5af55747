"""The `MOSE` method (`adapter: mose`): modality-specific LoRA experts injected into the thinker.

Hooks: `apply` injects `MoSELinear` layers (`apply_mose`), `backbone_scope` binds each call's token
modalities to them (`bound_modalities`), `contribute` turns the routing records of the fused call into the
regularizers and gate statistics and, with `mose.decision_balance_weight` > 0, runs the training batch again
without audio and without video (`wrap_collator` adds those sub-batches) for the decision-balance loss;
`save` / `load` use `mose.safetensors` (config in its metadata).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from mllm_mer.adapters.mose.collate import MASKED_INPUTS, MaskedModalityCollator
from mllm_mer.adapters.mose.model import (
    MOSE_WEIGHTS,
    PARAM_MARK,
    answer_logprob,
    apply_mose,
    bound_modalities,
    checkpoint_context_fn,
    decision_balance_loss,
    load_mose_weights,
    mose_aux_losses,
    save_mose_weights,
    summarize_gates,
)
from mllm_mer.config import RunConfig
from mllm_mer.data.collate import MODEL_INPUT_KEYS, MerCollator
from mllm_mer.data.schema import Modality
from mllm_mer.encoders import backbone_inputs
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
        labels = state.batch.get("labels")
        if mer.cfg.mose.decision_balance_weight > 0 and labels is not None and (labels != -100).any():
            loss, shares = self._decision_balance(mer, state)
            state.aux_losses["mose_decision_balance"] = loss
            state.gate_stats["decision_change"] = torch.cat([shares.new_zeros(1), shares])  # (M,): 0, D_a, D_v

    @staticmethod
    def _decision_balance(mer: nn.Module, state: ForwardState) -> tuple[torch.Tensor, torch.Tensor]:
        """The decision-balance loss of a training batch (see `mllm_mer.adapters.mose.model`)."""
        batch = state.batch
        masked = batch.get("mose_masked")
        if masked is None:
            raise ValueError(
                "mose.decision_balance_weight > 0 but the training batch has no 'mose_masked' sub-batches: build "
                "the collator with mllm_mer.data.loading.build_collator (or set mose.decision_balance_weight=0)"
            )
        lm_head = mer.backbone.get_output_embeddings()
        full = answer_logprob(state.hidden_states[-1], batch["labels"], lm_head)
        without, present = {}, {}
        for removed in MASKED_INPUTS:
            sub = masked[removed]
            if list(sub["sample_ids"]) != list(batch["sample_ids"]):
                raise ValueError(f"the 'mose_masked.{removed}' sub-batch holds other samples than the batch")
            inputs = backbone_inputs(mer.backbone, sub, MODEL_INPUT_KEYS)
            with mer.backbone_scope(sub["token_modality"]):
                out = mer.backbone(**inputs, use_audio_in_video=bool(sub.get("use_audio_in_video", False)),
                                   output_hidden_states=True, use_cache=False)
            without[removed] = answer_logprob(out.hidden_states[-1], sub["labels"], lm_head)
            code = int(Modality.AUDIO if removed == "audio" else Modality.VIDEO)
            present[removed] = ((batch["token_modality"] == code) & batch["prompt_mask"]).any(1)
        return decision_balance_loss(full, without, present)

    def wrap_collator(self, collator, cfg: RunConfig):
        if cfg.mose.decision_balance_weight > 0 and isinstance(collator, MerCollator) and collator.train:
            return MaskedModalityCollator(collator)
        return collator

    def input_variants(self, cfg: RunConfig) -> set[tuple[bool, bool]]:
        return set(MASKED_INPUTS.values()) if cfg.mose.decision_balance_weight > 0 else set()

    def save(self, mer: nn.Module, state: dict[str, torch.Tensor], out_dir: Path, cfg: RunConfig) -> None:
        save_mose_weights(self.state_dict(mer, state), out_dir / MOSE_WEIGHTS, cfg.mose)

    def load(self, mer: nn.Module, run_dir: Path, cfg: RunConfig) -> None:
        load_mose_weights(mer.backbone, run_dir / MOSE_WEIGHTS)

    def export_note(self, cfg: RunConfig) -> str:
        return "MoSE modality-routed experts (mose.safetensors; routing needs token_modality)"


MOSE = MoSEMethod()
