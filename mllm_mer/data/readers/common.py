"""Row rules shared by every dataset reader: CSV rows, media lookup inside the root, labels, ids.

Each helper raises `ValueError` naming the file and line (or the `what` location it is given).
`named_csv_rows` is also the row reader of the evaluation references (`eval/tasks/`), so the two
cannot drift apart.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from pathlib import Path

from mllm_mer.data.paths import resolve_inside

MEDIA_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi")
"""Video extensions tried, in order, when an annotation names a clip without one."""


def csv_rows(path: Path, columns: Sequence[str | tuple[str, ...]]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row) from a CSV with a header, checking required columns and field counts.

    Args:
        path: CSV file (UTF-8, optional BOM).
        columns: required columns; a tuple lists accepted spellings, and the row dict uses the first.
    Yields:
        (line, row) where `row` maps each required column (first spelling) to its cell text.
    Raises:
        ValueError: on a missing file, empty file, missing column, or a row with the wrong field count.
    """
    if not path.is_file():
        raise ValueError(f"{path}: annotation file not found")
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header row")
        header = [h.strip() for h in header]
        index: dict[str, int] = {}
        for col in columns:
            names = (col,) if isinstance(col, str) else col
            found = [n for n in names if n in header]
            if not found:
                raise ValueError(
                    f"{path}: missing column {' or '.join(map(repr, names))}; header is {header}"
                )
            index[names[0]] = header.index(found[0])
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}, line {reader.line_num}: {len(row)} fields, header has {len(header)}"
                )
            yield reader.line_num, {key: row[i] for key, i in index.items()}


def find_media(
    root: Path, rel_stems: str | Sequence[str], *, what: str, extensions: Sequence[str] = MEDIA_EXTENSIONS
) -> Path:
    """Find the first existing `<root>/<stem><ext>` over stems, then extensions (all must stay inside root).

    Args:
        root: dataset or media root.
        rel_stems: one stem or several to try in order, relative to `root`, without extension.
        what: location for the error message.
        extensions: extensions tried for each stem, in order.
    Returns:
        The resolved path of the first file found.
    Raises:
        ValueError: if a candidate escapes the root or none exists.
    """
    stems = [rel_stems] if isinstance(rel_stems, str) else list(rel_stems)
    tried = []
    for stem in stems:
        for ext in extensions:
            path = resolve_inside(root, stem + ext, what=what)
            if path.is_file():
                return path
            tried.append(str(path))
    raise ValueError(f"{what}: media file not found; tried {tried}")


def media_file(root: Path, rel: str, *, what: str) -> Path:
    """Resolve an explicit media path inside `root` and check that the file exists."""
    path = resolve_inside(root, rel, what=what)
    if not path.is_file():
        raise ValueError(f"{what}: media file {rel!r} not found (looked at {str(path)!r})")
    return path


def check_label(raw: str, labels: Sequence[str], *, what: str) -> str:
    """Normalise a label cell (`.strip().lower()`) and check it is in `labels`."""
    label = raw.strip().lower()
    if label not in labels:
        raise ValueError(f"{what}: label {raw!r} not in label set {list(labels)}")
    return label


def sample_name(raw: str, *, what: str) -> str:
    """A sample name cell, stripped; the rule every reader here (and `eval/tasks/`) applies to ids.

    Args:
        raw: the cell text.
        what: location for the error message (e.g. "<file>, line 3").
    Raises:
        ValueError: the name is empty after stripping.
    """
    name = raw.strip()
    if not name:
        raise ValueError(f"{what}: empty name")
    return name


class UniqueIds:
    """Tracks sample ids of one read and reports a duplicate with both locations."""

    def __init__(self) -> None:
        self._where: dict[str, str] = {}

    def add(self, sample_id: str, where: str) -> None:
        """Record `sample_id` found at `where`; raise ValueError naming both places if it was seen."""
        if sample_id in self._where:
            raise ValueError(
                f"{where}: duplicate sample id {sample_id!r} (first at {self._where[sample_id]})"
            )
        self._where[sample_id] = where


def named_csv_rows(
    path: str | Path, columns: Sequence[str | tuple[str, ...]]
) -> Iterator[tuple[str, str, dict[str, str]]]:
    """Validated rows of an annotation CSV whose first required column names the sample; media untouched.

    The row rules shared by the readers here and the evaluation references (`eval/tasks/`): the header
    holds `columns`, every row has the header's field count, names are non-empty after stripping and
    unique within the file.

    Args:
        path: CSV file (UTF-8, optional BOM).
        columns: required columns, the sample name first; a tuple lists accepted spellings, and the row
            dict uses the first.
    Yields:
        (where, name, row): "<path>, line <n>", the stripped name, and each required column's cell text.
    Raises:
        ValueError: a missing file or column, a wrong field count, an empty or duplicate name.
    """
    path = Path(path)
    key = columns[0] if isinstance(columns[0], str) else columns[0][0]
    ids = UniqueIds()
    for line, row in csv_rows(path, columns):
        where = f"{path}, line {line}"
        name = sample_name(row[key], what=where)
        ids.add(name, where)
        yield where, name, row
