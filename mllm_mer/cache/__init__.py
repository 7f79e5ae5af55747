"""Frozen-encoder cache: the audio and vision towers' outputs per sample, computed once, read every epoch.

With the towers and projectors frozen, a sample's tower outputs never change, so epochs after the first need
neither media decoding, nor the processor's feature extraction (Whisper log-mel, video patching), nor the
towers. `fill_cache` computes per sample, once:

- a **feature entry** (key: sample id + media content hashes + encoder fingerprint): the audio tower's
  output `audio` (M, D) with the mel length `audio_len` (what the 3D position ids need), the vision tower's
  output `video` (N, D) with `video_grid_thw` (1, 3) and `video_second_per_grid` (1,), and `present`
  ([has_video, has_audio]); for a deepstack family (Qwen3-Omni) also `video_deepstack` (levels, N, D), the
  vision tower's deepstack features. Prompt-independent.
- a **layout entry** per prompt variant (key: feature key + rendered prompt text + which media it keeps +
  tokenizer fingerprint): the processor's `input_ids` of the prompt part (system + user turn with the
  expanded placeholders, through the generation prompt). The interleaved audio-in-video layout is taken
  from the real processor, never rebuilt by hand. Variants: `mllm_mer.data.loading.prompt_variants` (audio +
  video; with `data.modality_dropout` > 0 also video-only and audio-only; those the active methods add, e.g.
  DCR's text-only).

`CachedCollator` (a `MerCollator`) then builds batches from the cache alone: prompt ids from the layout entry,
the answer ids tokenized once per run, and the one batch assembly of every collator
(`mllm_mer.data.collate.assemble_batch`: padding, labels, `token_modality`, `prompt_mask`), with `audio_embeds`
/ `video_embeds` (and `video_deepstack`) instead of the processor's features. `MerModel.forward` scatters
those into the token embeddings (`mllm_mer.encoders.backbone_inputs`) and passes `input_ids` too, so the
thinker computes the same TMRoPE position ids: the loss equals the uncached one (tested to 1e-6 on CPU).

Modules: `keys` (what an entry depends on, `MediaHashes`, `CachedMedia`), `store` (shards, indexes,
corruption checks), `towers` (running the frozen towers), `fill` (`fill_cache` over the ranks), `loader`
(`CachedCollator`, `prepare_cache`, `load_cached`). The cache is refused (ValueError) when any tower or
projector is unfrozen (`model.freeze.*`): their outputs would change during training.
"""

from mllm_mer.cache.fill import FillReport, fill_cache
from mllm_mer.cache.keys import (
    CachedMedia,
    CacheSpec,
    MediaHashes,
    check_cacheable,
    encoder_fingerprint,
    layout_fingerprint,
    tower_fingerprint,
)
from mllm_mer.cache.loader import CachedCollator, CachedSampleDataset, build_spec, load_cached, prepare_cache
from mllm_mer.cache.store import CACHE_VERSION, FeatureCache, file_checksum

__all__ = [
    "CACHE_VERSION",
    "CacheSpec",
    "CachedCollator",
    "CachedMedia",
    "CachedSampleDataset",
    "FeatureCache",
    "FillReport",
    "MediaHashes",
    "build_spec",
    "check_cacheable",
    "encoder_fingerprint",
    "file_checksum",
    "fill_cache",
    "layout_fingerprint",
    "load_cached",
    "prepare_cache",
    "tower_fingerprint",
]
