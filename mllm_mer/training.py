"""Pieces of the fine-tuning loop that `scripts/finetune.py` wires together.

The script owns the loop; this module owns data preparation, optimizer and schedule, dev evaluation,
atomic checkpoints and the run directory. Everything here works the same on one process, under DDP
(gloo on CPU, NCCL on GPU) and under DeepSpeed, through `accelerate`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.utils import gather_object
from safetensors.torch import save_file
from torch.utils.data import DataLoader

import mllm_mer
from mllm_mer.adapters.mose import MOSE_WEIGHTS, GateStatsMean, save_mose_weights
from mllm_mer.backbone.loader import Backbone
from mllm_mer.config import RunConfig, config_to_dict, save_config
from mllm_mer.data.collate import MerCollator
from mllm_mer.data.dataset import DecodeOptions, check_media, check_share, load_media, streamed_media
from mllm_mer.data.jsonl import DataError, read_jsonl
from mllm_mer.data.schema import Sample
from mllm_mer.data.sources import read_samples
from mllm_mer.fusion.dcr.collate import UnimodalPathCollator
from mllm_mer.metrics import classification_metrics
from mllm_mer.model import MerModel
from mllm_mer.prompts import load_prompt

log = logging.getLogger(__name__)

CKPT_PREFIX = "step_"
CKPT_DONE = "mllm_mer_state.json"
"""Written last inside a checkpoint: a directory without it is incomplete and ignored."""


# ------------------------------------------------------------------------------------------------ data
def ensure_inputs(cfg: RunConfig) -> None:
    """Build the tiny backbone and/or the synthetic set if the config asks for them and they are missing."""
    if cfg.model.build_tiny:
        from mllm_mer.backbone.tiny import ensure_tiny_thinker

        ensure_tiny_thinker(cfg.model.path, arch=cfg.model.tiny_arch)
    if cfg.data.synthetic_dir is not None:
        from mllm_mer.data.synthetic import SyntheticConfig, ensure_synthetic_set

        workers = min(2, os.cpu_count() or 1)
        ensure_synthetic_set(cfg.data.synthetic_dir, SyntheticConfig(seed=cfg.data.synthetic_seed), workers=workers)


def read_splits(
    cfg: RunConfig, splits: tuple[str, ...] = ("train", "dev"), report: dict[str, list[str]] | None = None
) -> dict[str, list[Sample]]:
    """Read and validate the data files of `splits` (all problems of all files raised together).

    With `data.on_error=skip` (our JSONL format), bad rows are dropped and their problems appended to
    `report[split]` instead.
    """
    out: dict[str, list[Sample]] = {}
    errors: list[str] = []
    skip = cfg.data.on_error == "skip" and cfg.data.format == "mer_jsonl"
    for split in splits:
        path = getattr(cfg.data, split)
        if not path:
            continue
        skipped: list[str] = []
        try:
            if cfg.data.format == "mer_jsonl":
                out[split] = read_jsonl(path, cfg.data.labels, max_subtitle_chars=cfg.data.max_subtitle_chars,
                                        skipped=skipped if skip else None)
            else:
                out[split] = read_samples(path, cfg.data.format, cfg.data.labels, label_field=cfg.data.label_field)
        except (ValueError, FileNotFoundError) as exc:
            errors.append(f"data.{split}: {exc}")
        if skipped and report is not None:
            report.setdefault(split, []).extend(skipped)
    if errors:
        raise DataError("the configured data", errors)
    return out


def decode_options(cfg: RunConfig, processor) -> DecodeOptions:
    fe = processor.feature_extractor
    window = float(fe.chunk_length)
    return DecodeOptions(
        fps=cfg.data.fps,
        max_frames=cfg.data.max_frames,
        sample_rate=int(fe.sampling_rate),
        max_audio_seconds=min(window, cfg.data.max_audio_seconds or window),
        allow_silent_audio=cfg.data.allow_silent_audio,
    )


def decode_cache_dir(cfg: RunConfig) -> str | None:
    """The `datasets` decode cache of the run (`data.cache_dir`), or None with `data.decode_cache=false`."""
    return cfg.data.cache_dir if cfg.data.decode_cache else None


def load_media_on_ranks(
    samples: list[Sample],
    options: DecodeOptions,
    cache_dir: str | None,
    skip_bad: bool,
    accelerator: Accelerator | None,
) -> tuple[list[Sample], torch.utils.data.Dataset, list[str]]:
    """`load_media` for every rank: with a decode cache the main process decodes first and the others read
    the cache; without one (`cache_dir` None) the ranks split the checking pass and share what they found.
    `accelerator` None: one process."""
    if accelerator is None:
        return load_media(samples, options, cache_dir, skip_bad=skip_bad)
    if cache_dir is not None:
        with accelerator.main_process_first():
            return load_media(samples, options, cache_dir, skip_bad=skip_bad)
    bad = check_share(samples, options, accelerator.process_index, accelerator.num_processes)
    if accelerator.num_processes > 1:
        bad = gather_object(bad)
    return streamed_media(samples, options, bad, skip_bad=skip_bad)


def check_data(samples: dict[str, list[Sample]], options: DecodeOptions) -> list[str]:
    """Decode every sample of every split; one problem line per bad sample, prefixed by the split."""
    return [f"{split}: {p}" for split, ss in samples.items() for p in check_media(ss, options)]


def build_collator(
    cfg: RunConfig, backbone: Backbone, train: bool, prompt: str | None = None
) -> MerCollator | UnimodalPathCollator:
    """The collator for training (`train=True`, answers + modality dropout) or dev evaluation.

    With `dcr.enabled` it is wrapped in `UnimodalPathCollator` (batches also carry the unimodal sub-batches).
    """
    collator = MerCollator(
        processor=backbone.processor,
        token_ids=backbone.token_ids,
        prompt=load_prompt(prompt or cfg.data.prompt),
        system_prompt=load_prompt("system", kind="free").text,
        labels=cfg.data.labels,
        train=True,  # dev batches carry the answer too (dev LM loss)
        modality_dropout=cfg.data.modality_dropout if train else 0.0,
    )
    return UnimodalPathCollator(collator) if cfg.dcr.enabled else collator


def build_loader(
    cfg: RunConfig, backbone: Backbone, samples: list[Sample], *, train: bool, accelerator: Accelerator,
    report: dict[str, list[str]] | None = None, split: str = "train",
) -> tuple[DataLoader, list[Sample]]:
    """A DataLoader over decoded samples and the samples it serves (bad ones dropped under on_error=skip).

    Decoding is cached once per sample; the main process decodes first, the others read the cache
    (`data.decode_cache=false`: the ranks split one checking pass, then items are decoded when read). With
    `data.feature_cache` the loader serves the frozen towers' cached outputs instead (`mllm_mer.cache`).
    """
    if cfg.data.feature_cache:
        from mllm_mer.cache import build_cached_loader

        collator = build_collator(cfg, backbone, train=train)
        return build_cached_loader(cfg, backbone, samples, collator, train=train, accelerator=accelerator,
                                   report=report, split=split)
    options = decode_options(cfg, backbone.processor)
    samples, dataset, problems = load_media_on_ranks(
        samples, options, decode_cache_dir(cfg), cfg.data.on_error == "skip", accelerator
    )
    if problems and report is not None:
        report.setdefault(split, []).extend(problems)
    if not samples:
        raise DataError(f"data.{split}", ["no usable samples left after skipping bad ones", *problems])
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size if train else cfg.train.eval_batch_size,
        shuffle=train,
        collate_fn=build_collator(cfg, backbone, train=train),
        num_workers=cfg.data.num_workers,
        drop_last=False,
    )
    return loader, samples


# ------------------------------------------------------------------------------------------- optimizer
def build_optimizer(
    model: MerModel, cfg: RunConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with the heads at `train.head_lr` and everything else at `train.lr`; linear warmup + cosine."""
    heads = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("fusion_")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("fusion_")]
    groups = [{"params": rest, "lr": cfg.train.lr}, {"params": heads, "lr": cfg.train.head_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.train.weight_decay)
    warmup = int(round(cfg.train.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, cfg: RunConfig, samples: list[Sample]
) -> dict:
    """Fused-head predictions on `loader` -> accuracy, weighted F1, per-subset accuracy (all ranks)."""
    model.eval()
    by_id = {s.id: s for s in samples}
    ids: list[str] = []
    preds: list[int] = []
    losses: list[float] = []
    for batch in loader:
        out = model(batch)
        pred = out.cls_logits["fused"].argmax(dim=-1)
        ids.extend(batch["sample_ids"])
        preds.extend(pred.tolist())
        if out.loss is not None:
            losses.append(float(out.loss))
    model.train()
    ids = gather_object(ids)
    preds = gather_object(preds)
    seen: dict[str, int] = {}
    for sid, p in zip(ids, preds, strict=True):
        seen.setdefault(sid, p)  # ranks may repeat samples to even out the last batch
    labels = list(cfg.data.labels)
    y_true = [by_id[s].label for s in seen]
    y_pred = [labels[p] for p in seen.values()]
    metrics = classification_metrics(y_true, y_pred, labels, [by_id[s].subset for s in seen])
    metrics["loss"] = float(sum(losses) / len(losses)) if losses else None
    return metrics


# ---------------------------------------------------------------------------------------- checkpoints
@dataclass
class TrainState:
    """Loop position stored in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def any_rank(flag: bool, accelerator: Accelerator) -> bool:
    """True on every rank when `flag` is True on any rank (so all ranks take the same branch)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf under `train.nan_policy=stop` (or too many batches were skipped)."""


def handle_nonfinite(cfg: RunConfig, state: TrainState, sample_ids: list[str], skipped: int, value: float) -> None:
    """Apply `train.nan_policy` to a non-finite loss: log and skip the batch, or stop with the details."""
    latest = find_latest_checkpoint(cfg.train.output_dir)
    where = (f"loss={value} at step {state.step + 1} (epoch {state.epoch}, batch {state.batch_in_epoch}) on samples "
             f"{sample_ids[:8]}; last good checkpoint: {latest or 'none'}")
    if cfg.train.nan_policy == "stop":
        raise NonFiniteLossError(f"non-finite {where}. Set train.nan_policy=skip to skip such batches.")
    if skipped > cfg.train.max_nonfinite_skips:
        raise NonFiniteLossError(f"more than train.max_nonfinite_skips={cfg.train.max_nonfinite_skips} "
                                 f"non-finite batches; the last: {where}")
    log.warning("skipping batch with non-finite %s (%d skipped so far)", where, skipped)


def batch_seed(seed: int, rank: int, state: TrainState) -> int:
    """The torch seed set before each micro-batch, so random draws never depend on loop history."""
    return (seed * 1_000_003 + rank * 10_007 + state.epoch * 100_003 + state.batch_in_epoch) % (2**63 - 1)


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `<output_dir>/checkpoints`, or None.

    Incomplete directories (no `mllm_mer_state.json`, e.g. a run killed while saving) are skipped with a
    warning.
    """
    root = Path(output_dir) / "checkpoints"
    best: tuple[int, Path] | None = None
    for d in root.glob(f"{CKPT_PREFIX}*"):
        if not (d / CKPT_DONE).is_file():
            log.warning("ignoring incomplete checkpoint %s (no %s)", d, CKPT_DONE)
            continue
        try:
            step = int(d.name[len(CKPT_PREFIX):])
        except ValueError:
            continue
        if best is None or step > best[0]:
            best = (step, d)
    return best[1] if best else None


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, state: TrainState, keep: int) -> Path:
    """Write model/optimizer/scheduler/RNG/sampler state atomically: temp dir, marker file, rename."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"{CKPT_PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{CKPT_PREFIX}{state.step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CKPT_DONE).write_text(json.dumps(state.__dict__))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(d for d in root.glob(f"{CKPT_PREFIX}*") if (d / CKPT_DONE).is_file())
        for old in done[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint `train.resume_from` points at (None = start fresh).

    Raises:
        FileNotFoundError: an explicit checkpoint path that does not hold a complete checkpoint.
    """
    spec = cfg.train.resume_from
    if spec is None:
        return None
    if spec == "latest":
        latest = find_latest_checkpoint(cfg.train.output_dir)
        if latest is None:
            log.warning("train.resume_from=latest: no checkpoint under %s; starting fresh", cfg.train.output_dir)
        return latest
    path = Path(spec)
    if not (path / CKPT_DONE).is_file():
        raise FileNotFoundError(f"train.resume_from={spec!r} is not a complete checkpoint (no {CKPT_DONE})")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainState:
    """Restore model/optimizer/scheduler/sampler/RNG state; only weights-only (no code) files are accepted.

    Raises:
        ValueError: a checkpoint file holds arbitrary pickled objects (refused, never executed).
    """
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to load {path}: a file there is not a weights-only checkpoint (it contains pickled "
            f"objects that could run code). Delete that checkpoint or resume from another. ({exc})"
        ) from None
    return TrainState(**json.loads((path / CKPT_DONE).read_text()))


# ------------------------------------------------------------------------------------------- run dir
def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_run_info(cfg: RunConfig, backbone_path: str, extra: dict | None = None) -> None:
    """`config.yaml` (resolved) and `run_info.json` (version, git sha, seed, prompt names and hashes)."""
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    prompts = {name: load_prompt(name, kind=kind).sha256 for name, kind in ((cfg.data.prompt, "task"), ("system", "free"))}
    info = {
        "package": "mllm_mer",
        "version": mllm_mer.__version__,
        "git_sha": git_sha(),
        "seed": cfg.train.seed,
        "backbone": backbone_path,
        "prompts": prompts,
        "labels": list(cfg.data.labels),
        "torch": torch.__version__,
        **(extra or {}),
    }
    (out / "run_info.json").write_text(json.dumps(info, indent=2))


def save_final(accelerator: Accelerator, model: torch.nn.Module, cfg: RunConfig) -> None:
    """Adapter (peft format, safetensors) or MoSE weights (`mose.safetensors`), heads and any unfrozen base
    weights into the run directory."""
    out = Path(cfg.train.output_dir)
    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; full on the main process
    if not accelerator.is_main_process:
        return
    mer: MerModel = accelerator.unwrap_model(model)
    if cfg.mose.enabled:  # names relative to the thinker, as the peft adapter's
        mose_state = {k[len("backbone."):]: v for k, v in state.items() if ".mose_" in k}
        save_mose_weights(mose_state, out / MOSE_WEIGHTS, cfg.mose)
    elif cfg.lora.enabled:
        adapter_state = {k[len("backbone."):]: v for k, v in state.items() if ".lora_" in k}
        mer.backbone.save_pretrained(str(out / "adapter"), state_dict=adapter_state, safe_serialization=True)
    heads = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("fusion_")}
    save_file(heads, str(out / "heads.safetensors"))
    trainable = {n for n, p in mer.named_parameters() if p.requires_grad}
    base = {k: v.detach().cpu().contiguous() for k, v in state.items()
            if k in trainable and ".lora_" not in k and ".mose_" not in k and not k.startswith("fusion_")}
    if base:
        save_file(base, str(out / "trainable_base.safetensors"))


def check_all_data(cfg: RunConfig) -> tuple[list[str], int, int]:
    """Every row and every sample's media of train/dev/test: (problem lines, samples seen, splits)."""
    from transformers import AutoProcessor

    ensure_inputs(cfg)
    row_problems: dict[str, list[str]] = {}
    lenient = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_error="skip"))
    samples = read_splits(lenient, ("train", "dev", "test"), report=row_problems)
    processor = AutoProcessor.from_pretrained(cfg.model.path, local_files_only=True)
    problems = [f"{split}: {p}" for split, lines in row_problems.items() for p in lines]
    problems += check_data(samples, decode_options(cfg, processor))
    n = sum(len(s) for s in samples.values()) + sum(len(v) for v in row_problems.values())
    return problems, n, len(samples)


def report_dev(model, dev_dl, accelerator: Accelerator, cfg: RunConfig, samples: list[Sample], step: int,
               writer) -> dict:
    """Dev metrics on every rank; the main process prints them and writes them to TensorBoard."""
    m = evaluate(model, dev_dl, accelerator, cfg, samples)
    if accelerator.is_main_process:
        subsets = " ".join(f"{k}={v['accuracy']:.3f}" for k, v in m["per_subset"].items())
        print(f"[dev step {step}] accuracy={m['accuracy']:.3f} weighted_f1={m['weighted_f1']:.3f} {subsets}")
        writer.add_scalar("dev/accuracy", m["accuracy"], step)
        writer.add_scalar("dev/weighted_f1", m["weighted_f1"], step)
        for k, v in m["per_subset"].items():
            writer.add_scalar(f"dev/accuracy_{k}", v["accuracy"], step)
    return m


def log_train_step(writer, log_file: Path, step: int, out, lr: float, step_time: float) -> dict:
    """One `train_log.jsonl` row (losses, lr, seconds/step) mirrored to TensorBoard, plus MoSE gate stats."""
    from mllm_mer.adapters.mose import flatten_gate_stats

    row = {"step": step, "loss": out.loss.item(), "lr": lr, "step_time": step_time}
    for k in ("lm_loss", "cls_loss"):
        if getattr(out, k) is not None:
            row[k] = getattr(out, k).item()
    row.update({k: v.item() for k, v in out.aux_losses.items()})
    for k, v in row.items():
        if k != "step":
            writer.add_scalar(f"train/{k}", v, step)
    for k, v in flatten_gate_stats(out.gate_stats).items():  # empty without MoSE
        writer.add_scalar(f"mose/{k}", v, step)
    with log_file.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def write_data_report(cfg: RunConfig, samples: dict[str, list[Sample]], skipped: dict[str, list[str]]) -> None:
    """`data_report.json`: samples used per split and, under data.on_error=skip, every skipped problem."""
    report = {split: {"used": len(ss), "skipped": len(skipped.get(split, [])), "problems": skipped.get(split, [])}
              for split, ss in samples.items()}
    write_json(Path(cfg.train.output_dir) / "data_report.json", report)
    for split, lines in skipped.items():
        log.warning("data.on_error=skip: skipped %d bad sample(s) in %s (see data_report.json)", len(lines), split)


def write_json(path: str | Path, data: dict) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def config_summary(cfg: RunConfig) -> str:
    return json.dumps(config_to_dict(cfg), indent=1)


# ------------------------------------------------------------------------------------- loop helpers
def build_accelerator(cfg: RunConfig) -> Accelerator:
    """The run's `Accelerator`: `train.grad_accum`, `train.mixed_precision`, seedable samplers, gloo when
    several processes run without CUDA."""
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else [],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=None,
    )


def build_loaders(
    cfg: RunConfig,
    backbone: Backbone,
    samples: dict[str, list[Sample]],
    accelerator: Accelerator,
    report: dict[str, list[str]],
) -> tuple[DataLoader, DataLoader | None, dict[str, list[Sample]]]:
    """Train and (when `samples` has "dev") dev loaders via `build_loader`.

    Returns:
        (train loader, dev loader or None, the samples each split serves: under `data.on_error=skip`
        the bad ones are dropped and their problems appended to `report[split]`).
    """
    kept = dict(samples)
    train_dl, kept["train"] = build_loader(
        cfg, backbone, samples["train"], train=True, accelerator=accelerator, report=report, split="train"
    )
    dev_dl = None
    if "dev" in samples:
        dev_dl, kept["dev"] = build_loader(
            cfg, backbone, samples["dev"], train=False, accelerator=accelerator, report=report, split="dev"
        )
    return train_dl, dev_dl, kept


def total_steps(cfg: RunConfig, num_batches: int, num_processes: int) -> int:
    """Optimizer steps of the run: `train.max_steps` when > 0, else `train.epochs` epochs of
    `num_batches` (the per-process loader length before sharding) split over processes and grad_accum."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return cfg.train.epochs * -(-num_batches // (cfg.train.grad_accum * num_processes))


def open_writer(cfg: RunConfig, accelerator: Accelerator) -> torch.utils.tensorboard.SummaryWriter | None:
    """The TensorBoard writer (`<output_dir>/tb`) on the main process; None on the others."""
    if not accelerator.is_main_process:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(Path(cfg.train.output_dir) / "tb"))


class LoopGuard:
    """The loop's two stop rules: `train.nan_policy` on a non-finite loss, and the `train.max_minutes` budget.

    Both are decided on every rank together (`any_rank`), so all processes skip or stop at the same batch.
    The clock starts when the guard is made (just before the loop).

    Attributes:
        nonfinite_skipped: batches skipped so far for a NaN/inf loss (`final_metrics.json`).
        stopped_early: True once the time budget stopped the run.
    """

    def __init__(self, cfg: RunConfig, accelerator: Accelerator) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.started = time.time()
        self.nonfinite_skipped = 0
        self.stopped_early = False

    def skip_nonfinite(
        self, loss: torch.Tensor, state: TrainState, sample_ids: list[str], optimizer: torch.optim.Optimizer
    ) -> bool:
        """True when the loss is NaN/inf on any rank: the batch is dropped (gradients zeroed, the batch
        counted in `state.batch_in_epoch`) and the caller moves on to the next one.

        Args:
            loss: () float, this rank's loss of the current micro-batch.
            state: loop position (named in the warning or error; `batch_in_epoch` advanced on a skip).
            sample_ids: the batch's sample ids (the first 8 are named).
            optimizer: its gradients are zeroed on a skip.
        Raises:
            NonFiniteLossError: under `train.nan_policy=stop`, or after more than
                `train.max_nonfinite_skips` skipped batches (see `handle_nonfinite`).
        """
        if not any_rank(not torch.isfinite(loss).item(), self.accelerator):
            return False
        self.nonfinite_skipped += 1
        handle_nonfinite(self.cfg, state, sample_ids, self.nonfinite_skipped, loss.item())
        optimizer.zero_grad()
        state.batch_in_epoch += 1
        return True

    def out_of_time(self, state: TrainState) -> bool:
        """True when `train.max_minutes` (> 0) has passed on any rank; sets `stopped_early` and says so on
        the main process. Always False without a budget."""
        budget = self.cfg.train.max_minutes
        if not budget or not any_rank(time.time() - self.started > 60 * budget, self.accelerator):
            return False
        self.stopped_early = True
        if self.accelerator.is_main_process:
            print(
                f"train.max_minutes={budget} reached at step {state.step}: saving and "
                "stopping; continue with train.resume_from=latest"
            )
        return True

    def summary(self) -> dict[str, bool | int]:
        """`{"stopped_early", "nonfinite_skipped"}` for `final_metrics.json`."""
        return {"stopped_early": self.stopped_early, "nonfinite_skipped": self.nonfinite_skipped}


def epoch_batches(accelerator: Accelerator, loader: DataLoader, state: TrainState) -> DataLoader:
    """The batches of epoch `state.epoch` (the sampler reseeded for it), without the first
    `state.batch_in_epoch` ones, which a resumed run has already trained on."""
    loader.set_epoch(state.epoch)
    if state.batch_in_epoch:
        return accelerator.skip_first_batches(loader, state.batch_in_epoch)
    return loader


class StepTimer:
    """Mean wall-clock seconds per optimizer step between two `lap()` calls."""

    def __init__(self, step: int) -> None:
        """Start the clock at optimizer step `step` (the run's first step, or the resumed one)."""
        self._clock = time.perf_counter
        self._start, self._step = self._clock(), step

    def lap(self, step: int) -> float:
        """Seconds per step from the previous lap (or the start) to optimizer step `step`; restarts there."""
        now = self._clock()
        seconds = (now - self._start) / (step - self._step)
        self._start, self._step = now, step
        return seconds


def write_run_start(
    cfg: RunConfig,
    accelerator: Accelerator,
    backbone: Backbone,
    trainable_table: str,
    total: int,
    samples: dict[str, list[Sample]],
    skipped: dict[str, list[str]],
) -> None:
    """On the main process: print the trainable-parameter table, write `config.yaml` + `run_info.json`
    (`write_run_info`, with backbone family, process count and `total` steps) and `data_report.json`."""
    if not accelerator.is_main_process:
        return
    print(trainable_table)
    extra = {"backbone_family": backbone.family.name, "num_processes": accelerator.num_processes}
    write_run_info(cfg, backbone.path, {**extra, "total_steps": total})
    write_data_report(cfg, samples, skipped)


def resume_state(accelerator: Accelerator, checkpoint: Path | None) -> TrainState:
    """The loop position to start from: restored from `checkpoint` (said on the main process) or fresh."""
    if checkpoint is None:
        return TrainState()
    state = load_checkpoint(accelerator, checkpoint)
    if accelerator.is_main_process:
        print(f"resumed from {checkpoint} at step {state.step}")
    return state


def save_run(
    accelerator: Accelerator,
    model: torch.nn.Module,
    cfg: RunConfig,
    final: dict,
    gate_mean: GateStatsMean,
) -> None:
    """The run's outputs: weights (`save_final`, all ranks take part), then on the main process
    `final_metrics.json` (`final`) and, when any batch had MoSE gate statistics, `gate_stats.json`
    (`{"step": final["step"], "train": gate_mean.summary()}`)."""
    save_final(accelerator, model, cfg)
    if not accelerator.is_main_process:
        return
    out = Path(cfg.train.output_dir)
    write_json(out / "final_metrics.json", final)
    if gate_mean.steps:
        write_json(out / "gate_stats.json", {"step": final["step"], "train": gate_mean.summary()})
