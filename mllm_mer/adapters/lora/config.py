"""Plain LoRA settings (`lora.*` in the run YAML), used when `adapter: lora`.

Torch-free: `mllm_mer.config` imports this module, and importing the config must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm_mer.checks import range_problems

LM_TARGETS = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
"""Default target regex: the language model's attention projections only (never the audio/vision towers)."""


@dataclass(frozen=True)
class LoraConfig:
    """Plain LoRA (peft) on the language model."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str = LM_TARGETS
    """Regex over full module names; must match only language-model modules."""

    def problems(self) -> list[str]:
        """Every problem with these values, one line each (empty = valid)."""
        return range_problems("lora", self, {"r": (1, None), "alpha": (0, None), "dropout": (0, 0.999)})

    @property
    def loss_weights(self) -> dict[str, float]:
        """Plain LoRA adds no loss of its own."""
        return {}
