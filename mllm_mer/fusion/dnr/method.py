"""The `DNR` method (`dnr.enabled`): divide-and-refine parts, read by a head beside the fused head's pooled states.

Hooks: `add_heads` builds `fusion_dnr` (`mllm_mer.fusion.dnr.model.DnRHead`), `init_fresh` loads the Divide
weights of `dnr.init_from` and warns about settings that degrade DnR, `contribute` runs it last in the forward
(so that its component ablation sees every other contribution to the fused logits as its base), `explain`
adds the per-sample component ablation (`dnr_ablation`) to prediction rows, and `frozen_prefixes` keeps the
Divide heads frozen in `dnr.stage: refine`. Its weights are heads (`heads.safetensors`).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from mllm_mer.config import RunConfig
from mllm_mer.fusion.dnr.model import DnRHead, ablation_rows, component_ablation, load_divide_weights
from mllm_mer.methods import ForwardState, Method

log = logging.getLogger(__name__)


class DnRMethod(Method):
    """Divide and Refine (WACV 2026) on the backbone's pooled hidden states; see `mllm_mer.fusion.dnr`."""

    name = "dnr"
    section = "dnr"

    def frozen_prefixes(self, cfg: RunConfig) -> tuple[str, ...]:
        return cfg.dnr.frozen_prefixes()

    def add_heads(self, mer: nn.Module, cfg: RunConfig) -> None:
        mer.fusion_dnr = DnRHead(mer.hidden_size, mer.num_classes, cfg.dnr)

    def init_fresh(self, mer: nn.Module, cfg: RunConfig) -> None:
        if cfg.dnr.init_from:
            load_divide_weights(mer.fusion_dnr, cfg.dnr.init_from)
            if cfg.dnr.stage == "phased":
                log.warning("dnr.init_from with dnr.stage=phased: the loaded Divide heads are divided again "
                            "before Refine; use dnr.stage=refine to refine them directly")
        elif cfg.dnr.stage == "refine":
            log.warning("dnr.stage=refine without dnr.init_from: the frozen Divide heads stay random")
        if cfg.dnr.stage != "refine" and cfg.train.batch_size < 8:
            log.warning("dnr: train.batch_size=%d; the push/pull correlations are per-batch statistics and "
                        "degenerate for small batches (|corr| = 1 at 2 samples); use 8 or more", cfg.train.batch_size)

    def contribute(self, mer: nn.Module, state: ForwardState) -> None:
        batch = state.batch
        out = mer.fusion_dnr(state.hidden_states, batch["token_modality"], batch["prompt_mask"], state.logits,
                             batch.get("class_id"), batch.get("train_step"), pooled=state.pooled,
                             total_steps=batch.get("train_steps_total"))
        state.logits = out.fused_logits
        state.aux_losses.update(out.losses)
        state.parts[self.name] = out

    def explain(self, mer: nn.Module, parts: dict[str, Any]) -> dict[str, list] | None:
        out = parts.get(self.name)
        if out is None:
            return None
        return {"dnr_ablation": ablation_rows(component_ablation(mer.fusion_dnr, out))}

    def export_note(self, cfg: RunConfig) -> str:
        return "DnR divide-and-refine parts (in heads.safetensors)"


DNR = DnRMethod()
