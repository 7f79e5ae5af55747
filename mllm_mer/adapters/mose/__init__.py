"""MoSE: modality-specific LoRA experts with a regularized gate (after MoSEAR, ACM MM 2025).

peft-style layout: `config.py` (MoSEConfig, the `mose.*` settings), `layer.py` (MoSELinear, routing),
`model.py` (apply_mose, bound_modalities, regularizers, gate statistics, safetensors I/O).
"""

from mllm_mer.adapters.mose.config import MoSEConfig
from mllm_mer.adapters.mose.layer import MoSELinear, RoutingRecord, route
from mllm_mer.adapters.mose.model import (
    MOSE_WEIGHTS,
    GateStatsMean,
    apply_mose,
    bound_modalities,
    checkpoint_context_fn,
    flatten_gate_stats,
    gate_stats_dict,
    load_balance_loss,
    load_mose_weights,
    modality_balance_loss,
    mose_aux_losses,
    mose_layers,
    mose_state_dict,
    save_mose_weights,
    summarize_gates,
)

__all__ = [
    "MOSE_WEIGHTS",
    "GateStatsMean",
    "MoSEConfig",
    "MoSELinear",
    "RoutingRecord",
    "apply_mose",
    "bound_modalities",
    "checkpoint_context_fn",
    "flatten_gate_stats",
    "gate_stats_dict",
    "load_balance_loss",
    "load_mose_weights",
    "modality_balance_loss",
    "mose_aux_losses",
    "mose_layers",
    "mose_state_dict",
    "route",
    "save_mose_weights",
    "summarize_gates",
]
