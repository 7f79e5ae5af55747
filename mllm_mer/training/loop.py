"""Pieces of the fine-tuning loop that `scripts/finetune.py` wires together (the script owns the loop).

The accelerator, optimizer and schedule, the step count, the NaN / time-budget guard, epoch iteration with
exact resume, step timing and logging. Everything works the same on one process, under DDP (gloo on CPU,
NCCL on GPU) and under DeepSpeed, through `accelerate`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from mllm_mer.adapters.mose.model import flatten_gate_stats
from mllm_mer.config import RunConfig
from mllm_mer.model import HEAD_PREFIX, MerModel
from mllm_mer.training.checkpoint import TrainState, find_latest_checkpoint

log = logging.getLogger(__name__)


def build_accelerator(cfg: RunConfig) -> Accelerator:
    """The run's `Accelerator`: `train.grad_accum`, `train.mixed_precision`, seedable samplers, gloo when
    several processes run without CUDA.

    Several processes without CUDA and without DeepSpeed also get `cpu=True`: accelerate's multi-GPU launcher
    (`configs/accelerate/ddp_cpu.yaml`) does not pass the config's `use_cpu` on, and without it accelerate
    treats every process as a run of its own (no DDP wrapping, so no gradient sync; gathers, reductions and
    broadcasts do nothing). DeepSpeed keeps `cpu=False` (`cpu=True` would switch it off)."""
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return Accelerator(
        cpu=distributed_cpu and not deepspeed,
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else [],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=None,
    )


def build_optimizer(
    model: MerModel, cfg: RunConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with the heads at `train.head_lr` and everything else at `train.lr`; linear warmup + cosine."""
    heads = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(HEAD_PREFIX)]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(HEAD_PREFIX)]
    groups = [{"params": rest, "lr": cfg.train.lr}, {"params": heads, "lr": cfg.train.head_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.train.weight_decay)
    warmup = int(round(cfg.train.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def after_training(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, cfg: RunConfig) -> dict:
    """Each active method's closed-form step once the gradient steps are done (`Method.after_training`, e.g.
    DCR's reliability heads), on the training loader; all ranks call it. Returns {summary key: summary}."""
    mer = accelerator.unwrap_model(model)
    fitted: dict = {}
    for method in mer.methods:
        summary = method.after_training(model, mer, loader, accelerator, cfg)
        if summary:
            fitted.update(summary)
    return fitted


def total_steps(cfg: RunConfig, num_batches: int, num_processes: int) -> int:
    """Optimizer steps of the run: `train.max_steps` when > 0, else `train.epochs` epochs of
    `num_batches` (the per-process loader length before sharding) split over processes and grad_accum."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return cfg.train.epochs * -(-num_batches // (cfg.train.grad_accum * num_processes))


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


class Throughput:
    """What this run trained and how long it took, in Hugging Face Trainer's names (`final_metrics.json`).

    The clock (wall time) starts when it is made, just before the loop, and stops at `metrics`; dev passes
    during training count, the final one does not (as in `Trainer.train`). Samples and tokens are those this
    run trained on (a resumed run counts from the resume point), summed over the ranks; tokens are the
    non-padding prompt + answer positions of the fused batch (`attention_mask`), without method sub-batches.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.samples = 0
        self.steps = 0
        self._tokens: torch.Tensor | int = 0  # summed on the batch's device: no host sync per step

    def add(self, batch: dict) -> None:
        """Count one micro-batch (`sample_ids`: list of B ids; `attention_mask`: (B, T))."""
        self.samples += len(batch["sample_ids"])
        self._tokens = self._tokens + batch["attention_mask"].sum()

    def metrics(self, accelerator: Accelerator) -> dict[str, float | int]:
        """`{"train_runtime", "train_samples", "train_tokens", "train_samples_per_second",
        "train_steps_per_second", "train_tokens_per_second"}` (seconds; totals over the ranks). Every rank
        calls it (the totals are reduced)."""
        runtime = time.perf_counter() - self.started
        counts = torch.tensor([self.samples, int(self._tokens)], dtype=torch.long, device=accelerator.device)
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, reduction="sum")
        samples, tokens = (int(c) for c in counts.tolist())
        per_second = (lambda n: round(n / runtime, 3)) if runtime > 0 else (lambda n: 0.0)
        return {
            "train_runtime": round(runtime, 4),
            "train_samples": samples,
            "train_tokens": tokens,
            "train_samples_per_second": per_second(samples),
            "train_steps_per_second": per_second(self.steps),
            "train_tokens_per_second": per_second(tokens),
        }


def open_writer(cfg: RunConfig, accelerator: Accelerator) -> SummaryWriter | None:
    """The TensorBoard writer (`<output_dir>/tb`) on the main process; None on the others."""
    if not accelerator.is_main_process:
        return None
    return SummaryWriter(str(Path(cfg.train.output_dir) / "tb"))


def log_train_step(writer, log_file: Path, step: int, out, lr: float, step_time: float) -> dict:
    """One `train_log.jsonl` row (losses, lr, seconds/step) mirrored to TensorBoard, plus MoSE gate stats."""
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
