"""DFEW: `<root>/EmoLabel_DataSplit/<split>(single-labeled)/set_<fold>.csv` (`video_name,label`).

Label ids 1..7 are `DFEW_LABELS`; videos are `<root>/<video_dir>/<video_name>.mp4|.avi` (`video_dir`
defaults to `videos`). Numeric names are matched both as written and zero-padded to 5 digits
(`1` <-> `00001`), and the sample id is the 5-digit form (`dfew_id`, which the evaluation applies to
prediction ids too). `dfew_label_rows` is the same row rules without media.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mllm_mer.data.readers.common import UniqueIds, csv_rows, find_media, sample_name
from mllm_mer.data.schema import Sample

DFEW_LABELS: tuple[str, ...] = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
"""DFEW label names; the CSV's label id k (1..7) is DFEW_LABELS[k - 1]."""


def dfew_id(name: str) -> str:
    """DFEW sample id of a clip name: stripped, numeric names zero-padded to 5 digits (`1` -> `00001`)."""
    name = name.strip()
    return name.zfill(5) if name.isdigit() else name


def _dfew_candidates(name: str) -> list[str]:
    """File stems to try for a DFEW video name: as written, then zero-padded / unpadded when numeric."""
    if not name.isdigit():
        return [name]
    return list(dict.fromkeys([name, name.zfill(5), str(int(name))]))


def read_dfew(root: str | Path, split: str, fold: int, *, video_dir: str = "videos") -> list[Sample]:
    """Read one DFEW fold (single-labelled clips).

    Args:
        root: DFEW root holding `EmoLabel_DataSplit/`.
        split: "train" or "test".
        fold: 1..5.
        video_dir: folder with the clips, relative to `root`.
    Returns:
        Samples in file order, labels from `DFEW_LABELS`.
    Raises:
        ValueError: bad split/fold, or a bad row (see `mllm_mer.data.readers`).
    """
    if split not in ("train", "test"):
        raise ValueError(f"DFEW split {split!r} unknown; valid: ['train', 'test']")
    if fold not in range(1, 6):
        raise ValueError(f"DFEW fold {fold!r} unknown; valid: 1..5")
    root = Path(root)
    path = root / "EmoLabel_DataSplit" / f"{split}(single-labeled)" / f"set_{fold}.csv"
    samples = []
    for where, name, sample_id, label in dfew_label_rows(path):
        stems = [f"{video_dir}/{stem}" for stem in _dfew_candidates(name)]
        video = find_media(root, stems, what=f"{where} (video of {name!r})")
        samples.append(Sample(id=sample_id, video=video, label=label))
    return samples


def dfew_label_rows(path: str | Path) -> Iterator[tuple[str, str, str, str]]:
    """Validated rows of a DFEW split CSV (`video_name,label`, label ids 1..7); media are not touched.

    Yields:
        (where, video name, sample id (`dfew_id`: numeric names zero-padded to 5 digits), label name).
    Raises:
        ValueError: a missing column, a bad label id or a duplicate id (naming the file and line).
    """
    ids = UniqueIds()
    for line, row in csv_rows(Path(path), ["video_name", "label"]):
        where = f"{path}, line {line}"
        name = sample_name(row["video_name"], what=where)
        raw = row["label"].strip()
        if not (raw.isdigit() and 1 <= int(raw) <= len(DFEW_LABELS)):
            raise ValueError(f"{where}: label {row['label']!r} is not an integer in 1..{len(DFEW_LABELS)}")
        sample_id = dfew_id(name)
        ids.add(sample_id, where)
        yield where, name, sample_id, DFEW_LABELS[int(raw) - 1]
