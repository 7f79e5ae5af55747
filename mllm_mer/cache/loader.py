"""Batches from the frozen-encoder cache alone: the cached dataset, the cached collator, and their preparation.

`prepare_cache` fills a split's missing entries (`fill_cache`) and returns a `CachedCollator`: a `MerCollator`
(same prompt, label set and switches: `train`, `use_video`, `use_audio`, `modality_dropout`) whose batches come
from the cache. It builds them through the same `mllm_mer.data.collate.assemble_batch` as the uncached
collator, from the stored prompt ids of the batch's prompt variant and the answer ids tokenized once per run,
and carries the towers' outputs (`audio_embeds`, `video_embeds`, `video_deepstack`) instead of the processor's
features. Because it is a `MerCollator`, the methods wrap it like the uncached one (`Method.wrap_collator`,
e.g. DCR's unimodal sub-batches come from copies with other `use_video` / `use_audio`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from mllm_mer.backbone.loader import Backbone
from mllm_mer.cache.fill import FillReport, fill_cache
from mllm_mer.cache.keys import (
    CachedMedia,
    CacheSpec,
    check_cacheable,
    encoder_fingerprint,
    layout_fingerprint,
    prompt_fingerprint,
)
from mllm_mer.cache.store import FeatureCache
from mllm_mer.config import RunConfig
from mllm_mer.data.collate import MerCollator, assemble_batch, audio_in_video
from mllm_mer.data.dataset import DecodeOptions, decode_options
from mllm_mer.data.schema import Sample
from mllm_mer.encoders import check_supported

log = logging.getLogger(__name__)

VIDEO_FIELDS = ("video", "video_deepstack")
"""The large fields of a feature entry a batch with video reads from the shards (the small ones are in
`CachedMedia.small`)."""


class CachedSampleDataset(torch.utils.data.Dataset):
    """Samples paired with their `CachedMedia`; items are `(Sample, CachedMedia)` (no media is read)."""

    def __init__(self, samples: Sequence[Sample], presence: dict[str, CachedMedia]) -> None:
        self.samples = list(samples)
        self.presence = presence

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[Sample, CachedMedia]:
        sample = self.samples[int(idx)]
        return sample, self.presence[sample.id]


@dataclass
class CachedCollator(MerCollator):
    """Callable collator: `list[(Sample, CachedMedia)] -> dict`, the batch `MerCollator` would produce, from
    the cache alone, with `audio_embeds` / `video_embeds` instead of the processor's features.

    Build it with `from_collator` (or get it from `prepare_cache`); `dataclasses.replace` copies (other
    `train` / `use_video` / `use_audio` / `modality_dropout`) read the same cache.

    Attributes:
        cache: the filled cache (every `CachedMedia.layouts` variant the batches render must be in it).
    """

    cache: FeatureCache = field(kw_only=True)
    _prompt_fp: str = field(init=False, repr=False, default="")

    def __post_init__(self) -> None:
        self._prompt_fp = prompt_fingerprint(self)

    @classmethod
    def from_collator(cls, base: MerCollator, cache: FeatureCache) -> CachedCollator:
        """The cached counterpart of `base` (its prompt, label set and switches)."""
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(MerCollator)}, cache=cache)

    def _layout(self, sample: Sample, media: CachedMedia, variant: tuple[bool, bool]) -> torch.Tensor:
        """(P,) long prompt ids of `sample` with the media `variant` (has_video, has_audio) keeps."""
        if media.prompt_fp != self._prompt_fp:
            raise ValueError(
                f"sample '{sample.id}': its cached layouts were prepared for another prompt, system prompt or "
                "label set than this collator's (build the items with prepare_cache for this collator)"
            )
        if variant not in media.layouts:
            raise KeyError(
                f"sample '{sample.id}': the prompt variant (has_video, has_audio)={variant} was not cached; "
                "pass it in prepare_cache's variants (data.loading.prompt_variants lists a run's)"
            )
        return self.cache.get(media.layouts[variant], ["input_ids"])["input_ids"]

    def __call__(self, items: Sequence[tuple[Sample, CachedMedia]]) -> dict:
        """One batch of this collator's prompt variant (after the modality-dropout draw).

        Returns:
            `assemble_batch`'s keys (input_ids / attention_mask / labels (None unless `train`) / token_modality /
            prompt_mask (B, T), class_id (B,), use_audio_in_video, sample_ids), and audio_embeds (sum M_i, D)
            or None, video_embeds (sum N_j, D) or None, video_deepstack (levels, sum N_j, D) (only when videos
            of a deepstack family), feature_attention_mask (A, max mel length) long (only when audios),
            video_grid_thw (V, 3) and video_second_per_grid (V,) (only when videos).
        """
        use_video, use_audio = self._batch_modalities(items)
        presence = self.presence(items, use_video, use_audio)
        use_audio_in_video = audio_in_video(presence)
        prompts: list[torch.Tensor] = []
        audio, audio_len, video, deepstack, grids, spg = [], [], [], [], [], []
        for (sample, media), (has_video, has_audio) in zip(items, presence, strict=True):
            prompts.append(self._layout(sample, media, (has_video, has_audio)))
            fields = (VIDEO_FIELDS if has_video else ()) + (("audio",) if has_audio else ())
            feats = self.cache.get(media.key, fields) if fields else {}
            if has_video:
                video.append(feats["video"])
                if "video_deepstack" in feats:
                    deepstack.append(feats["video_deepstack"])
                grids.append(media.small["video_grid_thw"])
                spg.append(media.small["video_second_per_grid"])
            if has_audio:
                audio.append(feats["audio"])
                audio_len.append(media.small["audio_len"])
        batch = assemble_batch(
            [s for s, _ in items],
            prompts,
            [m.answer_ids for _, m in items] if self.train else None,
            label_set=self.labels,
            token_ids=self.token_ids,
            use_audio_in_video=use_audio_in_video,
        )
        batch["audio_embeds"] = torch.cat(audio) if audio else None
        batch["video_embeds"] = torch.cat(video) if video else None
        if deepstack:
            batch["video_deepstack"] = torch.cat(deepstack, dim=1)
        if audio:
            lengths = torch.cat(audio_len)
            batch["feature_attention_mask"] = (
                torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
            ).to(torch.long)
        if video:
            batch["video_grid_thw"] = torch.cat(grids)
            batch["video_second_per_grid"] = torch.cat(spg)
        return batch


def build_spec(
    backbone: Backbone, options: DecodeOptions, variants: Sequence[tuple[bool, bool]], mixed_precision: str = "no"
) -> CacheSpec:
    """The run's `CacheSpec` (fingerprints of its towers, processor, decode options and tokenizer; the
    (use_video, use_audio) prompt `variants` its batches render, `mllm_mer.data.loading.prompt_variants`)."""
    return CacheSpec(
        encoder_fp=encoder_fingerprint(backbone.model, backbone.processor, options, mixed_precision),
        layout_fp=layout_fingerprint(backbone.processor),
        variants=tuple(variants),
    )


def prepare_cache(
    cfg: RunConfig,
    backbone: Backbone,
    samples: list[Sample],
    collator: MerCollator,
    variants: Sequence[tuple[bool, bool]],
    accelerator: Accelerator | None = None,
) -> tuple[list[Sample], CachedCollator, dict[str, CachedMedia], FillReport]:
    """Fill the run's cache for `samples` (missing entries only) and build the collator that reads it.

    Args:
        cfg: the run config (`data.feature_cache_dir`, `data.on_error`, freeze switches).
        backbone: the loaded backbone (its thinker's towers fill the cache).
        samples: the split's samples.
        collator: the split's fused-path `MerCollator` (`data.loading.base_collator`), not wrapped by the
            methods: wrap the returned `CachedCollator` instead (`data.loading.wrap_collator`).
        variants: the (use_video, use_audio) prompt variants to cache layouts of.
        accelerator: ranks, device, autocast (None: one process).
    Returns:
        (the samples served, the `CachedCollator`, {sample id: CachedMedia}, the fill report).
    Raises:
        ValueError: a tower or projector is unfrozen (`model.freeze.*`), or the thinker is of no supported family.
        TypeError: `collator` is not a plain `MerCollator`.
    """
    check_cacheable(cfg)
    if not isinstance(collator, MerCollator) or isinstance(collator, CachedCollator):
        raise TypeError(
            f"prepare_cache needs the fused-path MerCollator, got {type(collator).__name__}: wrap the "
            "CachedCollator it returns instead (mllm_mer.data.loading.wrap_collator)"
        )
    options = decode_options(cfg, backbone.processor)
    mixed = accelerator.mixed_precision if accelerator is not None else "no"
    check_supported(backbone.model)
    spec = build_spec(backbone, options, variants, mixed)
    cache = FeatureCache(cfg.data.feature_cache_dir, rank=accelerator.process_index if accelerator else 0)
    served, presence, fill = fill_cache(
        cache,
        samples,
        collator,
        backbone.model,
        spec,
        options,
        accelerator=accelerator,
        skip_bad=cfg.data.on_error == "skip",
    )
    return served, CachedCollator.from_collator(collator, cache), presence, fill


def load_cached(
    cfg: RunConfig,
    backbone: Backbone,
    samples: list[Sample],
    collator: MerCollator,
    variants: Sequence[tuple[bool, bool]],
    accelerator: Accelerator | None = None,
    split: str = "train",
) -> tuple[list[Sample], CachedSampleDataset, CachedCollator, list[str]]:
    """The cached counterpart of `data.dataset.load_media_on_ranks`: `prepare_cache`, logged.

    Returns:
        (the samples served, their `CachedSampleDataset`, the `CachedCollator`, the problems of the samples
        skipped under `data.on_error=skip`).
    """
    served, collate, presence, fill = prepare_cache(cfg, backbone, samples, collator, variants, accelerator)
    log.info(
        "feature cache %s (%s): %d samples, %d reused, %d feature and %d layout entries computed in %.1f s",
        collate.cache.root,
        split,
        fill.samples,
        fill.reused,
        fill.features_computed,
        fill.layouts_computed,
        fill.seconds,
    )
    return served, CachedSampleDataset(served, presence), collate, fill.skipped
