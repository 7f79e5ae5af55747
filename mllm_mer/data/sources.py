"""One entry point for training / inference data files in the formats users bring.

`data.format` selects the reader: `mer_jsonl` (our sample JSONL, see README "Data"), `sharegpt`
(LLaMA-Factory: `messages`/`conversations` with `<video>`/`<audio>` tags and `videos`/`audios` lists) or
`swift` (ms-swift messages JSONL). The label comes from `data.label_field` when set, otherwise from the
last label word of the assistant answer (peer formats only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.readers import read_sharegpt, read_swift_jsonl
from mllm_mer.data.schema import Sample

FORMATS = ("mer_jsonl", "sharegpt", "swift")


def read_samples(
    path: str | Path, fmt: str, labels: Sequence[str], *, label_field: str | None = None,
    require_label: bool = True, media_root: str | Path | None = None,
) -> list[Sample]:
    """Read a data file of format `fmt` into `Sample`s (media paths resolved against, and checked inside,
    `media_root`: `data.media_root`, None = the file's folder).

    Raises:
        ValueError: unknown format, or bad rows (the reader's message names the file and line/record).
        FileNotFoundError: the file does not exist.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if fmt == "mer_jsonl":
        return read_jsonl(path, labels, require_label=require_label, media_root=media_root)
    if fmt == "sharegpt":
        return read_sharegpt(path, labels=labels, label_field=label_field, media_root=media_root)
    if fmt == "swift":
        return read_swift_jsonl(path, labels=labels, label_field=label_field, media_root=media_root)
    raise ValueError(f"data.format={fmt!r} unknown; valid: {list(FORMATS)}")
