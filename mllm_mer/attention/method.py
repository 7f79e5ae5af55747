"""The `AR` method (`ar.enabled`): attention reallocation while generating / predicting; no weights, no loss.

With `ar.target_mode: paths` the scope first runs the trained model's DCR audio and video paths on the batch
(no AR; prompt-only passes; neither the text path nor the fused model is run) and takes each clip's target
and strength from their probabilities (`mllm_mer.attention.sample`); with `ar.sample_confidence: reliability`
(or `auto`, the default, when the run's reliability heads are fitted) the target's confidences are the paths'
fitted reliabilities from the same pass. Inside the DCR method's own scope (which
`mllm_mer.generation.inference_scope` enters first) that pass is kept for the batch, so the heads' forward
that follows reuses it instead of running the two paths again (`reusing_path_runs`). A batch in which no
prompt has both audio and video tokens (e.g. the arbiter's one-modality re-answers) skips the pass: AR moves
no mass in a row that lacks either modality (`ar.min_mass`), whatever the targets.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from mllm_mer.attention.realloc import attention_reallocation
from mllm_mer.attention.sample import sample_targets
from mllm_mer.config import RunConfig
from mllm_mer.data.schema import Modality
from mllm_mer.fusion.dcr.paths import run_unimodal_paths
from mllm_mer.methods import Method


class ARMethod(Method):
    """Training-free: only `inference_scope` (the scoped attention function of `mllm_mer.attention.realloc`)."""

    name = "ar"
    section = "ar"
    inference_only = True

    def inference_scope(
        self, model: nn.Module, batch: dict, cfg: RunConfig, mer: nn.Module | None = None
    ) -> AbstractContextManager:
        targets = None
        modality = batch["token_modality"]  # (B, T)
        if cfg.ar.target_mode == "paths" and cfg.ar.strength > 0:  # strength 0: an exact no-op, no first pass
            if mer is None or not cfg.dcr.enabled:
                raise ValueError("ar.target_mode=paths takes each clip's target from the unimodal audio and video "
                                 "paths: it needs a run trained with dcr.enabled=true (or use ar.target_mode=fixed)")
            if not ((modality == Modality.AUDIO).any(1) & (modality == Modality.VIDEO).any(1)).any():
                # no prompt has both modalities: AR moves nothing whatever the targets, so no first pass
                targets = (torch.full((len(modality),), 0.5), torch.zeros(len(modality)))
                return attention_reallocation(model, modality, cfg.ar, sample_targets=targets)
            with torch.no_grad():  # the unimodal paths alone (prompt-only passes), not the fused model
                paths = run_unimodal_paths(mer, {k: v for k, v in batch.items() if k != "class_id"},
                                           only=("audio", "video"))
            confidence = None
            fitted = all(p in paths.reliability for p in ("audio", "video"))
            if cfg.ar.sample_confidence == "reliability" and not fitted:
                raise ValueError("ar.sample_confidence=reliability needs the audio and video reliability heads "
                                 "of a run trained with dcr.reliability=true (or set ar.sample_confidence="
                                 "max_prob or auto)")
            if cfg.ar.sample_confidence != "max_prob" and fitted:  # "reliability", or "auto" with fitted heads
                confidence = (paths.reliability["audio"], paths.reliability["video"])
            p_audio, p_video = (torch.softmax(paths.logits[m], -1) for m in ("audio", "video"))
            targets = sample_targets(p_audio, p_video, cfg.ar.strength, cfg.ar.sample_sharpness, confidence)
        return attention_reallocation(model, modality, cfg.ar, sample_targets=targets)

    def export_note(self, cfg: RunConfig) -> str:
        return "AR attention reallocation (an inference-time attention function, no weights)"


AR = ARMethod()
