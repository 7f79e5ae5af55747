"""Which run a checkpoint or a run directory belongs to: the run's identity and its fingerprint.

A run's identity is its resolved config, flattened to dotted keys, without two kinds of keys: the
settings of methods that are off (their sections change nothing), and `RESUME_MAY_CHANGE`, the short
explicit list of settings a resumed run may change (how long, how often, where, how fast). Each active
method's whole settings section is part of it (`Method.section`), except for methods that act only at
inference (`Method.inference_only`, e.g. AR). Two more entries are derived: `methods` (the active methods,
from `mllm_mer.model.active_methods`) and `model.family` (the checkpoint's family, read from its
`config.json` when it is a local directory). The fingerprint is the sha256 of the identity.

Every checkpoint stores `run_record(cfg)` (identity, fingerprint and the may-change settings) in its
`mllm_mer_state.json`; resume compares it with the new config before any tensor is loaded
(`mllm_mer.training.checkpoint.verify_checkpoint`), and a new run compares the config of what already sits
in its output directory (`mllm_mer.training.ownership`). Everything that is not explicitly allowed to change
must match: besides the shapes of the trained weights (adapter kind and sizes, heads, labels, unfrozen parts),
a resumed run also restores the optimizer (its learning rates), the sampler position in the data and the
per-batch seeds, so a changed `train.lr`, data file or seed would not do what it says.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mllm_mer.backbone.families import family_for_model_type
from mllm_mer.config import RunConfig, config_to_dict
from mllm_mer.model import METHODS, active_methods

RESUME_MAY_CHANGE: tuple[str, ...] = (
    # where things go
    "train.output_dir", "train.resume_from", "train.overwrite", "data.cache_dir", "data.feature_cache_dir",
    # how long and how often
    "train.epochs", "train.max_steps", "train.max_minutes", "train.save_every", "train.keep_checkpoints",
    "train.eval_every", "train.log_every",
    # how fast, and what to do about trouble (the trained weights do not depend on them)
    "train.eval_batch_size", "train.torch_threads", "train.gradient_checkpointing", "data.num_workers",
    "train.nan_policy", "train.max_nonfinite_skips", "model.build_tiny",
    "model.tiny_weights",
    # sections read only after training
    "generate", "eval",
)
"""Config keys (or whole sections) a resumed run may change; each change is listed when it resumes."""


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def may_change(key: str) -> bool:
    """Whether the dotted `key` is one a resumed run may change (`RESUME_MAY_CHANGE`)."""
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def model_family(path: str) -> str | None:
    """The backbone family of the checkpoint at `path` from its `config.json` (None: not a readable local
    checkpoint, e.g. a hub id or a model not built yet)."""
    try:
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type", "")
        return family_for_model_type(model_type).name
    except (OSError, ValueError, AttributeError):
        return None


def run_settings(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(identity, may-change settings) of `cfg`, both flat {dotted key: value}."""
    active = active_methods(cfg)
    idle = {m.section for m in METHODS if m.section} - {m.section for m in active if not m.inference_only}
    flat = flatten(config_to_dict(cfg))
    identity = {k: v for k, v in flat.items() if k.split(".")[0] not in idle and not may_change(k)}
    identity["methods"] = [m.name for m in active if not m.inference_only]
    identity["model.family"] = model_family(cfg.model.path)
    settings = {k: v for k, v in flat.items() if may_change(k)}
    return identity, settings


def fingerprint(identity: dict[str, Any]) -> str:
    """sha256 of an identity (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def run_record(cfg: RunConfig) -> dict[str, Any]:
    """What a checkpoint stores about its run: {"fingerprint", "identity", "settings"}."""
    identity, settings = run_settings(cfg)
    return {"fingerprint": fingerprint(identity), "identity": identity, "settings": settings}


_ABSENT = "(absent)"


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One "key: saved -> current" line per key whose value differs (keys in sorted order)."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {json.dumps(saved.get(k, _ABSENT))} -> {json.dumps(current.get(k, _ABSENT))}"
            for k in keys if saved.get(k, _ABSENT) != current.get(k, _ABSENT)]


def summarize(lines: list[str], limit: int = 8) -> str:
    """The first `limit` difference lines joined with "; " (and how many more there are)."""
    more = f"; and {len(lines) - limit} more" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more
