"""The `AR` method (`ar.enabled`): attention reallocation while generating / predicting; no weights, no loss."""

from __future__ import annotations

from contextlib import AbstractContextManager

from torch import nn

from mllm_mer.attention.realloc import attention_reallocation
from mllm_mer.config import RunConfig
from mllm_mer.methods import Method


class ARMethod(Method):
    """Training-free: only `inference_scope` (the scoped attention function of `mllm_mer.attention.realloc`)."""

    name = "ar"
    section = "ar"
    inference_only = True

    def inference_scope(self, model: nn.Module, batch: dict, cfg: RunConfig) -> AbstractContextManager:
        return attention_reallocation(model, batch["token_modality"], cfg.ar)

    def export_note(self, cfg: RunConfig) -> str:
        return "AR attention reallocation (an inference-time attention function, no weights)"


AR = ARMethod()
