"""MoSE: modality-specific LoRA experts with a regularized gate (after MoSEAR, ACM MM 2025); `adapter: mose`.

peft-style layout: `config.py` (MoSEConfig, the `mose.*` settings, torch-free), `layer.py` (MoSELinear,
routing), `model.py` (apply_mose, bound_modalities, regularizers, gate statistics, safetensors I/O) and
`method.py` (the `MOSE` method that `mllm_mer.model.build_mer_model` lists). Only the config is imported
here, so that `mllm_mer.config` stays torch-free; import the rest from its module.
"""

from mllm_mer.adapters.mose.config import ROUTINGS, MoSEConfig

__all__ = ["ROUTINGS", "MoSEConfig"]
