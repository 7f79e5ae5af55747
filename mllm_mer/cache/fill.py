"""Filling the frozen-encoder cache: the missing entries of a split, computed once, split over the ranks.

`fill_cache` hashes the media (each rank its share of new or changed files), decides which samples lack a
feature entry or a layout entry (`mllm_mer.cache.keys`), decodes only those samples' media (once each, straight
from the files: the `datasets` decode cache is not involved), runs the towers only for missing feature entries
(`mllm_mer.cache.towers`) and writes every rank's own shards (`mllm_mer.cache.store`). It returns, per sample served, the `CachedMedia` the cached collator reads.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from mllm_mer.cache.keys import (
    SMALL_FIELDS,
    CachedMedia,
    CacheSpec,
    MediaHashes,
    content_hash,
    feature_key,
    layout_keys,
    prompt_fingerprint,
)
from mllm_mer.cache.store import FeatureCache
from mllm_mer.cache.towers import compute_entry, prompt_ids, towers_ready
from mllm_mer.data.collate import MerCollator
from mllm_mer.data.dataset import DecodeOptions, decode, unusable_media
from mllm_mer.data.media import DecodedMedia, MediaError
from mllm_mer.data.schema import Sample
from mllm_mer.encoders import check_supported
from mllm_mer.logs import progress


@dataclass
class FillReport:
    """What `fill_cache` did (this rank's work, plus the totals every rank sees)."""

    samples: int = 0
    features_computed: int = 0
    layouts_computed: int = 0
    reused: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _presence(cache: FeatureCache, fkey: str) -> CachedMedia:
    """Which media the feature entry `fkey` holds, and its small fields (`CachedMedia` without layouts and
    answer)."""
    fields = cache.get(fkey, ["present", *SMALL_FIELDS])
    has_video, has_audio = fields.pop("present").tolist()
    return CachedMedia(fkey, True if has_video else None, True if has_audio else None, small=fields)


@torch.no_grad()
def fill_cache(
    cache: FeatureCache,
    samples: Sequence[Sample],
    collator: MerCollator,
    thinker: nn.Module,
    spec: CacheSpec,
    options: DecodeOptions,
    *,
    accelerator: Accelerator | None = None,
    skip_bad: bool = False,
) -> tuple[list[Sample], dict[str, CachedMedia], FillReport]:
    """Compute the missing feature and layout entries of `samples` (split over the ranks) and return what
    the cached loader serves.

    Media are decoded once, only for samples with missing entries, by the rank that fills them (no decode
    cache: the towers' outputs are what is kept); the towers run only for missing feature entries, under the
    accelerator's autocast, on its device. Ranks take every world_size-th missing sample, write their own
    shards, then wait for each other and re-read every index. The entries of good samples are kept even when
    another sample's media turn out to be bad.

    Args:
        cache: the cache (this rank's writer).
        samples: the split's samples.
        collator: the split's fused-path `MerCollator` (renders prompts and answers, runs the processor).
        thinker: the (frozen) thinker whose towers produce the features.
        spec: fingerprints and prompt variants.
        options: media decoding options.
        accelerator: for rank, world size, device, autocast and barriers (None: one process, CPU).
        skip_bad: drop samples whose media cannot be decoded (reported) instead of raising.
    Returns:
        (the samples served, in order; {sample id: CachedMedia} with every variant's layout key and the answer
        ids; the report).
    Raises:
        MediaError: a sample's media cannot be used (skip_bad=False).
        RuntimeError: entries still missing after every rank's fill.
    """
    check_supported(thinker)
    start = time.perf_counter()
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    report = FillReport(samples=len(samples))
    cache.refresh()
    hashes = MediaHashes(cache.root, rank)
    paths = sorted({str(p) for s in samples for p in (s.video, s.audio) if p is not None})
    for path in paths[rank::world]:  # each rank hashes its share of new or changed files ...
        content_hash(hashes, path)
    hashes.save()
    if accelerator is not None:
        accelerator.wait_for_everyone()
        hashes.reload()  # ... and reads the others'
    fkeys = {s.id: feature_key(s, spec.encoder_fp, hashes) for s in samples}
    known: dict[str, dict] = {}  # sample id -> layout_keys(...), for samples whose feature entry exists
    todo: list[Sample] = []
    for s in samples:
        fk = fkeys[s.id]
        if fk not in cache:
            todo.append(s)
            continue
        known[s.id] = layout_keys(collator, spec, s, _presence(cache, fk), fk)
        if all(lk in cache for lk, _, _ in known[s.id].values()):
            report.reused += 1
        else:
            todo.append(s)
    skipped: set[str] = set()
    if accelerator is not None:  # every rank decided on the same cache state before anyone writes
        accelerator.wait_for_everyone()
    if todo:
        bad: list[tuple[int, str, str]] = []  # (position in todo, sample id, problem) of this rank's share
        cache.prune_own()
        autocast = accelerator.autocast() if accelerator is not None else nullcontext()
        with cache.writer() as writer, towers_ready(thinker, device), autocast:
            for i in progress(range(rank, len(todo), world), desc="feature cache", unit="clip"):
                sample = todo[i]
                try:
                    media: DecodedMedia = decode(sample, options)
                except MediaError as exc:
                    bad.append((i, sample.id, str(exc)))
                    continue
                fk = fkeys[sample.id]
                full_ids = None
                if fk not in cache:
                    entry, full_ids = compute_entry(collator, thinker, sample, media, device)
                    writer.add(fk, entry)
                    report.features_computed += 1
                for (has_video, has_audio), (lk, use_video, use_audio) in layout_keys(
                    collator, spec, sample, media, fk
                ).items():
                    if lk in cache:
                        continue
                    whole = has_video == (media.frames is not None) and has_audio == (media.audio is not None)
                    ids = (
                        full_ids
                        if (whole and full_ids is not None)
                        else prompt_ids(collator, sample, media, use_video, use_audio)
                    )
                    writer.add(lk, {"input_ids": ids.to(torch.long)})
                    report.layouts_computed += 1
        if accelerator is not None and accelerator.num_processes > 1:
            bad = gather_object(bad)  # every rank learns every problem (and raises alike)
        bad.sort()
        report.skipped = [problem for _, _, problem in bad]
        skipped = {sample_id for _, sample_id, _ in bad}
        if bad and not skip_bad:
            raise unusable_media(report.skipped)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    cache.refresh()
    served = [s for s in samples if s.id not in skipped]
    prompt_fp = prompt_fingerprint(collator)
    presence: dict[str, CachedMedia] = {}
    missing = []
    for s in served:
        fk = fkeys[s.id]
        if fk not in cache:
            missing.append(s.id)
            continue
        media = _presence(cache, fk)
        keys = known.get(s.id) or layout_keys(collator, spec, s, media, fk)
        if any(lk not in cache for lk, _, _ in keys.values()):
            missing.append(s.id)
            continue
        presence[s.id] = dataclasses.replace(
            media,
            layouts={variant: lk for variant, (lk, _, _) in keys.items()},
            answer_ids=collator.answer_ids(s),
            prompt_fp=prompt_fp,
        )
    if missing:
        raise RuntimeError(
            f"feature cache {cache.root}: {len(missing)} sample(s) still lack entries after the "
            f"fill, e.g. {missing[:5]} (a rank failed, or the directory is shared with another run)"
        )
    report.seconds = time.perf_counter() - start
    return served, presence, report
