"""Typed run configuration: nested frozen dataclasses loaded from YAML plus `key.path=value` overrides.

`load_config(path, overrides)` is the one entry point. Loading checks every key and value before any
model or data is touched and reports all problems at once in a `ConfigError`: unknown keys name their
dotted path and the closest valid name, values are checked against the field's type and range.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mllm_mer.adapters.mose.config import MoSEConfig
from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.fusion.dcr.config import DCRConfig
from mllm_mer.fusion.dnr import DnRConfig

LM_TARGETS = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
"""LoRA target regex: the language model's attention projections only (never the audio/vision towers)."""


class ConfigError(ValueError):
    """One or more configuration problems; `errors` lists them, one line each."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = errors
        super().__init__(f"{len(errors)} problem(s) in {source}:\n" + "\n".join(f"  - {e}" for e in errors))


@dataclass(frozen=True)
class FreezeConfig:
    """Which parts of the backbone stay frozen (True = frozen). Decided in `mllm_mer.trainable`."""

    language_model: bool = True
    """Base weights of the language model (LoRA adapters on it train regardless)."""
    audio_tower: bool = True
    """Audio encoder layers (Whisper-style), without its output projector."""
    audio_projector: bool = True
    """The audio encoder's output projection into the language model (`audio_tower.ln_post` and `proj`;
    Qwen3-Omni: `proj1`, `proj2`)."""
    vision_tower: bool = True
    """Vision encoder blocks and patch embedding, without the merger."""
    vision_projector: bool = True
    """The vision patch merger that projects into the language model (`visual.merger`; Qwen3-Omni also the
    deepstack mergers `visual.merger_list`)."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = ".cache/mllm_mer/tiny-qwen2_5-omni"
    """Local directory (or hub id already in the local HF cache) of a Qwen2.5-Omni or Qwen3-Omni checkpoint
    (thinker or full model; the family follows from its config)."""
    build_tiny: bool = False
    """Build the tiny random thinker at `path` first if it does not exist (tests, CI, the demo)."""
    tiny_arch: Literal["qwen2_5_omni", "qwen3_omni"] = "qwen2_5_omni"
    """Family of the tiny twin that `build_tiny` builds (ignored when `build_tiny` is false)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    quantization: Literal["none", "nf4"] = "none"
    """"nf4": load the language model in 4-bit NF4 (bitsandbytes, QLoRA); the audio/vision towers and lm_head
    stay unquantized. Needs `freeze.language_model=true`."""
    freeze: FreezeConfig = field(default_factory=FreezeConfig)


@dataclass(frozen=True)
class LoraConfig:
    """Plain LoRA (peft) on the language model."""

    enabled: bool = True
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str = LM_TARGETS
    """Regex over full module names; must match only language-model modules."""


@dataclass(frozen=True)
class DataConfig:
    train: str = ""
    """JSONL of training samples (see README, "Data")."""
    dev: str = ""
    test: str = ""
    format: Literal["mer_jsonl", "sharegpt", "swift"] = "mer_jsonl"
    """File format of train/dev/test: our JSONL, LLaMA-Factory sharegpt, or ms-swift messages JSONL."""
    label_field: str | None = None
    """Peer formats: record key holding the label (None = last label word of the assistant answer)."""
    synthetic_dir: str | None = None
    """If set, build the synthetic conflict set here on first use; empty train/dev/test default into it."""
    synthetic_seed: int = 0
    labels: tuple[str, ...] = MER2023_LABELS
    prompt: str = "explain"
    """Prompt template (prompts/<name>.txt) rendered for every training / dev sample."""
    fps: float = 4.0
    """Video frames sampled per second when decoding."""
    max_frames: int = 32
    max_audio_seconds: float | None = None
    """Longest accepted audio; None = the feature extractor's window. Longer clips raise (never cut)."""
    modality_dropout: float = 0.0
    """Training only: probability that a batch keeps just its audio or just its video (half each)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad samples (rows or media): stop with the full list, or skip them and count them in data_report.json."""
    allow_silent_audio: bool = False
    """Accept audio tracks whose peak stays below 1e-4 (refused by default: usually a broken extraction)."""
    max_subtitle_chars: int = 4000
    """Longer subtitles are refused (a runaway transcript would blow up the prompt)."""
    num_workers: int = 0
    cache_dir: str = ".cache/mllm_mer/decoded"
    """Where the `datasets` cache of decoded media lives."""
    decode_cache: bool = True
    """Keep every sample's decoded frames and audio in the `datasets` cache (`data.cache_dir`), decoded once.
    False: decode in the DataLoader every epoch (after one checking pass), for sets whose raw frames would
    not fit on disk; raise `data.num_workers`, or use `data.feature_cache`, which stores tower outputs only."""
    feature_cache: bool = False
    """Cache the frozen towers' outputs per sample (`mllm_mer.cache`): computed once before the first epoch,
    then no decoding, feature extraction or tower runs. Needs every tower and projector frozen."""
    feature_cache_dir: str = ".cache/mllm_mer/features"
    """Where the frozen-encoder cache (safetensors shards + one JSON index per rank) lives."""


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/tiny_cpu"
    seed: int = 0
    epochs: int = 3
    max_steps: int = -1
    """Optimizer steps; -1 = `epochs` full passes."""
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    head_lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    lm_loss_weight: float = 1.0
    cls_loss_weight: float = 1.0
    eval_every: int = 0
    """Dev evaluation every N optimizer steps; 0 = at the end of each epoch."""
    save_every: int = 100
    """Checkpoint every N optimizer steps (also at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    resume_from: str | None = None
    """None, "latest" or a checkpoint directory."""
    log_every: int = 10
    eval_batch_size: int = 16
    max_minutes: float = 0.0
    """Stop cleanly (checkpoint + final files) after this many minutes of training; 0 = no limit."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """A NaN/Inf loss stops the run (naming step, samples and last checkpoint) or skips the batch."""
    max_nonfinite_skips: int = 10
    """With nan_policy=skip: stop anyway after this many skipped batches."""
    torch_threads: int = 0
    """torch intra-op threads per process; 0 = torch's default (1 is fastest for tiny models on shared CPUs)."""


@dataclass(frozen=True)
class ARConfig:
    """Attention reallocation (AR) at inference: training-free, no parameters; the formula is ours.

    At the chosen language-model layers, heads and query positions, the share of attention mass on audio
    keys within the audio + video mass is moved a fraction `strength` of the way toward
    `target_audio_share` (see `mllm_mer.attention.realloc` for the exact formula). Honoured by
    `generation.generate_rows` / `predict_rows` (hence `scripts/generate.py` and evaluation code);
    training ignores it.
    """

    enabled: bool = False
    """Apply AR in `generate_rows` / `predict_rows`."""
    strength: float = 0.5
    """alpha in [0, 1]: fraction of the gap to the target share closed per layer, head and query row."""
    target_audio_share: float = 0.5
    """tau in (0, 1): target audio fraction of the audio + video attention mass (video's is 1 - tau)."""
    layers: tuple[int, ...] | None = None
    """Language-model layer indices (negative counts from the end); None = the middle half, L//4 .. 3L//4-1."""
    heads: tuple[int, ...] | None = None
    """Query-head indices to act on; None = every head."""
    query: Literal["generated", "all"] = "generated"
    """Query rows acted on: "generated" = the last prompt position and every generated position (the rows
    that predict a token); "all" = every query position, prompt included."""
    mode: Literal["probs", "scores"] = "probs"
    """Where AR acts: "probs" = rescale the probabilities after softmax (text mass kept); "scores" = add a
    log-odds bias to the under-attended modality's scores before softmax (text mass shrinks as it grows)."""
    min_mass: float = 1e-6
    """A row is left unchanged unless both its audio and its video mass exceed this (e.g. a clip without audio)."""

    def problems(self, num_layers: int | None = None, num_heads: int | None = None) -> list[str]:
        """Every problem with these values, one line each (empty = valid).

        Args:
            num_layers: the language model's layer count, to check `layers` (None = skip that check).
            num_heads: its attention-head count, to check `heads` (None = skip that check).
        """
        errors = []
        if not 0.0 <= self.strength <= 1.0:
            errors.append(f"ar.strength={self.strength!r} is out of range [0, 1]")
        if not 0.0 < self.target_audio_share < 1.0:
            errors.append(
                f"ar.target_audio_share={self.target_audio_share!r} must lie strictly between 0 and 1"
            )
        if not 0.0 <= self.min_mass < 0.5:
            errors.append(f"ar.min_mass={self.min_mass!r} is out of range [0, 0.5)")
        for name, values, size in (("layers", self.layers, num_layers), ("heads", self.heads, num_heads)):
            if values is None:
                continue
            if not values:
                errors.append(f"ar.{name} is empty: list at least one index, or null for the default")
            if name == "layers":  # negative layer indices count from the end
                low = -size if size is not None else None
            else:
                low = 0
            bad = [v for v in values if (low is not None and v < low) or (size is not None and v >= size)]
            if bad:
                allowed = f"[{low}, {size})" if size is not None else ">= 0"
                errors.append(f"ar.{name}={list(values)} has indices {bad} outside {allowed}")
            if size is not None:
                resolved = [v % size for v in values]
                if len(set(resolved)) != len(resolved):
                    errors.append(f"ar.{name}={list(values)} names the same index twice")
        return errors


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ar: ARConfig = field(default_factory=ARConfig)
    mose: MoSEConfig = field(default_factory=MoSEConfig)
    """MoSE (`mllm_mer.adapters.mose`); when enabled it replaces plain LoRA (`lora.*` is then unused)."""
    dcr: DCRConfig = field(default_factory=DCRConfig)
    """DCR (`mllm_mer.fusion.dcr`): unimodal paths with own adapters and heads, AFD, the ADA arbiter."""
    dnr: DnRConfig = field(default_factory=DnRConfig)
    """DnR (`mllm_mer.fusion.dnr`): divide-and-refine parts whose logits are added to the fused head's."""

    def resolved(self) -> RunConfig:
        """Fill paths derived from `data.synthetic_dir` (empty train/dev/test point into it)."""
        if self.data.synthetic_dir is None:
            return self
        root = Path(self.data.synthetic_dir)
        data = dataclasses.replace(
            self.data,
            train=self.data.train or str(root / "train.jsonl"),
            dev=self.data.dev or str(root / "dev.jsonl"),
            test=self.data.test or str(root / "test.jsonl"),
        )
        return dataclasses.replace(self, data=data)


# --------------------------------------------------------------------------------------------- checks
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "lora.r": (1, None),
    "lora.alpha": (0, None),
    "lora.dropout": (0, 0.999),
    "data.fps": (1e-3, None),
    "data.max_frames": (2, None),
    "data.max_audio_seconds": (1e-3, None),
    "data.num_workers": (0, None),
    "data.modality_dropout": (0, 1),
    "data.max_subtitle_chars": (1, None),
    "train.epochs": (1, None),
    "train.max_steps": (-1, None),
    "train.batch_size": (1, None),
    "train.grad_accum": (1, None),
    "train.lr": (0, None),
    "train.head_lr": (0, None),
    "train.weight_decay": (0, None),
    "train.warmup_ratio": (0, 1),
    "train.max_grad_norm": (0, None),
    "train.lm_loss_weight": (0, None),
    "train.cls_loss_weight": (0, None),
    "train.eval_every": (0, None),
    "train.save_every": (0, None),
    "train.keep_checkpoints": (1, None),
    "train.log_every": (1, None),
    "train.eval_batch_size": (1, None),
    "train.torch_threads": (0, None),
    "train.max_minutes": (0, None),
    "train.max_nonfinite_skips": (0, None),
    "mose.r": (1, None),
    "mose.alpha": (0, None),
    "mose.dropout": (0, 0.999),
    "mose.experts": (1, None),
    "mose.top_k": (1, None),
    "mose.gate_init_scale": (0, None),
    "mose.load_balance_weight": (0, None),
    "mose.modality_balance_weight": (0, None),
    "dcr.stage1_steps": (0, None),
    "dcr.path_loss_weight": (0, None),
    "dcr.afd_weight": (0, None),
    "dcr.afd_temperature": (0.05, None),
    "dcr.afd_agreement_power": (0, None),
    "dcr.arbiter.ridge": (1e-6, None),
    "dcr.arbiter.alpha": (0, None),
    "dcr.arbiter.calibration_weight": (0, None),
    "dcr.arbiter.epochs": (1, None),
}


def _cross_checks(cfg: RunConfig) -> list[str]:
    errors = []
    if cfg.train.max_steps == 0:
        errors.append("train.max_steps=0: use -1 (train for train.epochs) or a positive number of steps")
    if cfg.train.lm_loss_weight == 0 and cfg.train.cls_loss_weight == 0:
        errors.append("train.lm_loss_weight and train.cls_loss_weight are both 0: nothing would be trained")
    if len(set(cfg.data.labels)) != len(cfg.data.labels) or len(cfg.data.labels) < 2:
        errors.append(f"data.labels must hold at least 2 distinct labels, got {list(cfg.data.labels)}")
    if not cfg.data.train and cfg.data.synthetic_dir is None:
        errors.append("data.train is empty: give a JSONL path (data.train=PATH) or data.synthetic_dir")
    if cfg.model.dtype != "float32" and cfg.train.mixed_precision != "no":
        errors.append("model.dtype and train.mixed_precision are both set: choose one (keep dtype float32)")
    if not cfg.model.path:
        errors.append("model.path is empty: give a Qwen2.5-Omni checkpoint directory")
    if cfg.model.quantization != "none" and not cfg.model.freeze.language_model:
        errors.append(
            f"model.quantization={cfg.model.quantization} keeps the language model in 4 bits, "
            "which cannot train: set model.freeze.language_model=true (adapters still train)"
        )
    if cfg.data.feature_cache:
        from mllm_mer.cache import frozen_encoder_problems

        errors.extend(frozen_encoder_problems(cfg.model.freeze))
    errors.extend(cfg.ar.problems())
    errors.extend(cfg.dnr.problems())
    return errors


# --------------------------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check `value` against annotation `tp`, converting where lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        sub: list[str] = []
        for a in inner:
            sub = []
            out = _coerce(value, a, path, sub)
            if not sub:
                return out
        errors.extend(sub)
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            errors.append(f"{path}={value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path} must be a list, got {type(value).__name__} {value!r}")
            return value
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path} must be a mapping of {tp.__name__} fields, got {value!r}")
            return tp()
        return _build(tp, value, path, errors)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            errors.append(f"{path} must be {tp.__name__}, got bool {value!r}")
        elif not isinstance(value, tp):
            errors.append(f"{path} must be {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {_type_name(tp)} at {path}")


def _build(cls: type, data: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            errors.append(f"unknown key '{path}'{hint} (valid: {', '.join(names)})")
            continue
        kwargs[key] = _coerce(value, hints[key], path, errors)
    for name, (lo, hi) in _RANGES.items():
        section, _, fname = name.rpartition(".")
        if section == prefix and fname in kwargs and isinstance(kwargs[fname], (int, float)):
            v = kwargs[fname]
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                errors.append(f"{name}={v!r} is out of range {rng}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a wrong type, or a dataclass's own cross-field check
        errors.append(f"{prefix or 'config'}: {exc}")
        return cls()


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-4", "lora.enabled=false"] into a nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item or item.startswith("-"):
            raise ConfigError([f"override {item!r} must look like key.path=value"], "command line")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    [f"override {item!r} conflicts with another override of {part}"], "command line"
                )
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Build and validate a `RunConfig`; raises `ConfigError` listing every problem."""
    errors: list[str] = []
    cfg = _build(RunConfig, data, "", errors)
    if not errors:
        errors.extend(_cross_checks(cfg))
    if errors:
        raise ConfigError(errors, source)
    return cfg.resolved()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML at `path` (None = all defaults), apply dotted overrides, validate, resolve."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError([f"config file not found: {path}"], source) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], source) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(["top level must be a mapping of sections"], source)
        data = loaded or {}
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source += " + command-line overrides"
    return config_from_dict(data, source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON output."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
