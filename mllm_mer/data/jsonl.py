"""Read our own JSONL sample format into `Sample`s, checking every row before anything loads.

One JSON object per line with fields `id, video, audio, subtitle, label, explanation, subset, cues`.
`video` and `audio` are paths relative to the JSONL file's folder (the dataset root); `audio: null`
means the video's own audio track. Paths that escape the root (`..`, absolute paths elsewhere, symlinks
pointing out) are refused. All problems of a file are collected and raised together.

`iter_json_lines` is the one JSON-lines parser: it hands each line's value or decode error to the caller,
who decides whether to collect problems (`read_jsonl`) or stop at the first (the chat readers in
`mllm_mer.data.readers.chat`, the prediction files of `eval/tasks/`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mllm_mer.data.paths import resolve_inside
from mllm_mer.data.schema import CUE_KEYS, SUBSETS, Sample

REQUIRED_FIELDS = ("id", "video", "label")
KNOWN_FIELDS = frozenset({"id", "video", "audio", "subtitle", "label", "explanation", "subset", "cues"})


class DataError(ValueError):
    """Problems found in a dataset file; `problems` lists them one line each (line number, id, what)."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(
            f"{len(problems)} problem(s) in {path}:\n" + "\n".join(f"  - {p}" for p in shown) + more
        )


def iter_json_lines(
    path: str | Path, *, encoding: str = "utf-8"
) -> Iterator[tuple[int, Any, json.JSONDecodeError | None]]:
    """Parse a JSON-lines file one line at a time, skipping blank lines.

    Lines are split on "\\n", "\\r" and "\\r\\n" only (a U+2028 inside a JSON string stays in its line).

    Args:
        path: the file.
        encoding: text encoding ("utf-8-sig" also accepts a byte-order mark).
    Yields:
        (line number from 1, value, None) for a line holding valid JSON, or (line number, None, the
        `json.JSONDecodeError`) for one that does not; the caller words the error and decides whether
        to go on.
    Raises:
        OSError: the file cannot be opened.
    """
    with Path(path).open(encoding=encoding) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                yield lineno, None, err
                continue
            yield lineno, value, None


def _str_field(row: dict, key: str, where: str, problems: list[str], required: bool = False) -> str:
    value = row.get(key)
    if value is None:
        if required:
            problems.append(f"{where}: missing field '{key}'")
        return ""
    if not isinstance(value, str):
        problems.append(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
        return ""
    return value


def read_jsonl(
    path: str | Path,
    labels: Sequence[str],
    *,
    check_files: bool = True,
    require_label: bool = True,
    max_subtitle_chars: int = 4000,
    skipped: list[str] | None = None,
    media_root: str | Path | None = None,
) -> list[Sample]:
    """Read and validate a sample JSONL file.

    Args:
        path: the JSONL file; its folder is the dataset root for relative media paths.
        labels: the label set; a row's label must be one of them.
        check_files: also check that every media file exists.
        require_label: rows must carry a label (False for unlabelled inference data).
        max_subtitle_chars: longer subtitles are a problem.
        skipped: when given, bad rows are skipped and their problems appended here instead of raising.
        media_root: the dataset root media paths are relative to and must stay inside (None: the file's folder).
    Returns:
        The (good) samples in file order.
    Raises:
        DataError: every problem found, one per line, naming the line number, the sample id and the file.
        FileNotFoundError: `path` itself does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    root = Path(media_root).resolve() if media_root is not None else path.resolve().parent
    label_set = set(labels)
    problems: list[str] = []
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for lineno, row, error in iter_json_lines(path):
        where = f"line {lineno}"
        if error is not None:
            problems.append(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a JSON object, got {type(row).__name__}")
            continue
        n_before = len(problems)
        sid = _str_field(row, "id", where, problems, required=True)
        if sid:
            where = f"line {lineno} (id '{sid}')"
            if sid in seen:
                problems.append(f"{where}: duplicate id, first seen on line {seen[sid]}")
            seen.setdefault(sid, lineno)
        unknown = sorted(set(row) - KNOWN_FIELDS)
        if unknown:
            problems.append(f"{where}: unknown field(s) {unknown}; known: {sorted(KNOWN_FIELDS)}")
        label = _str_field(row, "label", where, problems, required=require_label)
        if label and label not in label_set:
            problems.append(f"{where}: label '{label}' is not in the label set {sorted(label_set)}")
        subtitle = _str_field(row, "subtitle", where, problems)
        if any(ord(ch) < 32 and ch not in "\t\n" for ch in subtitle):
            problems.append(f"{where}: subtitle contains control characters")
        if len(subtitle) > max_subtitle_chars:
            problems.append(
                f"{where}: subtitle has {len(subtitle)} characters, more than data.max_subtitle_chars="
                f"{max_subtitle_chars}"
            )
        subset = row.get("subset")
        if subset is not None and subset not in SUBSETS:
            problems.append(f"{where}: subset '{subset}' unknown; valid: {list(SUBSETS)} or null")
        cues = row.get("cues") or {}
        if not isinstance(cues, dict) or set(cues) - set(CUE_KEYS):
            problems.append(f"{where}: cues must be an object with keys among {list(CUE_KEYS)}")
            cues = {}
        media: dict[str, Path | None] = {"video": None, "audio": None}
        for key in ("video", "audio"):
            rel = row.get(key)
            if rel is None:
                if key == "video":
                    problems.append(f"{where}: missing field 'video'")
                continue
            if not isinstance(rel, str):
                problems.append(f"{where}: field '{key}' must be a path string or null")
                continue
            try:
                media[key] = resolve_inside(root, rel, what=f"{where} {key}")
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if check_files and not media[key].is_file():
                problems.append(f"{where}: {key} file not found: {media[key]}")
        if len(problems) > n_before:
            continue
        samples.append(
            Sample(
                id=sid,
                video=media["video"],
                audio=media["audio"],
                subtitle=subtitle,
                label=label,
                explanation=_str_field(row, "explanation", where, problems),
                subset=subset,
                cues={k: str(v) for k, v in cues.items()},
            )
        )
    if skipped is not None:
        skipped.extend(f"{path}: {p}" for p in problems)
        problems = []
    if not samples and not problems:
        problems.append("file holds no usable samples")
    if problems:
        raise DataError(path, problems)
    return samples
