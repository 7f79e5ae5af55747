"""MER2023: `<root>/<split>-label.csv` (`name,discrete[,valence]`) and videos `<root>/<split>/<name>.mp4|.avi`.

Labels are `MER2023_LABELS` (compared after `.strip().lower()`); an empty `discrete` gives an unlabelled
sample; `valence` is not carried. `mer2023_label_rows` is the same row rules without media (the
evaluation references use it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mllm_mer.data.readers.common import UniqueIds, check_label, csv_rows, find_media, sample_name
from mllm_mer.data.schema import MER2023_LABELS, Sample

MER2023_SPLITS: tuple[str, ...] = ("train", "test1", "test2", "test3")
"""MER2023 label files `<split>-label.csv`."""


def read_mer2023(root: str | Path, split: str) -> list[Sample]:
    """Read one MER2023 split.

    Args:
        root: dataset root holding `<split>-label.csv` and the `<split>/` video folder.
        split: one of `MER2023_SPLITS`.
    Returns:
        Samples in file order, labels from `MER2023_LABELS` ("" when `discrete` is empty).
    Raises:
        ValueError: unknown split, or a bad row (see `mllm_mer.data.readers`).
    """
    if split not in MER2023_SPLITS:
        raise ValueError(f"MER2023 split {split!r} unknown; valid: {list(MER2023_SPLITS)}")
    root = Path(root)
    samples = []
    for where, name, label in mer2023_label_rows(root / f"{split}-label.csv"):
        video = find_media(root, f"{split}/{name}", what=f"{where} (video of {name!r})")
        samples.append(Sample(id=name, video=video, label=label))
    return samples


def mer2023_label_rows(path: str | Path) -> Iterator[tuple[str, str, str]]:
    """Validated rows of a MER2023 label CSV (`name,discrete[,valence]`); media are not touched.

    Yields:
        (where, name, label): the label is in `MER2023_LABELS` (after `.strip().lower()`), or "" when
        `discrete` is empty (an unlabelled row).
    Raises:
        ValueError: a missing file or column, a wrong field count, an empty or duplicate name, or a label
            outside `MER2023_LABELS` (naming the file and line).
    """
    path = Path(path)
    ids = UniqueIds()
    for line, row in csv_rows(path, ["name", "discrete"]):
        where = f"{path}, line {line}"
        name = sample_name(row["name"], what=where)
        label = check_label(row["discrete"], MER2023_LABELS, what=where) if row["discrete"].strip() else ""
        ids.add(name, where)
        yield where, name, label
