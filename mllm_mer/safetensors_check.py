"""Is a safetensors file complete? Checked from its header and size alone, without loading a tensor.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (each tensor's dtype, shape
and `data_offsets` into the data section, plus optional `__metadata__`), then the data section. A file cut
short (disk full, an interrupted copy) or overwritten in place fails one of these checks; `safetensors`
itself would only say "incomplete metadata" without naming the file. Used by every reader of a run
directory (`mllm_mer.run_files`) and by checkpoint resume; the frozen-encoder cache's shard check can use it
too. Imports no torch.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100_000_000
"""The safetensors library refuses larger headers; a larger length means a damaged file."""
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
"""Bytes per element of the dtypes whose tensors' sizes are checked (others: only their offsets)."""


class SafetensorsError(ValueError):
    """A file is not a complete safetensors file; the message says what is wrong (not the path)."""


def read_header(path: str | Path) -> dict:
    """The JSON header of the safetensors file at `path`, checked against the file's size.

    Checks: the 8-byte length, the header inside the file, every tensor's `data_offsets` inside the data
    section, contiguous and covering it exactly (as the library requires), and each tensor's byte length
    equal to its dtype's size times its element count.

    Returns:
        {tensor name: {"dtype", "shape", "data_offsets"}, optionally "__metadata__": {...}}.
    Raises:
        FileNotFoundError: no file at `path`.
        SafetensorsError: anything inconsistent (the message says what).
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"only {size} bytes, shorter than the 8-byte header length (truncated?)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"header length {n} is implausible (damaged file?)")
        if 8 + n > size:
            raise SafetensorsError(f"the header ({n} bytes) runs past the end of the file ({size} bytes; truncated?)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsError(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError("the header is not a JSON object")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            numel = math.prod(int(d) for d in info["shape"])
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"tensor {name!r} has a malformed header entry") from None
        if dtype in DTYPE_BYTES and end - begin != numel * DTYPE_BYTES[dtype]:
            raise SafetensorsError(f"tensor {name!r} ({dtype}, shape {info['shape']}) spans {end - begin} bytes, "
                                   f"expected {numel * DTYPE_BYTES[dtype]}")
        spans.append((begin, end, name))
    data = size - 8 - n
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position or end < begin:
            raise SafetensorsError(f"tensor {name!r} has data offsets {begin}..{end}, expected to start at {position}")
        position = end
    if position != data:
        raise SafetensorsError(f"the tensors end at byte {8 + n + position} but the file has {size} bytes"
                               + (" (truncated?)" if position > data else ""))
    return header


def safetensors_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete safetensors file (see `read_header`), or None when it is one."""
    try:
        read_header(path)
    except FileNotFoundError:
        return "missing"
    except (OSError, SafetensorsError) as exc:
        return str(exc)
    return None


def tensor_names(header: dict) -> list[str]:
    """The tensor names of a `read_header` result (without `__metadata__`)."""
    return [k for k in header if k != "__metadata__"]
