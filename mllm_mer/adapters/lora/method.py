"""Plain LoRA on the language model through peft: the `LORA` method (`adapter: lora`).

Saved as a standard peft adapter folder (`adapter/`, safetensors), so other tools load it; export merges it
into the base weights. Peft keeps every adapter of the model in that folder: the "default" one here, and
extra named adapters (DCR's unimodal paths) in `adapter/<name>/`.
"""

from __future__ import annotations

import re
from pathlib import Path

import peft
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from mllm_mer.backbone.families import family_of
from mllm_mer.config import RunConfig
from mllm_mer.methods import Method

ADAPTER_DIR = "adapter"
"""The peft adapter folder inside a run directory."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def apply_lora(model: nn.Module, cfg: RunConfig) -> peft.PeftModel:
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


def load_adapter_weights(model: peft.PeftModel, folder: Path, adapter_name: str, missing_hint: str = "") -> None:
    """Load a saved peft adapter (`folder/adapter_config.json` + `adapter_model.safetensors`) into the existing
    adapter `adapter_name` of `model`, strictly (every weight of that adapter present, nothing unknown).

    Args:
        model: the peft model holding the (freshly configured) adapter.
        folder: the saved adapter's folder.
        adapter_name: the adapter to fill.
        missing_hint: said when a file is missing (e.g. which setting the run lacked).
    Raises:
        FileNotFoundError: a file of the saved adapter is missing.
        ValueError: names or shapes differ from the configured adapter (e.g. `lora.r` changed).
    """
    for path in (folder / "adapter_config.json", folder / ADAPTER_WEIGHTS):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {missing_hint or 'the run has no trained adapter'} "
                                    f"('{adapter_name}')")
    path = folder / ADAPTER_WEIGHTS
    saved = load_file(str(path))
    marker = f".{adapter_name}."
    own = {k: v for k, v in model.state_dict().items() if ".lora_" in k and marker in k}
    try:
        result = set_peft_model_state_dict(model, saved, adapter_name=adapter_name)
    except RuntimeError as exc:  # size mismatch (torch's message spans lines: one line here)
        detail = " ".join(str(exc).split())[:300]
        raise ValueError(f"{path} does not fit the configured adapter '{adapter_name}': {detail}") from None
    unexpected = [k for k in result.unexpected_keys if ".lora_" in k]
    missing = [k for k in result.missing_keys if k in own]
    if unexpected or missing or len(saved) != len(own):
        raise ValueError(f"{path} does not match the configured adapter '{adapter_name}': "
                         f"{len(saved)} saved tensors for {len(own)} adapter weights; missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


class LoraMethod(Method):
    """Plain LoRA (peft) on the language model's `lora.target_modules`."""

    name = "lora"
    section = "lora"
    param_marker = ".lora_"
    merges_into_base = True

    def enabled(self, cfg: RunConfig) -> bool:
        return cfg.adapter == "lora"

    def apply(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        return apply_lora(model, cfg)

    def files(self, cfg: RunConfig) -> tuple[str, ...]:
        return (f"{ADAPTER_DIR}/adapter_config.json", f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}")

    def save(self, mer: nn.Module, state: dict[str, torch.Tensor], out_dir: Path, cfg: RunConfig) -> None:
        """peft format: `adapter/` holds "default", `adapter/<name>/` every other adapter of the model."""
        mer.backbone.save_pretrained(str(out_dir / ADAPTER_DIR), state_dict=self.state_dict(mer, state),
                                     safe_serialization=True)

    def load(self, mer: nn.Module, run_dir: Path, cfg: RunConfig) -> None:
        load_adapter_weights(mer.backbone, run_dir / ADAPTER_DIR, "default")

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload(adapter_names=["default"])


LORA = LoraMethod()
