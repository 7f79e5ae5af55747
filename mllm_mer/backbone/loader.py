"""Load a frozen Qwen2.5-Omni thinker, its processor and special-token ids: one function for every size.

A real 7B checkpoint directory, a hub id already in the local cache, or the tiny twin written by
`mllm_mer.backbone.tiny` all go through `load_backbone`. The whole Omni checkpoint (thinker + talker)
is accepted too: only the thinker is loaded. Never `trust_remote_code`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, Qwen2_5OmniThinkerForConditionalGeneration

from mllm_mer.backbone.modality import SpecialTokenIds

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED_MODEL_TYPES = ("qwen2_5_omni_thinker", "qwen2_5_omni")


@dataclass
class Backbone:
    """A loaded backbone: the thinker model (frozen), its processor and its special-token ids."""

    model: Qwen2_5OmniThinkerForConditionalGeneration
    processor: object
    token_ids: SpecialTokenIds
    path: str


def _model_type(path: str) -> str:
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file():
        try:
            return json.loads(cfg_file.read_text()).get("model_type", "")
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_file} is not valid JSON: {exc}") from None
    return AutoConfig.from_pretrained(path, local_files_only=True).model_type


def load_backbone(
    path: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa"
) -> Backbone:
    """Load the thinker, processor and token ids from `path`; every parameter is frozen.

    Args:
        path: checkpoint directory (or cached hub id) of a Qwen2.5-Omni thinker or full Omni model.
        dtype: "float32", "bfloat16" or "float16".
        attn_implementation: "sdpa" or "eager" (the language model's attention backend).
    Raises:
        ValueError: unknown dtype, or a checkpoint that is not a Qwen2.5-Omni model.
        FileNotFoundError: `path` does not exist and is not in the local hub cache.
    """
    path = str(path)
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype={dtype!r} unknown; valid: {sorted(_DTYPES)}")
    try:
        model_type = _model_type(path)
    except OSError as exc:
        raise FileNotFoundError(
            f"model.path={path!r}: no checkpoint there (and nothing cached offline). Give a local "
            f"Qwen2.5-Omni directory, or set model.build_tiny=true to build the tiny twin. ({exc})"
        ) from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model.path={path!r} holds model_type={model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}"
        )
    kwargs = {"dtype": _DTYPES[dtype], "attn_implementation": attn_implementation, "local_files_only": True}
    if model_type == "qwen2_5_omni":  # full Omni checkpoint: take the thinker sub-model only
        config = AutoConfig.from_pretrained(path, local_files_only=True).thinker_config
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            path, config=config, key_mapping={r"^thinker\.": ""}, **kwargs
        )
    else:
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, **kwargs)
    model.requires_grad_(False)
    model.eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    token_ids = SpecialTokenIds.from_model_config(model.config, processor.tokenizer)
    return Backbone(model=model, processor=processor, token_ids=token_ids, path=path)
