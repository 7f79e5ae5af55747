"""Plain LoRA on the language model through peft (`adapter: lora`).

`config.py` (LoraConfig, torch-free) and `method.py` (the `LORA` method: apply, save, load). Only the
config is imported here, so that `mllm_mer.config` stays torch-free.
"""

from mllm_mer.adapters.lora.config import LM_TARGETS, LoraConfig

__all__ = ["LM_TARGETS", "LoraConfig"]
