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
  from the real processor, never rebuilt by hand. Variants: audio + video, and with
  `data.modality_dropout` > 0 or `dcr.enabled` also video-only, audio-only and (DCR) text-only.

`CachedCollator` then builds batches from the cache alone: prompt ids from the layout entry, the answer
tokenized as the uncached collator does, right/left padding, labels, `token_modality`, `prompt_mask`, and
`audio_embeds` / `video_embeds` (and `video_deepstack`) instead of the processor's features. `MerModel.forward` scatters those into
the token embeddings (`mllm_mer.encoders.backbone_inputs`) and passes `input_ids` too, so the thinker
computes the same TMRoPE position ids: the loss equals the uncached one (tested to 1e-6 on CPU).

Keys and invalidation (any change gives a new key, so a stale entry is never read; it is simply unused):
- media: the blake2b hash of each file's whole content (`MediaHashes`: computed once, then re-read only
  when the file's inode, size, mtime or ctime changes, so later runs only stat the files);
- encoder fingerprint: cache format version, the processor's feature-extractor and video-processor
  configs, the decode options (fps, max frames, sample rate, audio window), the thinker's audio/vision
  configs, a checksum of the towers' weights (per tensor: name, shape, dtype and 4096 strided values),
  the model dtype and the mixed-precision mode the towers ran under;
- layout: additionally the rendered prompt (template, subtitle, labels, system prompt) and the tokenizer.

Storage (`data.feature_cache_dir`): safetensors shards `rank<r>-<token>.safetensors` with tensors named
`<key>.<field>`, and one JSON index per rank, `index-rank<r>.json`, listing each shard's size, blake2b
checksum and keys. Each rank writes only its own shards and index (a shard is written to a temporary name,
checksummed and renamed; the index is rewritten atomically after every shard), so DDP ranks never race;
every rank reads every index. `media-hashes-rank<r>.json` remembers the media content hashes
(`MediaHashes`). A shard whose size, safetensors header (header length + data offsets must end exactly at
the file size) or checksum does not match is treated as missing: its entries are recomputed and the owner
rank drops it on its next fill. Checksums are verified once per process (a run start reads the cache once;
later re-reads skip shards whose size and mtime are unchanged). Shards are read through `safe_open`
(mmap), so DataLoader workers read only what a batch needs.

The cache is refused (ValueError) when any tower or projector is unfrozen (`model.freeze.*`): their
outputs would change during training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mllm_mer.backbone.modality import token_modality
from mllm_mer.config import frozen_encoder_problems
from mllm_mer.data.collate import IGNORE_INDEX, MerCollator
from mllm_mer.data.dataset import decode_cache_dir, decode_options, file_state, load_media_on_ranks
from mllm_mer.data.jsonl import DataError
from mllm_mer.data.schema import Sample
from mllm_mer.encoders import check_supported, encode_audio, encode_video_full, is_zero3
from mllm_mer.fusion.dcr.collate import PATH_INPUTS

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mllm_mer.backbone.loader import Backbone
    from mllm_mer.config import RunConfig
    from mllm_mer.data.dataset import DecodeOptions

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bumped whenever the stored fields or their meaning change (part of every key)."""
INDEX_PREFIX = "index-rank"
SHARD_SUFFIX = ".safetensors"
MAX_SHARD_BYTES = 256 * 2**20
"""A rank starts a new shard once the pending tensors exceed this size."""


# ------------------------------------------------------------------------------------------------ keys
def _digest(*parts: Any) -> str:
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
        digest = file_checksum(path)
        if file_state(path) != state:
            raise RuntimeError(f"{path} changed while it was being hashed; run again once it is written")
        self._known[str(path)] = [*state, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write this rank's remembered hashes (atomically; nothing when nothing new was hashed)."""
        if self._dirty:
            self.root.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(
                self.root / f"{self.PREFIX}{self.rank}.json", {"version": CACHE_VERSION, "files": self._known}
            )
            self._dirty = False


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
    return _digest(parts)


def encoder_fingerprint(
    thinker: nn.Module, processor: Any, options: DecodeOptions, mixed_precision: str = "no"
) -> str:
    """Everything a feature entry depends on besides the sample's media (see the module docstring)."""
    return _digest(
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
    return _digest(
        CACHE_VERSION, hashlib.sha256(backend.encode()).hexdigest(), getattr(processor, "chat_template", None)
    )


def feature_key(sample: Sample, encoder_fp: str, hashes: MediaHashes) -> str:
    """Key of a sample's feature entry: id + media content hashes + encoder fingerprint.

    A file that cannot be read gets a marker instead of a hash; decoding it then reports the problem
    (`MediaError`, or a skipped sample under `data.on_error=skip`)."""
    media = [_content_hash(hashes, p) if p is not None else None for p in (sample.video, sample.audio)]
    return "f" + _digest(sample.id, media, encoder_fp)


def _content_hash(hashes: MediaHashes, path: str | Path) -> str:
    try:
        return hashes(path)
    except OSError as exc:
        return f"unreadable: {type(exc).__name__}"


def layout_key(feature: str, layout_fp: str, has_video: bool, has_audio: bool, prompt_text: str) -> str:
    """Key of a layout entry: the sample's feature key + the rendered prompt + which media it keeps."""
    return "l" + _digest(feature, layout_fp, has_video, has_audio, prompt_text)


def check_cacheable(cfg: RunConfig) -> None:
    """Raise ValueError when the run's towers or projectors are not all frozen."""
    problems = frozen_encoder_problems(cfg.model.freeze)
    if problems:
        raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------------------------- storage
def check_shard_header(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (None when the header and length are consistent)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return "shorter than the 8-byte header length"
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                return f"header length {n} runs past the end of the file ({size} bytes)"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        return f"unreadable header ({exc})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) != size:
        return f"data ends at byte {8 + n + max(ends, default=0)} but the file has {size} bytes (truncated?)"
    return None


def file_checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(8 * 2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class FeatureCache:
    """Reader (every rank's shards) and writer (this rank's shards) of one cache directory.

    Args:
        root: the cache directory (created if missing).
        rank: this process's rank; it writes only `rank<rank>-*` shards and `index-rank<rank>.json`.
        verify: check every shard's blake2b checksum when (re)reading the indexes (the header/length check
            always runs).
    """

    def __init__(self, root: str | Path, rank: int = 0, verify: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.verify = verify
        self._entries: dict[str, str] = {}  # key -> shard file name
        self._bad_shards: dict[str, str] = {}  # shard file name -> problem
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()
        self._verified: dict[str, tuple] = {}  # shard -> (size, mtime_ns, checksum) checked by this process
        self.refresh()

    # ---------------------------------------------------------------- reading
    @property
    def index_path(self) -> Path:
        return self.root / f"{INDEX_PREFIX}{self.rank}.json"

    def _read_index(self, path: Path) -> dict:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("feature cache: ignoring unreadable index %s (%s)", path, exc)
            return {"shards": {}}
        if data.get("version") != CACHE_VERSION:
            return {"shards": {}}
        return data

    def shard_problem(self, name: str, meta: dict) -> str | None:
        """Why shard `name` (as recorded in an index) cannot be used; None when it is intact."""
        path = self.root / name
        if not path.is_file():
            return "missing"
        st = path.stat()
        if st.st_size != meta.get("bytes"):
            return f"{st.st_size} bytes, the index says {meta.get('bytes')} (truncated or rewritten)"
        stamp = (st.st_size, st.st_mtime_ns, meta.get("blake2b"))
        if self._verified.get(name) == stamp:  # checked by this process and unchanged since
            return None
        problem = check_shard_header(path)
        if problem is None and self.verify and file_checksum(path) != meta.get("blake2b"):
            problem = "checksum mismatch (corrupt)"
        if problem is None:
            self._verified[name] = stamp
        return problem

    def refresh(self) -> None:
        """(Re)read every rank's index; shards that fail their checks contribute no entries."""
        self._entries, self._bad_shards = {}, {}
        self._handles = {}
        for index in sorted(self.root.glob(f"{INDEX_PREFIX}*.json")):
            for name, meta in self._read_index(index).get("shards", {}).items():
                problem = self.shard_problem(name, meta)
                if problem is not None:
                    log.warning(
                        "feature cache: shard %s is unusable (%s); its %d entries will be recomputed",
                        self.root / name,
                        problem,
                        len(meta.get("keys", [])),
                    )
                    self._bad_shards[name] = problem
                    continue
                for key in meta.get("keys", []):
                    self._entries.setdefault(key, name)

    @property
    def bad_shards(self) -> dict[str, str]:
        """Shards found unusable at the last refresh: {file name: problem}."""
        return dict(self._bad_shards)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _handle(self, name: str) -> Any:
        if os.getpid() != self._pid:  # a forked DataLoader worker opens its own handles
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.root / name), framework="pt")
        return self._handles[name]

    def get(self, key: str, fields: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors `fields` of entry `key` (fields the entry does not hold are left out).

        Raises:
            KeyError: no usable entry `key`.
        """
        if key not in self._entries:
            raise KeyError(f"feature cache {self.root} has no entry {key} (run scripts/cache_features.py)")
        handle = self._handle(self._entries[key])
        names = set(handle.keys())
        return {f: handle.get_tensor(f"{key}.{f}") for f in fields if f"{key}.{f}" in names}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    # ---------------------------------------------------------------- writing
    def prune_own(self) -> int:
        """Drop this rank's unusable shards from its index and delete them, and delete own files no index
        names (leftovers of an interrupted write). Returns the number of files removed."""
        index = self._read_index(self.index_path) if self.index_path.is_file() else {"shards": {}}
        shards = index.get("shards", {})
        bad = [n for n in shards if n in self._bad_shards]
        for name in bad:
            del shards[name]
        if bad:
            _write_json_atomic(
                self.index_path, {"version": CACHE_VERSION, "rank": self.rank, "shards": shards}
            )
        removed = 0
        for path in self.root.glob(f"rank{self.rank}-*"):
            if path.name not in shards:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    @contextmanager
    def writer(self, max_bytes: int = MAX_SHARD_BYTES) -> Iterator[ShardWriter]:
        """A `ShardWriter` for this rank; pending tensors are flushed into a shard on exit."""
        w = ShardWriter(self, max_bytes)
        try:
            yield w
        finally:
            w.flush()

    def _commit_shard(self, tensors: dict[str, torch.Tensor], keys: list[str]) -> None:
        name = f"rank{self.rank}-{uuid.uuid4().hex[:12]}{SHARD_SUFFIX}"
        tmp = self.root / f"rank{self.rank}-.{name}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        meta = {"bytes": tmp.stat().st_size, "blake2b": file_checksum(tmp), "keys": keys}
        os.replace(tmp, self.root / name)
        st = (self.root / name).stat()
        self._verified[name] = (st.st_size, st.st_mtime_ns, meta["blake2b"])
        index = self._read_index(self.index_path) if self.index_path.is_file() else {"shards": {}}
        shards = dict(index.get("shards", {}))
        shards[name] = meta
        _write_json_atomic(self.index_path, {"version": CACHE_VERSION, "rank": self.rank, "shards": shards})
        for key in keys:
            self._entries[key] = name


class ShardWriter:
    """Collects entries and writes them as this rank's shards (see `FeatureCache.writer`)."""

    def __init__(self, cache: FeatureCache, max_bytes: int) -> None:
        self.cache = cache
        self.max_bytes = max_bytes
        self._tensors: dict[str, torch.Tensor] = {}
        self._keys: list[str] = []
        self._bytes = 0
        self.written = 0

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Queue entry `key` with its `{field: tensor}`; flushes a shard once `max_bytes` is exceeded."""
        for f, t in tensors.items():
            t = t.detach().cpu()
            self._tensors[f"{key}.{f}"] = t
            self._bytes += t.numel() * t.element_size()
        self._keys.append(key)
        if self._bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._keys:
            return
        self.cache._commit_shard(self._tensors, self._keys)
        self.written += len(self._keys)
        self._tensors, self._keys, self._bytes = {}, [], 0


# ---------------------------------------------------------------------------------------------- filling
@dataclass(frozen=True)
class CachedMedia:
    """Stands in for `DecodedMedia` in cached batches: which media a sample has, never the arrays.

    `frames` / `audio` are True when present and None otherwise (what `MerCollator.messages` tests).
    """

    key: str
    frames: bool | None
    audio: bool | None


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


def prompt_text(collator: MerCollator, sample: Sample, media: Any, use_video: bool, use_audio: bool) -> str:
    """The rendered prompt (through the generation prompt) exactly as the collator renders it."""
    return collator.processor.apply_chat_template(
        collator.messages(sample, media, use_video, use_audio), add_generation_prompt=True, tokenize=False
    )


def _layout_keys(collator: MerCollator, spec: CacheSpec, sample: Sample, media: Any, fkey: str) -> dict:
    """{(has_video, has_audio): (layout key, use_video, use_audio)} of every variant the sample needs."""
    out = {}
    for use_video, use_audio in spec.variants:
        has_video, has_audio = use_video and media.frames is not None, use_audio and media.audio is not None
        if (has_video, has_audio) not in out:
            text = prompt_text(collator, sample, media, use_video, use_audio)
            out[(has_video, has_audio)] = (
                layout_key(fkey, spec.layout_fp, has_video, has_audio, text),
                use_video,
                use_audio,
            )
    return out


@dataclass
class FillReport:
    """What `fill_cache` did (this rank's work, plus the totals every rank sees)."""

    samples: int = 0
    features_computed: int = 0
    layouts_computed: int = 0
    reused: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


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


def _compute_entry(
    collator: MerCollator, thinker: nn.Module, sample: Sample, media: Any, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One sample through the processor (all its media) and the towers: (feature entry, prompt ids)."""
    batch = dataclasses.replace(collator, train=False, modality_dropout=0.0, use_video=True, use_audio=True)(
        [(sample, media)]
    )
    entry: dict[str, torch.Tensor] = {
        "present": torch.tensor([media.frames is not None, media.audio is not None], dtype=torch.bool)
    }
    if batch.get("input_features") is not None:
        fam = batch["feature_attention_mask"]
        entry["audio"] = encode_audio(thinker, batch["input_features"].to(device), fam.to(device))
        entry["audio_len"] = fam.sum(dim=1).to(torch.long)
    if batch.get("pixel_values_videos") is not None:
        grid = batch["video_grid_thw"]
        merged, deepstack = encode_video_full(
            thinker, batch["pixel_values_videos"].to(device), grid.to(device)
        )
        entry["video"] = merged[0]
        if deepstack is not None:  # (levels, N, D)
            entry["video_deepstack"] = deepstack[0]
        entry["video_grid_thw"] = grid.to(torch.long)
        entry["video_second_per_grid"] = batch["video_second_per_grid"].to(torch.float32)
    return entry, batch["input_ids"][0]


def _prompt_ids(
    collator: MerCollator, sample: Sample, media: Any, use_video: bool, use_audio: bool
) -> torch.Tensor:
    """The processor's prompt `input_ids` (T,) for one sample and variant (no answer, no padding)."""
    one = dataclasses.replace(
        collator, train=False, modality_dropout=0.0, use_video=use_video, use_audio=use_audio
    )
    return one([(sample, media)])["input_ids"][0]


@torch.no_grad()
def fill_cache(
    cache: FeatureCache,
    samples: Sequence[Sample],
    collator: MerCollator,
    thinker: nn.Module,
    spec: CacheSpec,
    options: DecodeOptions,
    decoded_cache_dir: str | Path | None,
    *,
    accelerator: Accelerator | None = None,
    skip_bad: bool = False,
) -> tuple[list[Sample], dict[str, CachedMedia], FillReport]:
    """Compute the missing feature and layout entries of `samples` (split over the ranks) and return what
    the cached loader serves.

    Media are decoded only for samples with missing entries (`training.load_media_on_ranks`: through the
    `datasets` decode cache, main process first, or with `decoded_cache_dir` None a checking pass split over
    the ranks); the towers run only for missing feature entries, under the accelerator's autocast, on its
    device. Ranks take every world_size-th missing sample, write their own shards, then wait for each
    other and re-read every index.

    Args:
        cache: the cache (this rank's writer).
        samples: the split's samples.
        collator: the split's fused-path collator (renders prompts, runs the processor).
        thinker: the (frozen) thinker whose towers produce the features.
        spec: fingerprints and prompt variants.
        options: media decoding options.
        decoded_cache_dir: the `datasets` cache of decoded media (`data.cache_dir`); None: decode directly
            (`data.decode_cache=false`).
        accelerator: for rank, world size, device, autocast and barriers (None: one process, CPU).
        skip_bad: drop samples whose media cannot be decoded (reported) instead of raising.
    Returns:
        (the samples served, in order; {sample id: CachedMedia}; the report).
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
        _content_hash(hashes, path)
    hashes.save()
    if accelerator is not None:
        accelerator.wait_for_everyone()
        hashes.reload()  # ... and reads the others'
    fkeys = {s.id: feature_key(s, spec.encoder_fp, hashes) for s in samples}
    todo: list[Sample] = []
    for s in samples:
        fk = fkeys[s.id]
        if fk not in cache:
            todo.append(s)
            continue
        has_video, has_audio = cache.get(fk, ["present"])["present"].tolist()
        media = CachedMedia(fk, True if has_video else None, True if has_audio else None)
        if all(lk in cache for lk, _, _ in _layout_keys(collator, spec, s, media, fk).values()):
            report.reused += 1
        else:
            todo.append(s)
    skipped: set[str] = set()
    if accelerator is not None:  # every rank decided on the same cache state before anyone writes
        accelerator.wait_for_everyone()
    if todo:
        good, decoded, problems = load_media_on_ranks(todo, options, decoded_cache_dir, skip_bad, accelerator)
        report.skipped = problems
        skipped = {s.id for s in todo} - {s.id for s in good}
        cache.prune_own()
        autocast = accelerator.autocast() if accelerator is not None else nullcontext()
        with cache.writer() as writer, towers_ready(thinker, device), autocast:
            for i in range(rank, len(good), world):
                sample, media = decoded[i]
                fk = fkeys[sample.id]
                full_ids = None
                if fk not in cache:
                    entry, full_ids = _compute_entry(collator, thinker, sample, media, device)
                    writer.add(fk, entry)
                    report.features_computed += 1
                for (has_video, has_audio), (lk, use_video, use_audio) in _layout_keys(
                    collator, spec, sample, media, fk
                ).items():
                    if lk in cache:
                        continue
                    whole = has_video == (media.frames is not None) and has_audio == (media.audio is not None)
                    ids = (
                        full_ids
                        if (whole and full_ids is not None)
                        else _prompt_ids(collator, sample, media, use_video, use_audio)
                    )
                    writer.add(lk, {"input_ids": ids.to(torch.long)})
                    report.layouts_computed += 1
    if accelerator is not None:
        accelerator.wait_for_everyone()
    cache.refresh()
    served = [s for s in samples if s.id not in skipped]
    presence: dict[str, CachedMedia] = {}
    missing = []
    for s in served:
        fk = fkeys[s.id]
        if fk not in cache:
            missing.append(s.id)
            continue
        has_video, has_audio = cache.get(fk, ["present"])["present"].tolist()
        presence[s.id] = CachedMedia(fk, True if has_video else None, True if has_audio else None)
        if any(lk not in cache for lk, _, _ in _layout_keys(collator, spec, s, presence[s.id], fk).values()):
            missing.append(s.id)
    if missing:
        raise RuntimeError(
            f"feature cache {cache.root}: {len(missing)} sample(s) still lack entries after the "
            f"fill, e.g. {missing[:5]} (a rank failed, or the directory is shared with another run)"
        )
    report.seconds = time.perf_counter() - start
    return served, presence, report


# ------------------------------------------------------------------------------------------- collating
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
class CachedCollator:
    """Callable collator: `list[(Sample, CachedMedia)] -> dict`, the batch `MerCollator` would produce, from
    the cache alone (see the module docstring), with `audio_embeds` / `video_embeds` instead of the
    processor's features.

    Attributes:
        base: the fused-path collator whose prompt, labels, padding and modality dropout are reproduced.
        cache: the filled cache.
        spec: the run's fingerprints and variants.
        paths: also build the DCR unimodal sub-batches (`batch["paths"]`, as `UnimodalPathCollator`).
    """

    base: MerCollator
    cache: FeatureCache
    spec: CacheSpec
    paths: bool = False

    def __call__(self, items: Sequence[tuple[Sample, CachedMedia]]) -> dict:
        use_video, use_audio = self.base._batch_modalities(items)
        batch = self.collate(items, use_video, use_audio, train=self.base.train)
        if self.paths:
            batch["paths"] = {
                path: self.collate(items, uv, ua, train=False) for path, (uv, ua) in PATH_INPUTS.items()
            }
        return batch

    def collate(
        self, items: Sequence[tuple[Sample, CachedMedia]], use_video: bool, use_audio: bool, train: bool
    ) -> dict:
        """One batch of one prompt variant.

        Returns:
            input_ids / attention_mask / labels (None unless `train`) / token_modality / prompt_mask (B, T),
            class_id (B,), audio_embeds (sum M_i, D) or None, video_embeds (sum N_j, D) or None,
            video_deepstack (levels, sum N_j, D) (only when videos of a deepstack family),
            feature_attention_mask (A, max mel length) long (only when audios), video_grid_thw (V, 3) and
            video_second_per_grid (V,) (only when videos), use_audio_in_video, sample_ids.
        """
        base = self.base
        tok = base.processor.tokenizer
        rows: list[torch.Tensor] = []
        answer_lens: list[int] = []
        audio, audio_len, video, deepstack, grids, spg = [], [], [], [], [], []
        with_audio_in_video: set[bool] = set()
        for sample, media in items:
            has_video = use_video and media.frames is not None
            has_audio = use_audio and media.audio is not None
            text = prompt_text(base, sample, media, use_video, use_audio)
            lk = layout_key(media.key, self.spec.layout_fp, has_video, has_audio, text)
            ids = self.cache.get(lk, ["input_ids"])["input_ids"]
            fields = (
                ["video", "video_deepstack", "video_grid_thw", "video_second_per_grid"] if has_video else []
            ) + (["audio", "audio_len"] if has_audio else [])
            feats = self.cache.get(media.key, fields) if fields else {}
            if has_video:
                with_audio_in_video.add(has_audio)
                video.append(feats["video"])
                if "video_deepstack" in feats:
                    deepstack.append(feats["video_deepstack"])
                grids.append(feats["video_grid_thw"])
                spg.append(feats["video_second_per_grid"])
            if has_audio:
                audio.append(feats["audio"])
                audio_len.append(feats["audio_len"])
            if train:
                answer = tok(base.answer(sample) + "<|im_end|>", add_special_tokens=False)["input_ids"]
                ids = torch.cat([ids, torch.tensor(answer, dtype=ids.dtype)])
                answer_lens.append(len(answer))
            rows.append(ids)
        if len(with_audio_in_video) > 1:
            raise ValueError(
                "a batch mixes videos with and without their audio track; the backbone's position ids need "
                "one layout per batch (give every sample audio, or set use_audio=False for the batch)"
            )
        B, T = len(rows), max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else base.token_ids.pad
        input_ids = torch.full((B, T), pad, dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if train else None
        prompt_mask = torch.zeros((B, T), dtype=torch.bool)
        for i, ids in enumerate(rows):
            start = 0 if train else T - len(ids)  # right padding for training batches, left for prompts
            input_ids[i, start : start + len(ids)] = ids
            attention[i, start : start + len(ids)] = 1
            n_answer = answer_lens[i] if train else 0
            prompt_mask[i, start : start + len(ids) - n_answer] = True
            if train:
                labels[i, start + len(ids) - n_answer : start + len(ids)] = ids[len(ids) - n_answer :]
        label_index = {name: i for i, name in enumerate(base.labels)}
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "audio_embeds": torch.cat(audio) if audio else None,
            "video_embeds": torch.cat(video) if video else None,
        }
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
        batch.update(
            labels=labels,
            class_id=torch.tensor(
                [label_index.get(s.label, IGNORE_INDEX) for s, _ in items], dtype=torch.long
            ),
            token_modality=token_modality(input_ids, base.token_ids),
            prompt_mask=prompt_mask,
            use_audio_in_video=with_audio_in_video == {True},
            sample_ids=[s.id for s, _ in items],
        )
        return batch


# -------------------------------------------------------------------------------------------- the loader
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
    collator: Any,
    variants: Sequence[tuple[bool, bool]],
    accelerator: Accelerator | None = None,
) -> tuple[list[Sample], CachedCollator, dict[str, CachedMedia], FillReport]:
    """Fill the run's cache for `samples` (missing entries only) and build the collator that reads it.

    Args:
        cfg: the run config (`data.feature_cache_dir`, `data.cache_dir`, `data.on_error`, freeze switches).
        backbone: the loaded backbone (its thinker's towers fill the cache).
        samples: the split's samples.
        collator: `data.loading.build_collator`'s result (a `MerCollator`, or a `UnimodalPathCollator` with DCR).
        variants: the (use_video, use_audio) prompt variants to cache layouts of.
        accelerator: ranks, device, autocast (None: one process).
    Returns:
        (the samples served, the `CachedCollator`, {sample id: CachedMedia}, the fill report).
    Raises:
        ValueError: a tower or projector is unfrozen (`model.freeze.*`), or the thinker is of no supported family.
    """
    check_cacheable(cfg)
    base = getattr(collator, "base", collator)
    options = decode_options(cfg, backbone.processor)
    mixed = accelerator.mixed_precision if accelerator is not None else "no"
    check_supported(backbone.model)
    spec = build_spec(backbone, options, variants, mixed)
    cache = FeatureCache(cfg.data.feature_cache_dir, rank=accelerator.process_index if accelerator else 0)
    served, presence, fill = fill_cache(
        cache,
        samples,
        base,
        backbone.model,
        spec,
        options,
        decode_cache_dir(cfg),
        accelerator=accelerator,
        skip_bad=cfg.data.on_error == "skip",
    )
    return served, CachedCollator(base, cache, spec, paths=base is not collator), presence, fill


def build_cached_loader(
    cfg: RunConfig,
    backbone: Backbone,
    samples: list[Sample],
    collator: Any,
    *,
    train: bool,
    variants: Sequence[tuple[bool, bool]] = ((True, True),),
    accelerator: Accelerator | None = None,
    report: dict[str, list[str]] | None = None,
    split: str = "train",
) -> tuple[torch.utils.data.DataLoader, list[Sample]]:
    """A DataLoader over cached features (filling missing entries first, `prepare_cache`) and the samples
    it serves; `train` shuffles and uses `train.batch_size` (else `train.eval_batch_size`); problems of
    skipped samples (data.on_error=skip) are appended to `report[split]`."""
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
    if fill.skipped and report is not None:
        report.setdefault(split, []).extend(fill.skipped)
    if not served:
        raise DataError(f"data.{split}", ["no usable samples left after skipping bad ones", *fill.skipped])
    loader = torch.utils.data.DataLoader(
        CachedSampleDataset(served, presence),
        batch_size=cfg.train.batch_size if train else cfg.train.eval_batch_size,
        shuffle=train,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        drop_last=False,
    )
    return loader, served
