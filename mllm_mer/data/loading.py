"""Loaders for training, evaluation and inference: read and check the data, decode media once, collate.

Everything a script needs between a `RunConfig` and a DataLoader: `ensure_inputs` (build the tiny backbone /
synthetic set on first use), `read_splits` (every row checked before the model loads), the decode options and
caches (`decode_options`, `decode_cache_dir`, `load_media_on_ranks`), data checks (`check_data`,
`check_all_data`), collators (`base_collator`: the run's prompt; `build_collator`: wrapped by each active
method's `wrap_collator`) and loaders (`build_loader(s)` for training / dev, `build_inference_loader` for
generation and prediction). With `data.feature_cache` the training loaders serve the frozen towers' cached
outputs (`mllm_mer.cache`), through a collator the methods wrap the same way.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoProcessor

from mllm_mer.backbone.loader import Backbone
from mllm_mer.backbone.stage0 import install_stage0
from mllm_mer.backbone.tiny import ensure_tiny_thinker
from mllm_mer.cache import load_cached
from mllm_mer.config import RunConfig, feature_cache_enabled, feature_cache_note
from mllm_mer.data.collate import MerCollator
from mllm_mer.data.dataset import (
    DecodeOptions,
    check_media,
    decode_cache_dir,
    decode_options,
    load_media,
    load_media_on_ranks,
)
from mllm_mer.data.jsonl import DataError, read_jsonl
from mllm_mer.data.schema import Sample
from mllm_mer.data.sources import read_samples
from mllm_mer.data.synthetic import SyntheticConfig, ensure_synthetic_set
from mllm_mer.logs import say
from mllm_mer.model import active_methods
from mllm_mer.prompts import PromptTemplate, load_prompt


def ensure_inputs(cfg: RunConfig) -> None:
    """Build the tiny backbone (or install the shipped stage-0 one) and/or the synthetic set if the config asks
    for them and they are missing."""
    if cfg.model.build_tiny and cfg.model.tiny_weights == "stage0":
        install_stage0(cfg.model.path)
    elif cfg.model.build_tiny:
        ensure_tiny_thinker(cfg.model.path, arch=cfg.model.tiny_arch)
    if cfg.data.synthetic_dir is not None:
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
                                        skipped=skipped if skip else None, media_root=cfg.data.media_root)
            else:
                out[split] = read_samples(path, cfg.data.format, cfg.data.labels, label_field=cfg.data.label_field,
                                          media_root=cfg.data.media_root)
        except (ValueError, FileNotFoundError) as exc:
            errors.append(f"data.{split}: {exc}")
        if skipped and report is not None:
            report.setdefault(split, []).extend(skipped)
    if errors:
        raise DataError("the configured data", errors)
    return out


def check_data(samples: dict[str, list[Sample]], options: DecodeOptions) -> list[str]:
    """Decode every sample of every split; one problem line per bad sample, prefixed by the split."""
    return [f"{split}: {p}" for split, ss in samples.items()
            for p in check_media(ss, options, desc=f"check media ({split})")]


def check_all_data(cfg: RunConfig) -> tuple[list[str], int, int]:
    """Every row and every sample's media of train/dev/test: (problem lines, samples seen, splits)."""
    ensure_inputs(cfg)
    row_problems: dict[str, list[str]] = {}
    lenient = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_error="skip"))
    samples = read_splits(lenient, ("train", "dev", "test"), report=row_problems)
    processor = AutoProcessor.from_pretrained(cfg.model.path, local_files_only=True)
    problems = [f"{split}: {p}" for split, lines in row_problems.items() for p in lines]
    problems += check_data(samples, decode_options(cfg, processor))
    n = sum(len(s) for s in samples.values()) + sum(len(v) for v in row_problems.values())
    return problems, n, len(samples)


def base_collator(cfg: RunConfig, backbone: Backbone, train: bool, prompt: str | None = None) -> MerCollator:
    """The fused-path collator for training (`train=True`: modality dropout) or dev evaluation (both carry the
    answer), before the methods wrap it."""
    return MerCollator(
        processor=backbone.processor,
        token_ids=backbone.token_ids,
        prompt=load_prompt(prompt or cfg.data.prompt),
        system_prompt=load_prompt("system", kind="free").text,
        labels=cfg.data.labels,
        train=True,  # dev batches carry the answer too (dev LM loss)
        modality_dropout=cfg.data.modality_dropout if train else 0.0,
    )


def build_collator(cfg: RunConfig, backbone: Backbone, train: bool, prompt: str | None = None):
    """The collator for training (`train=True`, answers + modality dropout) or dev evaluation, wrapped by each
    active method (`Method.wrap_collator`; e.g. DCR adds the unimodal sub-batches)."""
    return wrap_collator(cfg, base_collator(cfg, backbone, train, prompt))


def wrap_collator(cfg: RunConfig, collator: MerCollator):
    """`collator` wrapped by every active method's `wrap_collator`, in method order."""
    for m in active_methods(cfg):
        collator = m.wrap_collator(collator, cfg)
    return collator


def prompt_variants(cfg: RunConfig) -> tuple[tuple[bool, bool], ...]:
    """The (use_video, use_audio) prompt variants a run's batches render: the fused one, the unimodal ones
    of `data.modality_dropout`, and those the active methods add (`Method.input_variants`); cache layouts."""
    variants = {(True, True)}
    if cfg.data.modality_dropout > 0:
        variants |= {(True, False), (False, True)}
    for m in active_methods(cfg):
        variants |= m.input_variants(cfg)
    return tuple(sorted(variants, reverse=True))


def build_loader(
    cfg: RunConfig, backbone: Backbone, samples: list[Sample], *, train: bool, accelerator: Accelerator,
    report: dict[str, list[str]] | None = None, split: str = "train",
) -> tuple[DataLoader, list[Sample]]:
    """A DataLoader over decoded samples and the samples it serves (bad ones dropped under on_error=skip).

    Decoding is cached once per sample; the main process decodes first, the others read the cache
    (`data.decode_cache=false`: the ranks split one checking pass, then items are decoded when read). With
    `data.feature_cache` the loader serves the frozen towers' cached outputs instead (`mllm_mer.cache`: the
    missing entries are filled first), in the main process (`data.num_workers` applies to the decoding
    loaders). Either way the active methods wrap the collator (`wrap_collator`).
    """
    collator = base_collator(cfg, backbone, train=train)
    workers = cfg.data.num_workers
    if feature_cache_enabled(cfg):
        samples, dataset, collator, problems = load_cached(
            cfg, backbone, samples, collator, prompt_variants(cfg), accelerator, split=split
        )
        workers = 0  # reading stored tensors costs less CPU than handing the batch over from a worker
    else:
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
        collate_fn=wrap_collator(cfg, collator),
        num_workers=workers,
        drop_last=False,
    )
    return loader, samples


def build_loaders(
    cfg: RunConfig,
    backbone: Backbone,
    samples: dict[str, list[Sample]],
    accelerator: Accelerator,
    report: dict[str, list[str]],
) -> tuple[DataLoader, DataLoader | None, dict[str, list[Sample]]]:
    """Train and (when `samples` has "dev") dev loaders via `build_loader`; says once (main process) why the
    frozen-encoder cache is off when a tower or projector trains (`config.feature_cache_note`).

    Returns:
        (train loader, dev loader or None, the samples each split serves: under `data.on_error=skip`
        the bad ones are dropped and their problems appended to `report[split]`).
    """
    note = feature_cache_note(cfg)  # why the frozen-encoder cache is off, when towers train
    if note and accelerator.is_main_process:
        say(note)
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


def build_inference_loader(
    cfg: RunConfig,
    backbone: Backbone,
    samples: Sequence[Sample],
    prompt: PromptTemplate,
    batch_size: int,
    *,
    use_video: bool = True,
    use_audio: bool = True,
    methods: bool = True,
) -> DataLoader:
    """Inference batches (generation prompt, left padding) of `samples`, in order.

    Args:
        cfg: the run config (data settings; the active methods wrap the collator).
        backbone: supplies the processor and special-token ids.
        prompt: the task template.
        use_video / use_audio: False removes that modality from every prompt (`MerCollator`'s flags; the
            media are still decoded). Method sub-batches (DCR's paths) keep their own fixed inputs.
        methods: wrap the collator by the active methods (False for a bare backbone without their parts).
    """
    options = decode_options(cfg, backbone.processor)
    _, dataset, _ = load_media(samples, options, decode_cache_dir(cfg))
    collator = MerCollator(
        processor=backbone.processor, token_ids=backbone.token_ids, prompt=prompt,
        system_prompt=load_prompt("system", kind="free").text, labels=cfg.data.labels, train=False,
        use_video=use_video, use_audio=use_audio,
    )
    return DataLoader(dataset, batch_size=batch_size, collate_fn=wrap_collator(cfg, collator) if methods else collator)
