"""Keys of the frozen-encoder cache: what an entry depends on, hashed, so a stale entry is never read.

Any change gives a new key (the old entry is simply unused):
- **feature entry** (`feature_key`): sample id + the content hash of each media file + the encoder fingerprint.
  Media hashes are blake2b over every byte (`MediaHashes`: computed once, then re-read only when the file's
  inode, size, mtime or ctime changes, so later runs only stat the files).
- **encoder fingerprint** (`encoder_fingerprint`): cache format version, the processor's feature-extractor and
  video-processor configs, the decode options (fps, max frames, sample rate, audio window), the thinker's
  audio/vision configs, a checksum of the towers' weights (per tensor: name, shape, dtype and 4096 strided
  values), the model dtype and the mixed-precision mode the towers ran under.
- **layout entry** (`layout_key`): the feature key + the rendered prompt (template, subtitle, labels, system
  prompt) + which media the prompt keeps + the tokenizer and chat template (`layout_fingerprint`).

`CachedMedia` is what a run keeps per sample once the cache is filled: its feature key, which media it has,
the layout key of every prompt variant and its tokenized answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_mer.cache.store import CACHE_VERSION, file_checksum, write_json_atomic
from mllm_mer.cache.towers import towers_ready
from mllm_mer.config import RunConfig, frozen_encoder_problems
from mllm_mer.data.collate import MerCollator
from mllm_mer.data.dataset import DecodeOptions, file_state
from mllm_mer.data.schema import Sample

log = logging.getLogger(__name__)


def digest(*parts: Any) -> str:
    """A 40-hex-digit sha256 of the JSON of `parts` (non-JSON values by `str`)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


class MediaHashes:
    """Content hashes of media files (blake2b over every byte), remembered per file state.

    A file is read again only when its `file_state` (device, inode, size, mtime, ctime) changes, so a
    rewrite that keeps the size and restores the mtime is still seen (it bumps the ctime). Hashes are remembered in `media-hashes-rank<r>.json`
    beside the shards (each rank writes its own file, every rank reads all), so a later run only stats files.
    Keys of the cache use the content hash, not the path: moving or copying a dataset re-hashes it once and
    keeps its entries.

    Args:
        root: the cache directory.
        rank: this process's rank (the file it writes).
    """

    PREFIX = "media-hashes-rank"

    def __init__(self, root: str | Path, rank: int = 0) -> None:
        self.root = Path(root)
        self.rank = rank
        self._known: dict[str, list] = {}  # absolute path -> [*state, hash]
        self._dirty = False
        self.reload()

    def reload(self) -> None:
        """Merge every rank's remembered hashes (unreadable files are ignored: their hashes are recomputed)."""
        for path in sorted(self.root.glob(f"{self.PREFIX}*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("feature cache: ignoring unreadable %s (%s)", path, exc)
                continue
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION:
                self._known.update(data.get("files", {}))

    def __call__(self, path: str | Path) -> str:
        """The content hash of `path` (read only when unknown or changed since it was hashed)."""
        path = Path(path).resolve()
        state = file_state(path)
        known = self._known.get(str(path))
        if known is not None and known[:-1] == state:
            return known[-1]
        checksum = file_checksum(path)
        if file_state(path) != state:
            raise RuntimeError(f"{path} changed while it was being hashed; run again once it is written")
        self._known[str(path)] = [*state, checksum]
        self._dirty = True
        return checksum

    def save(self) -> None:
        """Write this rank's remembered hashes (atomically; nothing when nothing new was hashed)."""
        if self._dirty:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                self.root / f"{self.PREFIX}{self.rank}.json", {"version": CACHE_VERSION, "files": self._known}
            )
            self._dirty = False


def content_hash(hashes: MediaHashes, path: str | Path) -> str:
    """`hashes(path)`, or a marker naming the error when the file cannot be read."""
    try:
        return hashes(path)
    except OSError as exc:
        return f"unreadable: {type(exc).__name__}"


def _tensor_checksum(t: torch.Tensor) -> list:
    """Shape, dtype and sha256 of 4096 strided values (no sums: their rounding depends on thread count)."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step][:4096].float().cpu()
    return [list(t.shape), str(t.dtype), hashlib.sha256(sample.numpy().tobytes()).hexdigest()]


def tower_fingerprint(thinker: nn.Module) -> str:
    """Checksum of the audio and vision towers' weights (per tensor: name, shape, dtype, strided sample).

    Under ZeRO-3 the weights are gathered for it (every rank must call it).
    """
    with towers_ready(thinker):
        parts = [
            (name, _tensor_checksum(p))
            for tower in (thinker.model.audio_tower, thinker.model.visual)
            for name, p in tower.state_dict().items()
        ]
    return digest(parts)


def encoder_fingerprint(
    thinker: nn.Module, processor: Any, options: DecodeOptions, mixed_precision: str = "no"
) -> str:
    """Everything a feature entry depends on besides the sample's media (see the module docstring)."""
    return digest(
        CACHE_VERSION,
        processor.feature_extractor.to_dict(),
        processor.video_processor.to_dict(),
        dataclasses.asdict(options),
        thinker.config.audio_config.to_dict(),
        thinker.config.vision_config.to_dict(),
        tower_fingerprint(thinker),
        str(next(thinker.parameters()).dtype),
        mixed_precision,
    )


def layout_fingerprint(processor: Any) -> str:
    """The tokenizer (vocabulary, merges, special tokens) and chat template a layout entry depends on."""
    tok = processor.tokenizer
    if hasattr(tok, "backend_tokenizer"):  # without the padding/truncation state, which calls change
        state = {
            k: v
            for k, v in json.loads(tok.backend_tokenizer.to_str()).items()
            if k not in ("padding", "truncation")
        }
    else:
        state = sorted(tok.get_vocab().items())
    backend = json.dumps(state, sort_keys=True)
    return digest(
        CACHE_VERSION, hashlib.sha256(backend.encode()).hexdigest(), getattr(processor, "chat_template", None)
    )


def feature_key(sample: Sample, encoder_fp: str, hashes: MediaHashes) -> str:
    """Key of a sample's feature entry: id + media content hashes + encoder fingerprint.

    A file that cannot be read gets a marker instead of a hash; decoding it then reports the problem
    (`MediaError`, or a skipped sample under `data.on_error=skip`)."""
    media = [content_hash(hashes, p) if p is not None else None for p in (sample.video, sample.audio)]
    return "f" + digest(sample.id, media, encoder_fp)


def layout_key(feature: str, layout_fp: str, has_video: bool, has_audio: bool, prompt_text: str) -> str:
    """Key of a layout entry: the sample's feature key + the rendered prompt + which media it keeps."""
    return "l" + digest(feature, layout_fp, has_video, has_audio, prompt_text)


def check_cacheable(cfg: RunConfig) -> None:
    """Raise ValueError when the run's towers or projectors are not all frozen."""
    problems = frozen_encoder_problems(cfg.model.freeze)
    if problems:
        raise ValueError("; ".join(problems))


@dataclass
class CacheSpec:
    """What a run's batches need from the cache: the fingerprints and the prompt variants.

    Attributes:
        encoder_fp: `encoder_fingerprint` of the run's towers and processor.
        layout_fp: `layout_fingerprint` of its tokenizer.
        variants: (use_video, use_audio) pairs the collators render.
    """

    encoder_fp: str
    layout_fp: str
    variants: tuple[tuple[bool, bool], ...]


def prompt_fingerprint(collator: MerCollator) -> str:
    """What a collator's prompts and answers depend on besides the sample and the tokenizer: the template,
    the system prompt and the label set (a `CachedMedia` prepared by one collator serves only its likes)."""
    return digest(collator.prompt.name, collator.prompt.sha256, collator.system_prompt, list(collator.labels))


def layout_keys(
    collator: MerCollator, spec: CacheSpec, sample: Sample, media: Any, fkey: str
) -> dict[tuple[bool, bool], tuple[str, bool, bool]]:
    """{(has_video, has_audio): (layout key, use_video, use_audio)} of every variant the sample needs.

    Args:
        media: the sample's `DecodedMedia`, or anything with `frames` / `audio` (None = absent).
    """
    out = {}
    for use_video, use_audio in spec.variants:
        has_video, has_audio = use_video and media.frames is not None, use_audio and media.audio is not None
        if (has_video, has_audio) not in out:
            text = collator.prompt_text(sample, media, use_video, use_audio)
            out[(has_video, has_audio)] = (
                layout_key(fkey, spec.layout_fp, has_video, has_audio, text),
                use_video,
                use_audio,
            )
    return out


SMALL_FIELDS = ("audio_len", "video_grid_thw", "video_second_per_grid")
"""Fields of a feature entry small enough to keep in memory per sample (`CachedMedia.small`)."""


@dataclass(frozen=True)
class CachedMedia:
    """Stands in for `DecodedMedia` in cached batches: which media a sample has (never the arrays), where its
    entries are, its small feature fields and its answer tokens, all read or computed once per run
    (`fill_cache`), so a batch only reads the large tensors and renders nothing.

    Attributes:
        key: the feature key.
        frames / audio: True when present, None otherwise (what `MerCollator.messages` tests).
        small: the entry's `SMALL_FIELDS` it holds: `audio_len` (1,) long, `video_grid_thw` (1, 3) long,
            `video_second_per_grid` (1,) float32.
        layouts: {(has_video, has_audio): layout key} of every prompt variant the run renders.
        answer_ids: (A,) long, the training answer + `<|im_end|>` (`MerCollator.answer_ids`).
        prompt_fp: `prompt_fingerprint` of the collator that rendered `layouts` and `answer_ids`.
    """

    key: str
    frames: bool | None
    audio: bool | None
    small: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    layouts: Mapping[tuple[bool, bool], str] = dataclasses.field(default_factory=dict)
    answer_ids: torch.Tensor | None = None
    prompt_fp: str = ""
