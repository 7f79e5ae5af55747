"""The run directory: what a run writes beside its checkpoints, and the final weights.

`write_run_info` (resolved `config.yaml` + `run_info.json`: package version, git sha, seed, prompt names and
hashes), `write_data_report`, `save_final` (the heads, any unfrozen base weights, and each active method's
own files, `Method.save`), `save_run` (final weights + `final_metrics.json` + `gate_stats.json`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import save_file

import mllm_mer
from mllm_mer.adapters.mose.model import GateStatsMean
from mllm_mer.backbone.loader import Backbone
from mllm_mer.config import RUN_CONFIG, RunConfig, config_to_dict, save_config
from mllm_mer.data.schema import Sample
from mllm_mer.model import BASE_FILE, HEAD_PREFIX, HEADS_FILE, MerModel
from mllm_mer.prompts import load_prompt

log = logging.getLogger(__name__)


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
    """`config.yaml` (resolved) and `run_info.json` (version, git sha, seed, prompt names and hashes).

    The saved config has `train.overwrite: false`: overwriting was an instruction about the directory's
    previous contents, already carried out; running the saved config again must not move its own run aside.
    """
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, overwrite=False)), out / RUN_CONFIG)
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
    """The run's weights into the run directory: every head (`heads.safetensors`), any unfrozen base weights
    (`trainable_base.safetensors`) and each active method's own files (`Method.save`, e.g. the peft adapter
    or `mose.safetensors`). All ranks call it (ZeRO-3 gathers the weights); the main process writes.

    Everything is written into `<output_dir>/.tmp-final` first, then each file or folder replaces its old
    version with one rename: a write that fails (an exception, a full disk) removes the temporary folder
    and leaves the previous final files, if any, as they were; a half-written `adapter/` never appears."""
    out = Path(cfg.train.output_dir)
    mer = _plain_model(accelerator, model)
    if mer is not None:  # no sharding: the state is the module's own (accelerate's path imports deepspeed)
        state = mer.state_dict()
    else:
        state = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards; full on the main process
    if not accelerator.is_main_process:
        return
    if mer is None:
        mer = accelerator.unwrap_model(model)
    tmp = out / FINAL_TMP
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for method in mer.methods:
            method.save(mer, state, tmp, cfg)
        heads = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        save_file(heads, str(tmp / HEADS_FILE))
        trainable = {n for n, p in mer.named_parameters() if p.requires_grad}
        owned = tuple(m.param_marker for m in mer.methods if m.param_marker)
        base = {k: v.detach().cpu().contiguous() for k, v in state.items()
                if k in trainable and not k.startswith(HEAD_PREFIX) and not any(mark in k for mark in owned)}
        if base:
            save_file(base, str(tmp / BASE_FILE))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for entry in sorted(tmp.iterdir()):
        replace_entry(entry, out / entry.name)
    tmp.rmdir()


def _plain_model(accelerator: Accelerator, model: torch.nn.Module) -> MerModel | None:
    """The `MerModel` inside `model` when nothing shards it (one process, or DDP on CPUs / GPUs), else None. Unlike `accelerator.unwrap_model`, it never imports deepspeed (about a second of start-up
    work that a plain run does not need)."""
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return None
    while isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
        model = model.module
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return model if isinstance(model, MerModel) else None


FINAL_TMP = ".tmp-final"
"""Where `save_final` writes before renaming into the run directory."""


def replace_entry(new: Path, target: Path) -> None:
    """Put the file or folder `new` at `target` with one rename; an old folder there is renamed aside first
    and removed after (a folder cannot be replaced by a rename while it exists)."""
    if new.is_dir() and target.exists():
        old = target.with_name(f".old-{target.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old)
    else:
        os.replace(new, target)


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
    extra = {"backbone_family": backbone.family.name, "num_processes": accelerator.num_processes,
             "distributed_type": str(accelerator.distributed_type.value)}
    write_run_info(cfg, backbone.path, {**extra, "total_steps": total})
    write_data_report(cfg, samples, skipped)


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
