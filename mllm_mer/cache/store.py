"""Storage of the frozen-encoder cache: safetensors shards and one JSON index per rank, in one directory.

Layout (`data.feature_cache_dir`): shards `rank<r>-<token>.safetensors` with tensors named `<key>.<field>`,
and `index-rank<r>.json` listing each of rank r's shards with its size, blake2b checksum and keys. Each rank
writes only its own shards and index (a shard is written to a temporary name, checksummed and renamed; the
index is rewritten atomically after every shard), so DDP ranks never race; every rank reads every index.

A shard whose size, safetensors header (header length + data offsets must end exactly at the file size) or
checksum does not match its index is treated as missing: its entries are recomputed and the owner rank drops
it on its next fill (`FeatureCache.prune_own`). Checksums are verified once per process (a run start reads the
cache once; later re-reads skip shards whose size and mtime are unchanged). Shards are read through
`safe_open` (mmap), so DataLoader workers read only what a batch needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bumped whenever the stored fields or their meaning change (part of every key and of every JSON file)."""
INDEX_PREFIX = "index-rank"
SHARD_SUFFIX = ".safetensors"
MAX_SHARD_BYTES = 256 * 2**20
"""A rank starts a new shard once the pending tensors exceed this size."""


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
    """blake2b (20 bytes, hex) of the whole file."""
    h = hashlib.blake2b(digest_size=20)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(8 * 2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` as JSON to `path` through a temporary file and a rename."""
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
        self._handles: dict[str, tuple[Any, frozenset[str]]] = {}  # shard -> (safe_open handle, tensor names)
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

    def _handle(self, name: str) -> tuple[Any, frozenset[str]]:
        if os.getpid() != self._pid:  # a forked DataLoader worker opens its own handles
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            handle = safe_open(str(self.root / name), framework="pt")
            self._handles[name] = (handle, frozenset(handle.keys()))
        return self._handles[name]

    def get(self, key: str, fields: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors `fields` of entry `key` (fields the entry does not hold are left out).

        Raises:
            KeyError: no usable entry `key`.
        """
        if key not in self._entries:
            raise KeyError(f"feature cache {self.root} has no entry {key} (run scripts/cache_features.py)")
        handle, names = self._handle(self._entries[key])
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
            write_json_atomic(self.index_path, {"version": CACHE_VERSION, "rank": self.rank, "shards": shards})
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
        write_json_atomic(self.index_path, {"version": CACHE_VERSION, "rank": self.rank, "shards": shards})
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
