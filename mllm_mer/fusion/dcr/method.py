"""The `DCR` method (`dcr.enabled`): unimodal paths with their own adapters and heads, AFD and the student feed.

Hooks: `apply` adds one peft LoRA adapter per path (`mllm_mer.fusion.dcr.paths.attach_path_adapters`),
`add_heads` the path heads and the student feed, `contribute` runs the paths on the batch's unimodal
sub-batches (`wrap_collator` adds them; `input_variants` tells the frozen-encoder cache which prompt variants
they need) and adds their logits, losses and feed; `inference_scope` lets the paths run once per batch when
predicting (`reusing_path_runs`). The path adapters are saved by peft with the "default"
adapter (`adapter/dcr_<path>/`) and loaded back here. The ADA arbiter is fitted after training
(`scripts/fit_arbiter.py`, `arbiter.json`) and read by `mllm_mer.generation`; `after_training` fits the
reliability heads it can read (`dcr.reliability`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import peft
from torch import nn

from mllm_mer.adapters.lora.method import ADAPTER_DIR, ADAPTER_WEIGHTS, load_adapter_weights
from mllm_mer.config import RunConfig
from mllm_mer.fusion.dcr.collate import PATH_INPUTS, UnimodalPathCollator
from mllm_mer.fusion.dcr.config import PATHS
from mllm_mer.fusion.dcr.paths import (
    ReliabilityHead,
    StudentFeed,
    UnimodalHead,
    adapter_name,
    attach_path_adapters,
    checkpoint_context_fn,
    reliability_name,
    reusing_path_runs,
    run_unimodal_paths,
)
from mllm_mer.fusion.dcr.reliability import fit_reliability
from mllm_mer.methods import ForwardState, Method


class DCRMethod(Method):
    """Dual-path conflict resolution (after "To Fuse or to Drop?", 2026); see `mllm_mer.fusion.dcr`."""

    name = "dcr"
    section = "dcr"

    def apply(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        attach_path_adapters(model)
        return model

    def add_heads(self, mer: nn.Module, cfg: RunConfig) -> None:
        for path in PATHS:
            setattr(mer, f"fusion_{path}", UnimodalHead(mer.hidden_size, mer.num_classes))
        mer.fusion_dcr_feed = StudentFeed()
        if cfg.dcr.reliability:
            for path in PATHS:
                setattr(mer, reliability_name(path), ReliabilityHead(mer.hidden_size))

    def checkpoint_context(self, model: nn.Module):
        return checkpoint_context_fn(model) if isinstance(model, peft.PeftModel) else None

    def contribute(self, mer: nn.Module, state: ForwardState) -> None:
        paths = run_unimodal_paths(mer, state.batch)
        if paths.feed is not None:  # the text student feeds "fused"
            state.logits = state.logits + paths.feed
        state.path_logits.update(paths.logits)
        state.aux_losses.update(paths.losses)
        state.parts[self.name] = paths

    def inference_scope(
        self, model: nn.Module, batch: dict, cfg: RunConfig, mer: nn.Module | None = None
    ) -> AbstractContextManager:
        """A trained run's paths run once per batch inside the scope (`reusing_path_runs`): e.g. per-sample AR's
        first pass over the audio and video paths also serves the heads' forward."""
        return reusing_path_runs(mer) if mer is not None else nullcontext()

    def explain(self, mer: nn.Module, parts: dict[str, Any]) -> dict[str, list] | None:
        """Rows get "reliability": {path: predicted reliability} per sample (with reliability heads)."""
        paths = parts.get(self.name)
        if paths is None or not paths.reliability:
            return None
        values = {p: r.detach().float().cpu().tolist() for p, r in paths.reliability.items()}
        n = len(next(iter(values.values())))
        return {"reliability": [{p: v[i] for p, v in values.items()} for i in range(n)]}

    def after_training(self, model: nn.Module, mer: nn.Module, batches, accelerator, cfg: RunConfig) -> dict | None:
        """Fit the reliability heads on the training batches (`mllm_mer.fusion.dcr.reliability`)."""
        if not cfg.dcr.reliability:
            return None
        return {"dcr_reliability": fit_reliability(model, mer, batches, accelerator)}

    def wrap_collator(self, collator, cfg: RunConfig):
        return UnimodalPathCollator(collator)

    def input_variants(self, cfg: RunConfig) -> set[tuple[bool, bool]]:
        return set(PATH_INPUTS.values())

    def files(self, cfg: RunConfig) -> tuple[str, ...]:
        if cfg.adapter != "lora":  # the paths share the backbone's adapter (see attach_path_adapters)
            return ()
        return tuple(f"{ADAPTER_DIR}/{adapter_name(p)}/{name}" for p in PATHS
                     for name in ("adapter_config.json", ADAPTER_WEIGHTS))

    def load(self, mer: nn.Module, run_dir: Path, cfg: RunConfig) -> None:
        if isinstance(mer.backbone, peft.PeftModel):
            for path in PATHS:
                load_adapter_weights(mer.backbone, run_dir / ADAPTER_DIR / adapter_name(path), adapter_name(path),
                                     "the run was not trained with dcr.enabled=true (or is incomplete)")

    def export_note(self, cfg: RunConfig) -> str:
        return "DCR unimodal paths and the ADA arbiter (adapter/<path>, arbiter.json)"


DCR = DCRMethod()
