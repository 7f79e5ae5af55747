"""The frozen audio and vision encoders run outside the thinker's forward; their outputs enter as embeddings.

The thinker's own forward embeds `input_ids`, runs the audio tower on `input_features` and the vision tower
on `pixel_values_videos`, and scatters their outputs into the embeddings at the `<|AUDIO|>` / `<|VIDEO|>`
placeholder positions. `backbone_inputs` builds the keyword arguments of that forward from a collated batch
and does the scattering itself in two cases:

- **cached features** (`mllm_mer.cache`): the batch carries `audio_embeds` / `video_embeds` (the towers'
  outputs, read from the frozen-encoder cache) instead of the raw features. The thinker gets
  `inputs_embeds` (token embeddings with the features scattered in, exactly `masked_scatter` as the thinker
  does) together with `input_ids`, `attention_mask`, `feature_attention_mask` (mel lengths only),
  `video_grid_thw` and `video_second_per_grid`, from which it computes the same 3D (TMRoPE) position ids.
  No tower runs.
- **DeepSpeed ZeRO-3** (parameters partitioned, detected from DeepSpeed's `ds_id` on the parameters): every
  module call gathers its parameters with a collective, so every rank must call the same modules in the
  same order. A rank whose batch lacks video would skip the vision tower while its peers gather it, and the
  run hangs. Here the audio tower and then the vision tower run on every call of every rank, on a minimal
  dummy input when the batch lacks that modality (its output enters the embeddings multiplied by 0), before
  the language model.

Otherwise the batch's processor outputs go to the thinker unchanged (the default path, bitwise as before).
Both families (`mllm_mer.backbone.families`). Deepstack (Qwen3-Omni): the vision tower also returns, per
deepstack level, features that the language model adds to the video positions' hidden states after its
first layers; scattering alone does not reproduce them. For such a family the batch also carries
`video_deepstack` (levels, sum_j N_j, D) (or the tower runs, ZeRO-3), and the thinker additionally gets
`mm_encoder_outputs={"video": BaseModelOutputWithDeepstackFeatures(pooler_output=per-video tuple,
deepstack_features=[per-video tuple per level])}`: its forward re-scatters the merged features (the same
values), builds the video position mask from `input_ids` and applies the deepstack features, exactly as
when it runs the tower itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import peft
import torch
from torch import nn

from mllm_mer.backbone.families import FAMILIES, BackboneFamily, family_of

CACHED_FEATURE_KEYS: tuple[str, ...] = ("audio_embeds", "video_embeds")
"""Batch keys of cached tower outputs: (sum_i M_i, D) audio rows and (sum_j N_j, D) video rows (deepstack
families also carry `video_deepstack`, (levels, sum_j N_j, D))."""
EMBEDS_PASSTHROUGH: tuple[str, ...] = (
    "attention_mask",
    "feature_attention_mask",
    "video_grid_thw",
    "video_second_per_grid",
    "pixel_values",
    "image_grid_thw",
)
"""Batch keys the thinker still needs beside `inputs_embeds` (masks and 3D position ids; images, which our
collators never produce, still go through the thinker's own image path)."""
SUPPORTED_THINKERS: tuple[str, ...] = tuple(f.thinker_model_type for f in FAMILIES.values())
log = logging.getLogger(__name__)


def unwrap_thinker(backbone: nn.Module) -> nn.Module:
    """The thinker inside a peft model (with its adapter layers injected), or `backbone` itself."""
    if isinstance(backbone, peft.PeftModel):
        return backbone.get_base_model()
    return backbone


def check_supported(thinker: nn.Module) -> None:
    """Raise ValueError unless `thinker` is a thinker of a supported family (the layouts this module knows)."""
    model_type = getattr(getattr(thinker, "config", None), "model_type", None)
    if model_type not in SUPPORTED_THINKERS:
        raise ValueError(
            f"running the encoders outside the thinker (data.feature_cache) supports "
            f"{list(SUPPORTED_THINKERS)}, not model_type={model_type!r}"
        )


def is_zero3(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned `module`'s parameters (they carry a `ds_id`)."""
    param = next(module.parameters(), None)
    return param is not None and hasattr(param, "ds_id")


def encode_audio(
    thinker: nn.Module, input_features: torch.Tensor, feature_attention_mask: torch.Tensor
) -> torch.Tensor:
    """Audio tower + projector output, the rows the thinker scatters into its `<|AUDIO|>` positions.

    Args:
        thinker: a thinker of a supported family.
        input_features: (A, n_mels, L) log-mel features of A audios (padded).
        feature_attention_mask: (A, L) 1 on valid mel frames.
    Returns:
        (sum_i M_i, D) features, audio after audio, M_i = the i-th audio's token count.
    """
    out = thinker.model.get_audio_features(input_features, feature_attention_mask, return_dict=True)
    return out.last_hidden_state


def encode_video(
    thinker: nn.Module, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Vision tower + merger output per video.

    Args:
        thinker: a thinker of a supported family.
        pixel_values_videos: (sum_j t_j h_j w_j, C * temporal_patch * patch^2) flattened patches.
        video_grid_thw: (V, 3) long, the patch grid of each video.
    Returns:
        V tensors, (N_j, D) each, N_j = t_j h_j w_j / merge^2.
    """
    return encode_video_full(thinker, pixel_values_videos, video_grid_thw)[0]


def encode_video_full(
    thinker: nn.Module, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """Vision tower output per video: the merged features and, for a deepstack family, the deepstack ones.

    Returns:
        (V tensors (N_j, D), V tensors (levels, N_j, D) or None when the family has no deepstack).
    """
    out = thinker.model.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
    merged = tuple(out.pooler_output)
    if not family_of(thinker.config).deepstack:
        return merged, None
    levels = out.deepstack_features  # per level: V tensors (N_j, D)
    return merged, tuple(torch.stack([lv[j] for lv in levels]) for j in range(len(merged)))


def deepstack_outputs(
    thinker: nn.Module, video: torch.Tensor, deepstack: torch.Tensor, grid: torch.Tensor, like: torch.Tensor
) -> object:
    """`mm_encoder_outputs["video"]` for a deepstack thinker from concatenated rows.

    Args:
        thinker: a thinker of a deepstack family (its vision config gives the merge size).
        video: (sum_j N_j, D) merged rows; deepstack: (levels, sum_j N_j, D); grid: (V, 3) video_grid_thw.
        like: the inputs_embeds whose device and dtype the features take.
    Returns:
        `BaseModelOutputWithDeepstackFeatures(pooler_output=V tensors,
        deepstack_features=[V tensors per level])`.
    """
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        BaseModelOutputWithDeepstackFeatures,
    )

    sizes = (grid.prod(-1) // int(thinker.config.vision_config.spatial_merge_size) ** 2).tolist()
    video = video.to(like.device, like.dtype)
    deepstack = deepstack.to(like.device, like.dtype)
    return BaseModelOutputWithDeepstackFeatures(
        pooler_output=torch.split(video, sizes),
        deepstack_features=[torch.split(level, sizes) for level in deepstack],
    )


def _dummy_audio(thinker: nn.Module, device: torch.device) -> torch.Tensor:
    """The audio tower on one window of silence-shaped zeros: (M, D), only to keep ZeRO-3 ranks in step."""
    cfg = thinker.config.audio_config
    frames = 2 * int(cfg.n_window)
    stem = thinker.model.audio_tower.get_submodule(family_of(thinker.config).audio_stem)
    features = torch.zeros(1, cfg.num_mel_bins, frames, device=device, dtype=stem.weight.dtype)
    mask = torch.ones(1, frames, device=device, dtype=torch.long)
    return encode_audio(thinker, features, mask)


def _dummy_video(thinker: nn.Module, device: torch.device) -> torch.Tensor:
    """The vision tower on the smallest grid (1, merge, merge) of zeros: (1, D) (deepstack features summed in,
    times 0, so that they join the graph too), only for ZeRO-3."""
    cfg = thinker.config.vision_config
    m = int(cfg.spatial_merge_size)
    grid = torch.tensor([[1, m, m]], device=device, dtype=torch.long)
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    pixels = torch.zeros(m * m, width, device=device, dtype=thinker.model.visual.dtype)
    merged, deepstack = encode_video_full(thinker, pixels, grid)
    out = torch.cat(merged)
    return out if deepstack is None else out + 0.0 * torch.cat(deepstack).sum()


def merge_features(
    thinker: nn.Module, input_ids: torch.Tensor, audio: torch.Tensor | None, video: torch.Tensor | None
) -> torch.Tensor:
    """Token embeddings with the encoder outputs scattered into their placeholder positions.

    Args:
        thinker: a thinker of a supported family.
        input_ids: (B, T) long with `<|AUDIO|>` / `<|VIDEO|>` placeholders.
        audio: (M, D) rows for the M audio placeholders (row-major over the batch), or None.
        video: (N, D) rows for the N video placeholders, or None.
    Returns:
        (B, T, D) inputs_embeds in the embedding's dtype.
    Raises:
        ValueError: the number of placeholders differs from the number of feature rows.
    """
    embeds = thinker.get_input_embeddings()(input_ids)
    for name, token_id, rows in (
        ("audio", thinker.config.audio_token_id, audio),
        ("video", thinker.config.video_token_id, video),
    ):
        mask = input_ids == token_id
        count = int(mask.sum())
        have = 0 if rows is None else rows.shape[0]
        if count != have:
            raise ValueError(
                f"the batch has {count} {name} placeholder tokens but {have} {name} feature rows "
                "(a stale feature cache? rerun scripts/cache_features.py)"
            )
        if rows is not None:
            embeds = embeds.masked_scatter(
                mask[..., None].to(embeds.device), rows.to(embeds.device, embeds.dtype)
            )
    return embeds


def backbone_inputs(backbone: nn.Module, batch: dict, keys: Sequence[str]) -> dict:
    """Keyword arguments for the (possibly peft-wrapped) thinker's forward from a collated batch.

    Args:
        backbone: the thinker, peft-wrapped or not (MoSE layers injected in place are fine).
        batch: collator output: processor outputs, or a cached batch with `audio_embeds` / `video_embeds`.
        keys: the batch keys the default path passes through (processor outputs).
    Returns:
        The batch's `keys` unchanged (default), or `input_ids`, `inputs_embeds` and `EMBEDS_PASSTHROUGH`
        (cached features, or every tower run under ZeRO-3; see the module docstring).
    """
    cached = any(k in batch for k in CACHED_FEATURE_KEYS)
    thinker = unwrap_thinker(backbone)
    zero3 = not cached and is_zero3(thinker)
    if not cached and not zero3:
        return {k: batch[k] for k in keys if batch.get(k) is not None}
    check_supported(thinker)
    family: BackboneFamily = family_of(thinker.config)
    input_ids = batch["input_ids"]
    keep_alive = deepstack = None
    if cached:
        audio, video = batch.get("audio_embeds"), batch.get("video_embeds")
        deepstack = batch.get("video_deepstack")
        if video is not None and family.deepstack and deepstack is None:
            raise ValueError(
                f"a {family.display} batch with cached video features lacks `video_deepstack` "
                "(a stale feature cache? rerun scripts/cache_features.py)"
            )
    else:  # ZeRO-3: audio tower, then vision tower, on every rank and every call
        device = input_ids.device
        if batch.get("input_features") is not None:
            audio = encode_audio(thinker, batch["input_features"], batch["feature_attention_mask"])
        else:
            audio, keep_alive = None, _dummy_audio(thinker, device).sum() * 0.0
        if batch.get("pixel_values_videos") is not None:
            merged, per_video = encode_video_full(
                thinker, batch["pixel_values_videos"], batch["video_grid_thw"]
            )
            video = torch.cat(merged)
            deepstack = torch.cat(per_video, dim=1) if per_video is not None else None
        else:
            dummy = _dummy_video(thinker, device).sum() * 0.0
            video, keep_alive = None, dummy if keep_alive is None else keep_alive + dummy
    embeds = merge_features(thinker, input_ids, audio, video)
    if keep_alive is not None:  # joins the graph with value 0: same autograd structure on every rank
        embeds = embeds + keep_alive.to(embeds.dtype)
    out = {"input_ids": input_ids, "inputs_embeds": embeds}
    out.update({k: batch[k] for k in EMBEDS_PASSTHROUGH if batch.get(k) is not None})
    if family.deepstack and video is not None:  # the thinker re-scatters these and applies deepstack
        out["mm_encoder_outputs"] = {
            "video": deepstack_outputs(thinker, video, deepstack, batch["video_grid_thw"], embeds)
        }
    return out
