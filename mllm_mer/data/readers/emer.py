"""EMER v1 / v2 explanation CSVs and open-vocabulary (OV) label CSVs, with videos `<media_root>/<name>.mp4|.avi`.

- EMER v1 (`read_emer_v1`): CSV `names,emotions,subtitles,reasons` (MERTools `EMER/dataset-v1/gt-eng.csv`):
  label = `emotions` (MER2023 labels), subtitle = `subtitles`, explanation = `reasons`.
- EMER v2 (`read_emer_v2`): CSV `name,chinese,english`: explanation = the `language` column, no label.
- OV labels (`read_ov_labels`): CSV `name,openset` with list strings like "['happy', 'excited']"
  (split by `split_openset_cell`, MERTools' rule); label = the words joined with ", ".

For all three the id column may be `name` or `names`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from pathlib import Path

from mllm_mer.data.readers.common import (
    UniqueIds,
    check_label,
    csv_rows,
    find_media,
    named_csv_rows,
    sample_name,
)
from mllm_mer.data.schema import MER2023_LABELS, Sample

_OPENSET_SPLIT = re.compile(r"['\",]")


def split_openset_cell(text: str) -> list[str]:
    """Split an open-vocabulary label cell (a list string) the way MERTools' `string_to_list` does.

    For annotation and prediction files (`openset` columns); a model's free-text answer is read by
    `mllm_mer.labels.parse_openset_answer` instead. One leading "[" and one trailing "]" are removed and
    the rest is split on every `'`, `"` and `,`; pieces are stripped and empty ones dropped. So
    "['happy', 'excited']" and "[happy, excited]" both give ["happy", "excited"], and
    "['happy, excited']" gives the same (MERTools splits inside quotes too). `ast.literal_eval` (never
    `eval`) only guards against well-formed literals of the wrong shape.

    Args:
        text: the cell text; "" gives [].
    Returns:
        The words in order (duplicates kept).
    Raises:
        ValueError: if `text` starts with "[" and is a Python literal that is not a flat list of
            strings (e.g. "[1, 2]", "[['a'], ['b']]"), or is a lone "[" (MERTools cannot parse it).
    """
    if text == "":
        return []
    if text.startswith("["):
        if text == "[":
            raise ValueError("unparseable list '[' (an opening bracket only)")
        try:
            value = ast.literal_eval(text)
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            value = None  # not a Python literal: MERTools' splitting still applies (e.g. "[happy, sad]")
        if value is not None and not (
            isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"unparseable list {text!r}: expected a flat list of strings")
    body = text[1:] if text.startswith("[") else text
    body = body[:-1] if body.endswith("]") else body
    return [piece.strip() for piece in _OPENSET_SPLIT.split(body) if piece.strip()]


def read_emer_v1(
    csv_path: str | Path, media_root: str | Path, *, labels: Sequence[str] = MER2023_LABELS
) -> list[Sample]:
    """Read EMER v1 annotations (`names,emotions,subtitles,reasons`).

    Args:
        csv_path: the annotation CSV (e.g. `gt-eng.csv`).
        media_root: folder with `<name>.mp4|.avi`.
        labels: label set of the `emotions` column.
    Returns:
        Samples with label, subtitle and explanation, in file order.
    Raises:
        ValueError: on a bad row (see `mllm_mer.data.readers`).
    """
    path, root = Path(csv_path), Path(media_root)
    ids, samples = UniqueIds(), []
    for line, row in csv_rows(path, [("names", "name"), "emotions", "subtitles", "reasons"]):
        where = f"{path}, line {line}"
        name = sample_name(row["names"], what=where)
        label = check_label(row["emotions"], labels, what=where)
        ids.add(name, where)
        video = find_media(root, name, what=f"{where} (video of {name!r})")
        samples.append(
            Sample(
                id=name,
                video=video,
                label=label,
                subtitle=row["subtitles"].strip(),
                explanation=row["reasons"].strip(),
            )
        )
    return samples


def read_emer_v2(csv_path: str | Path, media_root: str | Path, *, language: str = "english") -> list[Sample]:
    """Read EMER v2 descriptions (`name,chinese,english`); samples are unlabelled.

    Args:
        csv_path: the annotation CSV (e.g. `final-EMER-reason.csv`).
        media_root: folder with `<name>.mp4|.avi`.
        language: "english" or "chinese": which column becomes the explanation.
    Returns:
        Samples with the explanation, in file order.
    Raises:
        ValueError: unknown language or a bad row (see `mllm_mer.data.readers`).
    """
    if language not in ("english", "chinese"):
        raise ValueError(f"EMER v2 language {language!r} unknown; valid: ['english', 'chinese']")
    path, root = Path(csv_path), Path(media_root)
    samples = []
    for where, name, row in named_csv_rows(path, [("name", "names"), "chinese", "english"]):
        video = find_media(root, name, what=f"{where} (video of {name!r})")
        samples.append(Sample(id=name, video=video, explanation=row[language].strip()))
    return samples


def read_ov_labels(csv_path: str | Path, media_root: str | Path) -> list[Sample]:
    """Read open-vocabulary labels (`name,openset`) into samples whose label is the comma-joined words.

    Args:
        csv_path: the label CSV (e.g. MER2024-OV / MER2025 Track 2 ground truth).
        media_root: folder with `<name>.mp4|.avi`.
    Returns:
        Samples with `label` like "happy, excited" ("" for an empty list), in file order.
    Raises:
        ValueError: on a bad row or an unparseable list (see `split_openset_cell`).
    """
    path, root = Path(csv_path), Path(media_root)
    ids, samples = UniqueIds(), []
    for line, row in csv_rows(path, [("name", "names"), "openset"]):
        where = f"{path}, line {line}"
        name = sample_name(row["name"], what=where)
        try:
            words = split_openset_cell(row["openset"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        ids.add(name, where)
        video = find_media(root, name, what=f"{where} (video of {name!r})")
        samples.append(Sample(id=name, video=video, label=", ".join(words)))
    return samples
