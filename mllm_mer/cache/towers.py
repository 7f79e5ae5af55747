"""The frozen towers as the cache runs them: ready outside a training engine, one sample at a time.

`towers_ready` puts the audio and vision towers in eval mode on a device (under DeepSpeed ZeRO-3 it gathers
their partitioned parameters instead); `compute_entry` runs one sample through the processor and the towers
and returns its feature entry; `prompt_ids` is the processor's prompt of one sample and prompt variant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from mllm_mer.data.collate import MerCollator
from mllm_mer.data.schema import Sample
from mllm_mer.encoders import encode_audio, encode_video_full, is_zero3


@contextmanager
def towers_ready(thinker: nn.Module, device: torch.device | None = None) -> Iterator[None]:
    """The towers usable outside a training engine, in eval mode, for the block.

    Under DeepSpeed ZeRO-3 (parameters partitioned, see `mllm_mer.encoders.is_zero3`) their parameters are
    gathered on every rank (a collective: every rank must enter the block together); otherwise they are
    moved to `device` (and back afterwards).
    """
    towers = (thinker.model.audio_tower, thinker.model.visual)
    modes = [t.training for t in towers]
    before = [next(t.parameters()).device for t in towers]
    if is_zero3(thinker):
        # deepspeed is an optional extra ([deepspeed]) that is only imported here, where partitioned parameters
        # prove it is installed and loaded: importing it at module level would cost every script its import
        # time and its accelerator-detection warning
        import deepspeed

        params = [p for t in towers for p in t.parameters()]
        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        device = None
    else:
        ctx = nullcontext()
    with ctx:
        for t in towers:
            (t.to(device) if device is not None else t).eval()
        try:
            yield
        finally:
            for t, d, m in zip(towers, before, modes, strict=True):
                (t.to(d) if device is not None else t).train(m)


def prompt_collator(collator: MerCollator, use_video: bool, use_audio: bool) -> MerCollator:
    """A copy of `collator` that renders prompt-only batches of one variant (no answer, no modality dropout)."""
    return dataclasses.replace(collator, train=False, modality_dropout=0.0, use_video=use_video, use_audio=use_audio)


def compute_entry(
    collator: MerCollator, thinker: nn.Module, sample: Sample, media: Any, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One sample through the processor (all its media) and the towers.

    Returns:
        (the feature entry: `present` (2,) bool [has_video, has_audio]; with audio `audio` (M, D) and
        `audio_len` (1,); with video `video` (N, D), `video_grid_thw` (1, 3), `video_second_per_grid` (1,) and
        for a deepstack family `video_deepstack` (levels, N, D); the prompt `input_ids` (T,) of the
        audio + video variant).
    """
    batch = prompt_collator(collator, True, True)([(sample, media)])
    entry: dict[str, torch.Tensor] = {
        "present": torch.tensor([media.frames is not None, media.audio is not None], dtype=torch.bool)
    }
    if batch.get("input_features") is not None:
        fam = batch["feature_attention_mask"]
        entry["audio"] = encode_audio(thinker, batch["input_features"].to(device), fam.to(device))
        entry["audio_len"] = fam.sum(dim=1).to(torch.long)
    if batch.get("pixel_values_videos") is not None:
        grid = batch["video_grid_thw"]
        merged, deepstack = encode_video_full(thinker, batch["pixel_values_videos"].to(device), grid.to(device))
        entry["video"] = merged[0]
        if deepstack is not None:  # (levels, N, D)
            entry["video_deepstack"] = deepstack[0]
        entry["video_grid_thw"] = grid.to(torch.long)
        entry["video_second_per_grid"] = batch["video_second_per_grid"].to(torch.float32)
    return entry, batch["input_ids"][0]


def prompt_ids(collator: MerCollator, sample: Sample, media: Any, use_video: bool, use_audio: bool) -> torch.Tensor:
    """The processor's prompt `input_ids` (T,) for one sample and variant (no answer, no padding)."""
    return prompt_collator(collator, use_video, use_audio)([(sample, media)])["input_ids"][0]
