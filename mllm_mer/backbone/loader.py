"""Load a frozen Omni thinker, its processor and special-token ids: one function for every size and family.

A real checkpoint directory (Qwen2.5-Omni 3B/7B or Qwen3-Omni-30B-A3B), a hub id already in the local
cache, or a tiny twin written by `mllm_mer.backbone.tiny` all go through `load_backbone`; the family
(`mllm_mer.backbone.families`) follows from the checkpoint's `model_type`. The whole Omni checkpoint
(thinker + talker) is accepted too: only the thinker is loaded. Never `trust_remote_code`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, PreTrainedModel

from mllm_mer.backbone.families import SUPPORTED_MODEL_TYPES, BackboneFamily, family_for_model_type, family_of
from mllm_mer.backbone.modality import SpecialTokenIds

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
__all__ = ["SUPPORTED_MODEL_TYPES", "Backbone", "load_backbone"]


@dataclass
class Backbone:
    """A loaded backbone: the thinker model (frozen), its processor and its special-token ids."""

    model: PreTrainedModel
    processor: object
    token_ids: SpecialTokenIds
    path: str

    @property
    def family(self) -> BackboneFamily:
        """The backbone family (Qwen2.5-Omni or Qwen3-Omni), from the thinker's config."""
        return family_of(self.model.config)


def _model_type(path: str) -> str:
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file():
        try:
            return json.loads(cfg_file.read_text()).get("model_type", "")
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_file} is not valid JSON: {exc}") from None
    return AutoConfig.from_pretrained(path, local_files_only=True).model_type


def load_backbone(
    path: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa", quantization: str = "none"
) -> Backbone:
    """Load the thinker, processor and token ids from `path`; every parameter is frozen.

    Args:
        path: checkpoint directory (or cached hub id) of a thinker or full Omni model of a supported family
            (`mllm_mer.backbone.families.SUPPORTED_MODEL_TYPES`).
        dtype: "float32", "bfloat16" or "float16".
        attn_implementation: "sdpa" or "eager" (the language model's attention backend).
        quantization: "none", or "nf4": the language model's linear layers in 4-bit NF4 (bitsandbytes, for
            QLoRA; compute in `dtype`); the audio and vision towers (with their projectors) and lm_head stay
            unquantized (`quantization_config`).
    Raises:
        ValueError: unknown dtype, a checkpoint of an unsupported model type, or a processor that is not
            the family's.
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
            f"Qwen2.5-Omni / Qwen3-Omni directory, or set model.build_tiny=true to build the tiny twin. "
            f"({exc})"
        ) from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model.path={path!r} holds model_type={model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}"
        )
    family = family_for_model_type(model_type)
    model_class = family.model_class()
    kwargs = {"dtype": _DTYPES[dtype], "attn_implementation": attn_implementation, "local_files_only": True}
    if quantization != "none":
        kwargs.update(quantization_config(quantization, dtype, family))
    if model_type == family.full_model_type:  # full Omni checkpoint: take the thinker sub-model only
        config = AutoConfig.from_pretrained(path, local_files_only=True).thinker_config
        model = model_class.from_pretrained(path, config=config, key_mapping={r"^thinker\.": ""}, **kwargs)
    else:
        model = model_class.from_pretrained(path, **kwargs)
    model.requires_grad_(False)
    model.eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    if type(processor).__name__ != family.processor_class:
        raise ValueError(
            f"model.path={path!r}: a {family.display} checkpoint needs a {family.processor_class}, but its "
            f"processor files load a {type(processor).__name__}"
        )
    token_ids = SpecialTokenIds.from_model_config(model.config, processor.tokenizer)
    quantized = "" if quantization == "none" else f", language model in {quantization}"
    log.info("loaded the %s thinker from %s (%s, %s attention%s)", family.display, path, dtype,
             attn_implementation, quantized)
    return Backbone(model=model, processor=processor, token_ids=token_ids, path=path)


def quantization_config(quantization: str, dtype: str, family: BackboneFamily) -> dict:
    """`from_pretrained` kwargs for 4-bit NF4 (QLoRA): towers, projectors and lm_head skipped (full prefixes).

    Raises:
        ValueError: an unknown quantization, or bitsandbytes is not installed (extra `[qlora]`).
    """
    if quantization != "nf4":
        raise ValueError(f"model.quantization={quantization!r} unknown; valid: ['none', 'nf4']")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("model.quantization=nf4 needs bitsandbytes: pip install -e '.[qlora]'") from None
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_DTYPES[dtype],
        llm_int8_skip_modules=[family.audio_tower, family.vision_tower, "lm_head"],
    )
    kwargs: dict = {"quantization_config": config}
    if torch.cuda.is_available():  # quantize straight onto this process's GPU
        import os

        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return kwargs
