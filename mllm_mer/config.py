"""Typed run configuration: nested frozen dataclasses loaded from YAML plus `key.path=value` overrides.

`load_config(path, overrides)` is the one entry point, for every script: a run YAML, or a finished run's
saved `config.yaml`, deep-merged with dotted overrides. Loading checks every key and value before any
model or data is touched and reports all problems at once in a `ConfigError`: unknown keys name their
dotted path and the closest valid name, values are checked against the field's type, and every section's
`problems()` (its ranges and cross-field rules) runs.

Method sections (`lora`, `mose`, `ar`, `dcr`, `dnr`) are defined next to their method (e.g.
`mllm_mer.adapters.mose.config`); each has `problems()` and `loss_weights`. `adapter: lora | mose | none`
picks the language model's adapter. This module, and every config module it imports, imports no torch.
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

from mllm_mer.adapters.lora.config import LM_TARGETS, LoraConfig
from mllm_mer.adapters.mose.config import MoSEConfig
from mllm_mer.attention.config import ARConfig
from mllm_mer.checks import range_problems
from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.fusion.dcr.config import DCRConfig
from mllm_mer.fusion.dnr.config import DnRConfig
from mllm_mer.labels import LABEL_MODES

__all__ = [
    "LM_TARGETS", "ARConfig", "ConfigError", "DCRConfig", "DataConfig", "DnRConfig", "EvalConfig",
    "FreezeConfig", "GenerateConfig", "LoraConfig", "ModelConfig", "MoSEConfig", "RunConfig", "TrainConfig",
    "config_from_dict", "config_to_dict", "dump_config", "feature_cache_enabled", "feature_cache_note",
    "frozen_encoder_problems", "load_config",
    "load_run_config", "parse_overrides", "shorthand_overrides",
    "save_config",
]

ADAPTERS: tuple[str, ...] = ("lora", "mose", "none")
"""Values of `adapter`: plain LoRA (`lora.*`), MoSE experts (`mose.*`), or no adapter (heads only, or a
full fine-tune with `model.freeze.*` off)."""
JUDGES: tuple[str, ...] = ("openai", "local", "embedding")
"""`eval.judge` backends of the EMER judge task (see eval/judge.py)."""
EMER_LANGUAGES: tuple[str, ...] = ("english", "chinese")
"""`eval.emer_language`: EMER v2 reference columns."""
ENCODER_PARTS: tuple[str, ...] = ("audio_tower", "audio_projector", "vision_tower", "vision_projector")
"""The frozen-encoder cache's parts: all must be frozen for `data.feature_cache`."""


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
    tiny_weights: Literal["random", "stage0"] = "random"
    """What `build_tiny` writes at `path`: "random", a random tiny twin of `tiny_arch`; "stage0", the stage-0
    emotion backbone shipped with the package (`mllm_mer.backbone.stage0`: a tiny Qwen2.5-Omni thinker
    pretrained by `scripts/pretrain_tiny.py` that recognises both cues and explains in words)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    quantization: Literal["none", "nf4"] = "none"
    """"nf4": load the language model in 4-bit NF4 (bitsandbytes, QLoRA); the audio/vision towers and lm_head
    stay unquantized. Needs `freeze.language_model=true`."""
    freeze: FreezeConfig = field(default_factory=FreezeConfig)

    def problems(self) -> list[str]:
        """Every problem with these values, one line each (empty = valid)."""
        errors = []
        if not self.path:
            errors.append("model.path is empty: give a Qwen2.5-Omni or Qwen3-Omni checkpoint directory")
        if self.build_tiny and self.tiny_weights == "stage0" and self.tiny_arch != "qwen2_5_omni":
            errors.append(f"model.tiny_weights=stage0 is a Qwen2.5-Omni thinker but model.tiny_arch="
                          f"{self.tiny_arch}: set model.tiny_arch=qwen2_5_omni or model.tiny_weights=random")
        if self.quantization != "none" and not self.freeze.language_model:
            errors.append(
                f"model.quantization={self.quantization} keeps the language model in 4 bits, "
                "which cannot train: set model.freeze.language_model=true (adapters still train)"
            )
        return errors


RANDOM_TWIN: tuple[str, ...] = (f"model.path={ModelConfig.path}", "model.tiny_weights=random")
"""Overrides that select the tiny random Qwen2.5-Omni twin (`ModelConfig`'s default path, built there by
`model.build_tiny`), with its 30 s Whisper window: what the speed benches measure on, whatever the config's
own backbone (the default config's stage-0 backbone has a 4 s window, so camera clips would not fit); the peer
bench measures on the same twin."""


def frozen_encoder_problems(freeze: FreezeConfig) -> list[str]:
    """One line per unfrozen tower/projector (the frozen-encoder cache needs them all frozen); empty = cacheable."""
    return [
        f"data.feature_cache=true needs model.freeze.{part}=true: an unfrozen {part.replace('_', ' ')} "
        "changes its outputs during training, so they cannot be cached"
        for part in ENCODER_PARTS
        if not getattr(freeze, part)
    ]


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
    media_root: str | None = None
    """Folder that media paths in train/dev/test are relative to, and that absolute ones must lie in (None =
    each data file's own folder). For LLaMA-Factory `media_dir` / ms-swift files whose clips live beside,
    not below, the file. Paths that leave it are refused."""
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
    """DataLoader worker processes of the loaders that decode media and run the processor. The frozen-encoder
    cache's loader (`data.feature_cache`) always reads in the main process: a worker would spend more CPU
    handing each batch over than reading the stored tensors costs (the batches are the same either way)."""
    cache_dir: str = ".cache/mllm_mer/decoded"
    """Where the `datasets` cache of decoded media lives."""
    decode_cache: bool = True
    """Keep every sample's decoded frames and audio in the `datasets` cache (`data.cache_dir`), decoded once.
    False: decode in the DataLoader every epoch (after one checking pass), for sets whose raw frames would
    not fit on disk; raise `data.num_workers`, or use `data.feature_cache`, which stores tower outputs only
    (its fill decodes straight from the files and does not use this cache)."""
    feature_cache: bool | None = None
    """Cache the frozen towers' outputs per sample (`mllm_mer.cache`): computed once before the first epoch,
    then no decoding, feature extraction or tower runs. Needs every tower and projector frozen. None (the
    default) = on exactly when every tower and projector is frozen (`feature_cache_enabled`); an explicit
    false always wins."""
    feature_cache_dir: str = ".cache/mllm_mer/features"
    """Where the frozen-encoder cache (safetensors shards + one JSON index per rank) lives."""

    def problems(self) -> list[str]:
        """Every problem with these values, one line each (empty = valid)."""
        errors = range_problems("data", self, {
            "fps": (1e-3, None), "max_frames": (2, None), "max_audio_seconds": (1e-3, None),
            "num_workers": (0, None), "modality_dropout": (0, 1), "max_subtitle_chars": (1, None),
        })
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            errors.append(f"data.labels must hold at least 2 distinct labels, got {list(self.labels)}")
        return errors

    def training_problems(self) -> list[str]:
        """What training additionally needs (`scripts/finetune.py` checks it; inference does not)."""
        if not self.train and self.synthetic_dir is None:
            return ["data.train is empty: give a JSONL path (data.train=PATH) or data.synthetic_dir"]
        return []


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
    """None, "latest" or a checkpoint directory. A resumed run may change only a few settings
    (`mllm_mer.training.identity.RESUME_MAY_CHANGE`); the checkpoint must belong to this run."""
    overwrite: bool = False
    """Start a new run in an `output_dir` that holds another: its contents are first moved aside into
    `<output_dir>.replaced-<time>` (never mixed, nothing deleted). False: such a directory is refused."""
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
    verbose: bool = False
    """Print every library's log lines and warnings (`scripts/finetune.py --verbose`); false = only our progress
    bars, metric lines and warnings that ask for action (`mllm_mer.logs`)."""
    summary_explanations: int = 0
    """End-of-run summary: generate explanations for this many dev clips and print them beside their true
    cues (0 = none; useful once the backbone can speak, e.g. the testbed's stage-0 backbone)."""

    def problems(self) -> list[str]:
        """Every problem with these values, one line each (empty = valid)."""
        errors = range_problems("train", self, {
            "epochs": (1, None), "max_steps": (-1, None), "batch_size": (1, None), "grad_accum": (1, None),
            "lr": (0, None), "head_lr": (0, None), "weight_decay": (0, None), "warmup_ratio": (0, 1),
            "max_grad_norm": (0, None), "lm_loss_weight": (0, None), "cls_loss_weight": (0, None),
            "eval_every": (0, None), "save_every": (0, None), "keep_checkpoints": (1, None), "log_every": (1, None),
            "eval_batch_size": (1, None), "torch_threads": (0, None), "max_minutes": (0, None),
            "max_nonfinite_skips": (0, None), "summary_explanations": (0, None),
        })
        if self.max_steps == 0:
            errors.append("train.max_steps=0: use -1 (train for train.epochs) or a positive number of steps")
        if self.overwrite and self.resume_from is not None:
            errors.append(f"train.overwrite=true and train.resume_from={self.resume_from} contradict each other: "
                          "overwrite starts a new run, resume continues the one there; set only one")
        if self.lm_loss_weight == 0 and self.cls_loss_weight == 0:
            errors.append("train.lm_loss_weight and train.cls_loss_weight are both 0: nothing would be trained")
        return errors


@dataclass(frozen=True)
class GenerateConfig:
    """Decoding settings of `scripts/generate.py` and `mllm_mer.generation.generate_rows` (`generate.*`)."""

    prompt: str = "explain"
    """Prompt template (prompts/<name>.txt): explain, label or ov."""
    max_new_tokens: int = 128
    do_sample: bool = False
    """False = greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature (only with do_sample)."""
    top_p: float = 1.0
    """Nucleus sampling mass (only with do_sample)."""
    label_mode: Literal[LABEL_MODES] = "strict"  # type: ignore[valid-type]
    """How the label is parsed from the generated text (`mllm_mer.labels.parse_label`)."""
    batch_size: int = 8

    def problems(self) -> list[str]:
        """Every problem with these values, one line each (empty = valid)."""
        return range_problems("generate", self, {
            "max_new_tokens": (1, None), "temperature": (1e-6, None), "top_p": (1e-6, 1), "batch_size": (1, None),
        })


@dataclass(frozen=True)
class EvalConfig:
    """Options of `scripts/evaluate.py` (`eval.*`); the task, predictions and references are its arguments."""

    labels_mode: Literal[LABEL_MODES] = "strict"  # type: ignore[valid-type]
    """How `text` is parsed when a prediction row has no `label`."""
    reparse: bool = False
    """Parse `text` even when a row carries `label`."""
    allow_missing: bool = False
    """Score reference ids without a prediction as wrong (with a warning) instead of failing."""
    camer_annotation: str = "{subset}.json"
    """CA-MER annotation file per subset under the CA-MER root (`{subset}` is filled in)."""
    camer_media: str = "{subset}/{name}"
    """CA-MER media path without extension (`{subset}`, `{name}` are filled in)."""
    judge: Literal[JUDGES] | None = None  # type: ignore[valid-type]
    """emer-judge backend (embedding = an offline PROXY, never an EMER score)."""
    judge_url: str = "https://api.openai.com"
    """OpenAI-compatible server root of the "openai" judge."""
    judge_model: str | None = None
    """openai: model name; local: model folder; embedding: MiniLM folder (optional)."""
    judge_cache: str | None = None
    """Folder caching the judge's replies."""
    judge_device: str = "cpu"
    """torch device of the local / embedding judges."""
    emer_language: Literal[EMER_LANGUAGES] = "english"  # type: ignore[valid-type]
    """EMER v2 reference column."""


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: Literal[ADAPTERS] = "lora"  # type: ignore[valid-type]
    """The language model's adapter: "lora" (`lora.*`, peft), "mose" (`mose.*`, modality experts) or "none"."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Plain LoRA settings (`mllm_mer.adapters.lora`), used with `adapter: lora`."""
    mose: MoSEConfig = field(default_factory=MoSEConfig)
    """MoSE settings (`mllm_mer.adapters.mose`), used with `adapter: mose`."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ar: ARConfig = field(default_factory=ARConfig)
    """AR (`mllm_mer.attention`): attention reallocation at inference (`ar.enabled`)."""
    dcr: DCRConfig = field(default_factory=DCRConfig)
    """DCR (`mllm_mer.fusion.dcr`): unimodal paths with own adapters and heads, AFD, the ADA arbiter."""
    dnr: DnRConfig = field(default_factory=DnRConfig)
    """DnR (`mllm_mer.fusion.dnr`): divide-and-refine parts whose logits are added to the fused head's."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Decoding settings of generation (`scripts/generate.py`)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Options of `scripts/evaluate.py`."""

    def resolved(self) -> RunConfig:
        """Fill what derives from other fields: empty train/dev/test point into `data.synthetic_dir`, and
        `data.feature_cache` None becomes `feature_cache_enabled(self)`."""
        data = dataclasses.replace(self.data, feature_cache=feature_cache_enabled(self))
        if self.data.synthetic_dir is not None:
            root = Path(self.data.synthetic_dir)
            data = dataclasses.replace(
                data,
                train=self.data.train or str(root / "train.jsonl"),
                dev=self.data.dev or str(root / "dev.jsonl"),
                test=self.data.test or str(root / "test.jsonl"),
            )
        return dataclasses.replace(self, data=data)


def feature_cache_enabled(cfg: RunConfig) -> bool:
    """Whether the run uses the frozen-encoder cache: `data.feature_cache` when set, else (None, the default)
    exactly when every tower and projector is frozen."""
    if cfg.data.feature_cache is not None:
        return cfg.data.feature_cache
    return not frozen_encoder_problems(cfg.model.freeze)


def feature_cache_note(cfg: RunConfig) -> str | None:
    """One line saying why the frozen-encoder cache is off when a tower or projector trains (None otherwise:
    the cache is on, or the user switched it off with the towers frozen)."""
    if feature_cache_enabled(cfg):
        return None
    unfrozen = [f"model.freeze.{part}=false" for part in ENCODER_PARTS if not getattr(cfg.model.freeze, part)]
    if not unfrozen:
        return None
    return (f"frozen-encoder cache (data.feature_cache) off: {', '.join(unfrozen)} trains, so tower outputs "
            "change every step; media are decoded and encoded every epoch")


# --------------------------------------------------------------------------------------------- checks
def _cross_checks(cfg: RunConfig) -> list[str]:
    """The rules that span sections (each section's own `problems()` runs when it is built)."""
    errors = []
    if cfg.model.dtype != "float32" and cfg.train.mixed_precision != "no":
        errors.append("model.dtype and train.mixed_precision are both set: choose one (keep dtype float32)")
    if cfg.data.feature_cache:
        errors.extend(frozen_encoder_problems(cfg.model.freeze))
    if (cfg.ar.enabled and cfg.ar.target_mode == "paths" and cfg.ar.sample_confidence == "reliability"
            and not cfg.dcr.fits_reliability):
        errors.append("ar.sample_confidence=reliability reads the DCR reliability heads: it needs a run trained "
                      "with dcr.enabled=true and dcr.reliability=true (or set ar.sample_confidence=max_prob)")
    return errors


LEGACY_KEYS: dict[str, str] = {
    "lora.enabled": "adapter (lora.enabled=true -> adapter=lora, false -> adapter=none)",
    "mose.enabled": "adapter (mose.enabled=true -> adapter=mose)",
}
"""Keys of mllm_mer 0.1 configs that were replaced, with what replaces them."""

ADDED_KEYS: dict[str, Any] = {"dcr.reliability": False, "dcr.arbiter.state": "rich"}
"""Keys added (or whose default changed) after runs were already being saved, with the value that reproduces
such a run: a saved `config.yaml` (always fully resolved) whose section lacks the key was trained or fitted
without it."""


def _fill_added_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A saved run's config with every `ADDED_KEYS` entry its section lacks set to the value it was trained with
    (a section the file lacks altogether is left to the defaults)."""
    out = dict(data)
    for key, value in ADDED_KEYS.items():
        *sections, name = key.split(".")
        node = out
        for section in sections:
            if not isinstance(node.get(section), dict):
                break
            node[section] = dict(node[section])  # copied: the caller's dict stays as it was
            node = node[section]
        else:
            node.setdefault(name, value)
    return out


def _migrate_legacy(data: dict[str, Any], source: str, migrate: bool) -> dict[str, Any]:
    """Map 0.1's `lora.enabled` / `mose.enabled` onto `adapter` (saved runs), or refuse them (user configs).

    Args:
        data: the raw nested dict.
        source: where it came from (named in errors).
        migrate: True for a finished run's saved `config.yaml` (translate: mose wins, as it did in 0.1);
            False for user input (raise `ConfigError` naming the replacement).
    """
    found = {k: data[k.split(".")[0]][k.split(".")[1]] for k in LEGACY_KEYS
             if isinstance(data.get(k.split(".")[0]), dict) and k.split(".")[1] in data[k.split(".")[0]]}
    if not found:
        return data
    if not migrate:
        raise ConfigError([f"'{k}' was replaced by {LEGACY_KEYS[k]} in mllm_mer 0.2" for k in found], source)
    if "adapter" in data:
        raise ConfigError([f"both 'adapter' and the replaced {sorted(found)} are set; keep 'adapter'"], source)
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key in found:
        section, name = key.split(".")
        del out[section][name]
    out["adapter"] = "mose" if found.get("mose.enabled") else "lora" if found.get("lora.enabled", True) else "none"
    return out


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
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a wrong type, or a dataclass's own cross-field check
        errors.append(f"{prefix or 'config'}: {exc}")
        return cls()
    if hasattr(obj, "problems"):  # the section's ranges and rules, reported with every other problem
        errors.extend(obj.problems())
    return obj


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


def config_from_dict(data: dict[str, Any], source: str = "config", *, saved_run: bool = False) -> RunConfig:
    """Build and validate a `RunConfig`; raises `ConfigError` listing every problem.

    Args:
        data: nested dict of sections.
        source: where `data` came from (named in errors).
        saved_run: `data` is a finished run's saved config (0.1 keys are migrated instead of refused).
    """
    data = _migrate_legacy(data, source, migrate=saved_run)
    errors: list[str] = []
    cfg = _build(RunConfig, data, "", errors)
    errors.extend(_cross_checks(cfg))
    if errors:
        raise ConfigError(errors, source)
    return cfg.resolved()


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, saved_run: bool | None = None
) -> RunConfig:
    """Load YAML at `path` (None = all defaults), deep-merge dotted overrides, validate, resolve.

    The one loader of every script: `finetune` reads a run YAML; `generate`, `evaluate`, `fit_arbiter`,
    `bias_report` and `export` read a finished run's `config.yaml` (overriding only the keys given, e.g.
    `dcr.arbiter.alpha=1` keeps the rest of `dcr.arbiter`).

    Args:
        path: a YAML file.
        overrides: ["section.key=value", ...]; values are parsed as YAML scalars.
        saved_run: `path` is a run's saved config (migrate 0.1 keys); None = when `path` is named
            config.yaml and a `run_info.json` sits beside it.
    Raises:
        ConfigError: every problem found, with the source named.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (FileNotFoundError, IsADirectoryError):
            raise ConfigError([f"config file not found: {path}"], source) from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError([f"not valid YAML: {exc}"], source) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(["top level must be a mapping of sections"], source)
        data = loaded or {}
        if saved_run is None:
            saved_run = path.name == "config.yaml" and (path.parent / "run_info.json").is_file()
        data = _migrate_legacy(data, source, migrate=bool(saved_run))
        if saved_run:
            data = _fill_added_keys(data)
    if overrides:
        extra = parse_overrides(overrides)
        _migrate_legacy(extra, "command line", migrate=False)
        data = _merge(data, extra)
        source += " + command-line overrides"
    return config_from_dict(data, source)


RUN_CONFIG = "config.yaml"
"""The resolved config every run writes into its directory."""


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A finished run's saved config with dotted overrides deep-merged (`load_config` on `<run_dir>/config.yaml`).

    Raises:
        FileNotFoundError: not a run directory (no config.yaml; one line).
        ConfigError: a bad override or saved value (every problem listed).
    """
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory ({path} is missing): give the folder a "
                                "training run wrote (train.output_dir), or restore its config.yaml from a copy")
    return load_config(path, overrides, saved_run=True)


def shorthand_overrides(values: dict[str, Any]) -> list[str]:
    """Dotted overrides for a script's shorthand flags: {config key: value}; None (flag not given) and False
    (switch not given) are left out. Put explicit overrides after these so that they win."""
    out = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        out.append(f"{key}={'true' if value is True else value}")
    return out


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what the scripts' `--print-config` prints and runs save)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


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
    Path(path).write_text(dump_config(cfg))
