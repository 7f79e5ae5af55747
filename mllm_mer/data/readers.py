"""Readers from public MER dataset layouts into `list[Sample]`.

Every reader validates as it goes and raises `ValueError` naming the file and the line (CSV / text /
JSONL) or record (JSON list) of the first bad row: missing columns, unknown labels, duplicate ids,
missing media, and media paths that escape the dataset root (`..`, absolute paths elsewhere, symlinks
pointing outside; see `mllm_mer.data.paths.resolve_inside`). Labels are compared after
`.strip().lower()`. Media files are looked up with the extensions `.mp4` then `.avi`. Sample paths are
absolute and resolved. The same row rules without media (for evaluation references) are public:
`mer2023_label_rows`, `dfew_label_rows` and, for any CSV keyed by a sample name, `named_csv_rows`.

Layouts read (all paths relative to the `root` / `media_root` argument):

- MER2023 (`read_mer2023`): `<root>/<split>-label.csv` with columns `name,discrete[,valence]`
  (valence is not carried; an empty `discrete` gives an unlabelled sample), videos
  `<root>/<split>/<name>.mp4|.avi`; labels `MER2023_LABELS`.
- DFEW (`read_dfew`): `<root>/EmoLabel_DataSplit/<split>(single-labeled)/set_<fold>.csv` with columns
  `video_name,label`, label ids 1..7 = `DFEW_LABELS`; videos `<root>/<video_dir>/<video_name>.mp4|.avi`
  (`video_dir` defaults to `videos`). Numeric names are matched both as written and zero-padded to
  5 digits (`1` <-> `00001`), and the sample id is the 5-digit form.
- EMER v1 (`read_emer_v1`): CSV `names,emotions,subtitles,reasons` (MERTools `EMER/dataset-v1/gt-eng.csv`):
  label = `emotions` (MER2023 labels), subtitle = `subtitles`, explanation = `reasons`.
- EMER v2 (`read_emer_v2`): CSV `name,chinese,english`: explanation = the `language` column, no label.
- OV labels (`read_ov_labels`): CSV `name,openset` with list strings like "['happy', 'excited']"
  (parsed by `parse_openset`, MERTools' rule); label = the words joined with ", ".
  For these three, videos are `<media_root>/<name>.mp4|.avi`; the id column may be `name` or `names`.
- CA-MER (`read_camer`): one annotation file per subset (`video_aligned`, `audio_aligned`,
  `consistent`). `CAMERLayout` sets where they are: `annotation` (default `"{subset}.json"`) and
  `media` (default `"{subset}/{name}"`, extension added), both relative to the root, with `{subset}`
  and `{name}` filled in. A `.json` annotation file is a list of objects with `file_name` and `label`
  (a `file_name` may carry its extension); any other file is Emotion-LLaMA-style text, one sample per
  line `name <frames> label` (whitespace-separated, frames an integer; blank lines skipped).
- LLaMA-Factory sharegpt (`read_sharegpt`): a JSON list (or `.jsonl`) of records with `messages`
  (`role`/`content`) or `conversations` (`from`/`value`, `human`/`gpt`), `<video>` / `<audio>` tags in
  the text and `videos` / `audios` lists; ms-swift (`read_swift_jsonl`): JSONL records with `messages`
  (`role`/`content`) and `videos` / `audios`. For both, tag counts must equal the list lengths, a
  sample has at most one video and one audio (no audio = use the video's own track), media paths are
  relative to `media_root` (default: the annotation file's folder). The label comes from the record
  field `label_field` when given, otherwise it is the label-set word mentioned last (whole word,
  case-insensitive) in the last assistant message; an answer naming no label is an error, a record
  without an assistant message is unlabelled. The explanation is that answer, or "" when the answer
  is just the label. The id comes from `id_field` (default `id`), else the first media file's stem.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_mer.data.paths import resolve_inside
from mllm_mer.data.schema import MER2023_LABELS, SUBSETS, Sample

MEDIA_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi")
"""Video extensions tried, in order, when an annotation names a clip without one."""

MER2023_SPLITS: tuple[str, ...] = ("train", "test1", "test2", "test3")
"""MER2023 label files `<split>-label.csv`."""

DFEW_LABELS: tuple[str, ...] = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
"""DFEW label names; the CSV's label id k (1..7) is DFEW_LABELS[k - 1]."""

_OPENSET_SPLIT = re.compile(r"['\",]")


# ----------------------------------------------------------------------------------------------------------
# shared helpers


def parse_openset(text: str) -> list[str]:
    """Parse an open-vocabulary label string the way MERTools' `string_to_list` does.

    One leading "[" and one trailing "]" are removed and the rest is split on every `'`, `"` and `,`;
    pieces are stripped and empty ones dropped. So "['happy', 'excited']" and "[happy, excited]" both give
    ["happy", "excited"], and "['happy, excited']" gives the same (MERTools splits inside quotes too).
    `ast.literal_eval` (never `eval`) only guards against well-formed literals of the wrong shape.

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


def _csv_rows(path: Path, columns: Sequence[str | tuple[str, ...]]) -> Iterator[tuple[int, dict[str, str]]]:
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


def _find_media(
    root: Path, rel_stems: str | Sequence[str], *, what: str, extensions: Sequence[str] = MEDIA_EXTENSIONS
) -> Path:
    """Find the first existing `<root>/<stem><ext>` over stems, then extensions (all must stay inside root).

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


def _media_file(root: Path, rel: str, *, what: str) -> Path:
    """Resolve an explicit media path inside `root` and check that the file exists."""
    path = resolve_inside(root, rel, what=what)
    if not path.is_file():
        raise ValueError(f"{what}: media file {rel!r} not found (looked at {str(path)!r})")
    return path


def _label(raw: str, labels: Sequence[str], *, what: str) -> str:
    """Normalise a label cell and check it is in `labels`."""
    label = raw.strip().lower()
    if label not in labels:
        raise ValueError(f"{what}: label {raw!r} not in label set {list(labels)}")
    return label


def sample_name(raw: str, *, what: str) -> str:
    """A sample name cell, stripped; the rule every reader here (and `eval/tasks.py`) applies to ids.

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


class _Ids:
    """Tracks sample ids of one read and reports a duplicate with both locations."""

    def __init__(self) -> None:
        self._where: dict[str, str] = {}

    def add(self, sample_id: str, where: str) -> None:
        if sample_id in self._where:
            raise ValueError(
                f"{where}: duplicate sample id {sample_id!r} (first at {self._where[sample_id]})"
            )
        self._where[sample_id] = where


def named_csv_rows(
    path: str | Path, columns: Sequence[str | tuple[str, ...]]
) -> Iterator[tuple[str, str, dict[str, str]]]:
    """Validated rows of an annotation CSV whose first required column names the sample; media untouched.

    The row rules shared by the readers here and the evaluation references (`eval/tasks.py`): the header
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
    ids = _Ids()
    for line, row in _csv_rows(path, columns):
        where = f"{path}, line {line}"
        name = sample_name(row[key], what=where)
        ids.add(name, where)
        yield where, name, row


# ----------------------------------------------------------------------------------------------------------
# MER2023, DFEW, EMER, OV


def read_mer2023(root: str | Path, split: str) -> list[Sample]:
    """Read one MER2023 split.

    Args:
        root: dataset root holding `<split>-label.csv` and the `<split>/` video folder.
        split: one of `MER2023_SPLITS`.
    Returns:
        Samples in file order, labels from `MER2023_LABELS` ("" when `discrete` is empty).
    Raises:
        ValueError: unknown split, or a bad row (see module docstring).
    """
    if split not in MER2023_SPLITS:
        raise ValueError(f"MER2023 split {split!r} unknown; valid: {list(MER2023_SPLITS)}")
    root = Path(root)
    samples = []
    for where, name, label in mer2023_label_rows(root / f"{split}-label.csv"):
        video = _find_media(root, f"{split}/{name}", what=f"{where} (video of {name!r})")
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
    ids = _Ids()
    for line, row in _csv_rows(path, ["name", "discrete"]):
        where = f"{path}, line {line}"
        name = sample_name(row["name"], what=where)
        label = _label(row["discrete"], MER2023_LABELS, what=where) if row["discrete"].strip() else ""
        ids.add(name, where)
        yield where, name, label


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
        ValueError: bad split/fold, or a bad row (see module docstring).
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
        video = _find_media(root, stems, what=f"{where} (video of {name!r})")
        samples.append(Sample(id=sample_id, video=video, label=label))
    return samples


def dfew_label_rows(path: str | Path) -> Iterator[tuple[str, str, str, str]]:
    """Validated rows of a DFEW split CSV (`video_name,label`, label ids 1..7); media are not touched.

    Yields:
        (where, video name, sample id (numeric names zero-padded to 5 digits), label name).
    Raises:
        ValueError: a missing column, a bad label id or a duplicate id (naming the file and line).
    """
    ids = _Ids()
    for line, row in _csv_rows(Path(path), ["video_name", "label"]):
        where = f"{path}, line {line}"
        name = sample_name(row["video_name"], what=where)
        raw = row["label"].strip()
        if not (raw.isdigit() and 1 <= int(raw) <= len(DFEW_LABELS)):
            raise ValueError(f"{where}: label {row['label']!r} is not an integer in 1..{len(DFEW_LABELS)}")
        sample_id = name.zfill(5) if name.isdigit() else name
        ids.add(sample_id, where)
        yield where, name, sample_id, DFEW_LABELS[int(raw) - 1]


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
        ValueError: on a bad row (see module docstring).
    """
    path, root = Path(csv_path), Path(media_root)
    ids, samples = _Ids(), []
    for line, row in _csv_rows(path, [("names", "name"), "emotions", "subtitles", "reasons"]):
        where = f"{path}, line {line}"
        name = sample_name(row["names"], what=where)
        label = _label(row["emotions"], labels, what=where)
        ids.add(name, where)
        video = _find_media(root, name, what=f"{where} (video of {name!r})")
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
        ValueError: unknown language or a bad row (see module docstring).
    """
    if language not in ("english", "chinese"):
        raise ValueError(f"EMER v2 language {language!r} unknown; valid: ['english', 'chinese']")
    path, root = Path(csv_path), Path(media_root)
    samples = []
    for where, name, row in named_csv_rows(path, [("name", "names"), "chinese", "english"]):
        video = _find_media(root, name, what=f"{where} (video of {name!r})")
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
        ValueError: on a bad row or an unparseable list (see `parse_openset`).
    """
    path, root = Path(csv_path), Path(media_root)
    ids, samples = _Ids(), []
    for line, row in _csv_rows(path, [("name", "names"), "openset"]):
        where = f"{path}, line {line}"
        name = sample_name(row["name"], what=where)
        try:
            words = parse_openset(row["openset"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        ids.add(name, where)
        video = _find_media(root, name, what=f"{where} (video of {name!r})")
        samples.append(Sample(id=name, video=video, label=", ".join(words)))
    return samples


# ----------------------------------------------------------------------------------------------------------
# CA-MER


@dataclass(frozen=True)
class CAMERLayout:
    """Where CA-MER annotation and media files are, relative to the dataset root.

    Attributes:
        annotation: annotation file per subset, `{subset}` is filled in. `.json` = list of objects with
            `file_name` and `label`; any other suffix = text lines `name <frames> label`.
        media: media path without extension, `{subset}` and `{name}` are filled in.
        extensions: extensions tried for `media`, in order.
    """

    annotation: str = "{subset}.json"
    media: str = "{subset}/{name}"
    extensions: tuple[str, ...] = MEDIA_EXTENSIONS

    def __post_init__(self) -> None:
        if "{subset}" not in self.annotation:
            raise ValueError(f"CAMERLayout.annotation={self.annotation!r} must contain '{{subset}}'")
        if "{name}" not in self.media:
            raise ValueError(f"CAMERLayout.media={self.media!r} must contain '{{name}}'")
        if not self.extensions:
            raise ValueError("CAMERLayout.extensions must not be empty")
        for field_name, fields in (("annotation", {"subset": "s"}), ("media", {"subset": "s", "name": "n"})):
            pattern = getattr(self, field_name)
            try:
                pattern.format(**fields)
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"CAMERLayout.{field_name}={pattern!r} is not a valid pattern ({err!r}); "
                    f"allowed fields: {sorted(fields)}"
                ) from None


def _camer_entries(path: Path) -> Iterator[tuple[str, str, str]]:
    """Yield (where, name, raw label) from one CA-MER annotation file (JSON list or text lines)."""
    if not path.is_file():
        raise ValueError(f"{path}: annotation file not found")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        for i, item in enumerate(data, start=1):
            where = f"{path}, record {i}"
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("file_name"), str)
                or not isinstance(item.get("label"), str)
            ):
                raise ValueError(
                    f"{where}: expected an object with string 'file_name' and 'label', got {item!r}"
                )
            yield where, item["file_name"], item["label"]
        return
    for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_no}"
        parts = line.split()
        if len(parts) != 3 or not parts[1].isdigit():
            raise ValueError(
                f"{where}: expected 'name <frames> label' (3 fields, integer frames), got {line!r}"
            )
        yield where, parts[0], parts[2]


def read_camer(
    root: str | Path,
    subsets: Sequence[str] = SUBSETS,
    *,
    layout: CAMERLayout | None = None,
    labels: Sequence[str] = MER2023_LABELS,
) -> list[Sample]:
    """Read CA-MER conflict subsets; each sample's `subset` is set.

    Args:
        root: dataset root.
        subsets: which subsets to read (members of `SUBSETS`), in this order.
        layout: annotation / media layout (default `CAMERLayout()`).
        labels: label set.
    Returns:
        Samples, subset by subset in file order. Ids are the file names without extension and must be
        unique across the subsets read.
    Raises:
        ValueError: unknown subset or a bad entry (see module docstring).
    """
    layout = layout or CAMERLayout()
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise ValueError(f"CA-MER subsets {unknown} unknown; valid: {list(SUBSETS)}")
    root = Path(root)
    ids, samples = _Ids(), []
    for subset in subsets:
        path = resolve_inside(
            root, layout.annotation.format(subset=subset), what=f"CA-MER {subset} annotation"
        )
        for where, file_name, raw_label in _camer_entries(path):
            file_name = sample_name(file_name, what=where)
            stem, ext = file_name, ""
            for candidate in layout.extensions:
                if file_name.lower().endswith(candidate.lower()):
                    stem, ext = file_name[: -len(candidate)], file_name[-len(candidate) :]
                    break
            label = _label(raw_label, labels, what=where)
            sample_id = Path(stem).name
            ids.add(sample_id, where)
            rel = layout.media.format(subset=subset, name=stem)
            what = f"{where} (media of {file_name!r})"
            video = (
                _media_file(root, rel + ext, what=what)
                if ext
                else _find_media(root, rel, what=what, extensions=layout.extensions)
            )
            samples.append(Sample(id=sample_id, video=video, label=label, subset=subset))
    return samples


# ----------------------------------------------------------------------------------------------------------
# LLaMA-Factory sharegpt / ms-swift chat files

_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def _load_records(path: Path) -> list[tuple[str, Any]]:
    """Records of a JSON list (`.json`) or JSON-lines file (other suffixes), each with its location."""
    if not path.is_file():
        raise ValueError(f"{path}: annotation file not found")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return [(f"{path}, record {i}", rec) for i, rec in enumerate(data, start=1)]
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}, line {line_no}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {line_no}: invalid JSON ({err.msg})") from None
    return records


def _messages(rec: dict[str, Any], where: str, *, allow_conversations: bool) -> list[tuple[str, str]]:
    """(role, text) pairs of a record; roles normalised to user / assistant / system / other."""
    if isinstance(rec.get("messages"), list):
        raw, role_key, text_key = rec["messages"], "role", "content"
    elif allow_conversations and isinstance(rec.get("conversations"), list):
        raw, role_key, text_key = rec["conversations"], "from", "value"
    else:
        keys = "'messages' or 'conversations'" if allow_conversations else "'messages'"
        raise ValueError(f"{where}: expected a list under {keys}")
    out = []
    for j, msg in enumerate(raw, start=1):
        if (
            not isinstance(msg, dict)
            or not isinstance(msg.get(role_key), str)
            or not isinstance(msg.get(text_key), str)
        ):
            raise ValueError(
                f"{where}: message {j} must be an object with string {role_key!r} and {text_key!r}"
            )
        out.append((_ROLE_ALIASES.get(msg[role_key], "other"), msg[text_key]))
    if not out:
        raise ValueError(f"{where}: no messages")
    return out


def _media_list(rec: dict[str, Any], key: str, where: str) -> list[str]:
    """The `videos` / `audios` list of a record ([] when absent)."""
    value = rec.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {key!r} must be a list of path strings, got {value!r}")
    return value


def label_from_answer(answer: str, labels: Sequence[str]) -> str | None:
    """The label-set word mentioned last in `answer` (whole word, case-insensitive), or None.

    Args:
        answer: assistant text, e.g. "The voice is calm but the face looks happy. Emotion: happy".
        labels: the label set.
    Returns:
        The label (as spelled in `labels`), or None when no label word occurs.
    """
    best: tuple[int, int, str] | None = None
    for label in labels:
        for match in re.finditer(rf"(?<![\w-]){re.escape(label)}(?![\w-])", answer, flags=re.IGNORECASE):
            key = (match.start(), match.end(), label)
            if best is None or key[:2] > best[:2]:
                best = key
    return None if best is None else best[2]


def _chat_sample(
    rec: Any,
    where: str,
    *,
    media_root: Path,
    labels: Sequence[str],
    label_field: str | None,
    id_field: str,
    allow_conversations: bool,
) -> Sample:
    """Map one chat record to a Sample (see module docstring for the rules)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    messages = _messages(rec, where, allow_conversations=allow_conversations)
    videos, audios = _media_list(rec, "videos", where), _media_list(rec, "audios", where)
    for tag, items in (("<video>", videos), ("<audio>", audios)):
        n_tags = sum(text.count(tag) for _, text in messages)
        if n_tags != len(items):
            raise ValueError(f"{where}: {n_tags} {tag} tag(s) in the messages but {len(items)} path(s)")
    if len(videos) > 1 or len(audios) > 1:
        raise ValueError(
            f"{where}: {len(videos)} videos and {len(audios)} audios; a sample has at most one of each"
        )
    if not videos and not audios:
        raise ValueError(f"{where}: no video and no audio; a MER sample needs media")
    video = _media_file(media_root, videos[0], what=f"{where} (video)") if videos else None
    audio = _media_file(media_root, audios[0], what=f"{where} (audio)") if audios else None

    answers = [text for role, text in messages if role == "assistant"]
    answer = answers[-1].strip() if answers else ""
    if label_field is not None:
        if label_field not in rec or not isinstance(rec[label_field], str):
            raise ValueError(f"{where}: label field {label_field!r} missing or not a string")
        label = _label(rec[label_field], labels, what=where)
    elif answer:
        found = label_from_answer(answer, labels)
        if found is None:
            raise ValueError(
                f"{where}: the assistant answer names no label from {list(labels)}: {answer[:80]!r}"
            )
        label = found
    else:
        label = ""
    explanation = "" if answer.strip(" .!\n\t").lower() == label.lower() else answer

    if id_field in rec:
        if not isinstance(rec[id_field], str | int) or not str(rec[id_field]).strip():
            raise ValueError(f"{where}: id field {id_field!r} must be a non-empty string or integer")
        sample_id = str(rec[id_field]).strip()
    else:
        media = video if video is not None else audio
        assert media is not None  # checked above: at least one of them
        sample_id = media.stem
    return Sample(id=sample_id, video=video, audio=audio, label=label, explanation=explanation)


def _read_chat(
    path: str | Path,
    *,
    media_root: str | Path | None,
    labels: Sequence[str],
    label_field: str | None,
    id_field: str,
    allow_conversations: bool,
) -> list[Sample]:
    """Shared body of `read_sharegpt` and `read_swift_jsonl`."""
    path = Path(path)
    root = Path(media_root) if media_root is not None else path.parent
    ids, samples = _Ids(), []
    for where, rec in _load_records(path):
        sample = _chat_sample(
            rec,
            where,
            media_root=root,
            labels=labels,
            label_field=label_field,
            id_field=id_field,
            allow_conversations=allow_conversations,
        )
        ids.add(sample.id, where)
        samples.append(sample)
    return samples


def read_sharegpt(
    path: str | Path,
    *,
    media_root: str | Path | None = None,
    labels: Sequence[str] = MER2023_LABELS,
    label_field: str | None = None,
    id_field: str = "id",
) -> list[Sample]:
    """Read a LLaMA-Factory sharegpt dataset (`.json` list or `.jsonl`).

    Args:
        path: the dataset file.
        media_root: folder the `videos` / `audios` paths are relative to (default: the file's folder);
            paths must stay inside it.
        labels: label set.
        label_field: record key holding the label; None parses it from the last assistant answer.
        id_field: record key holding the sample id (fallback: the first media file's stem).
    Returns:
        Samples in file order.
    Raises:
        ValueError: on a bad record (see module docstring).
    """
    return _read_chat(
        path,
        media_root=media_root,
        labels=labels,
        label_field=label_field,
        id_field=id_field,
        allow_conversations=True,
    )


def read_swift_jsonl(
    path: str | Path,
    *,
    media_root: str | Path | None = None,
    labels: Sequence[str] = MER2023_LABELS,
    label_field: str | None = None,
    id_field: str = "id",
) -> list[Sample]:
    """Read an ms-swift messages JSONL dataset (`messages` with role/content, `videos` / `audios`).

    Args:
        path: the JSONL file (a `.json` list is accepted too).
        media_root: folder the media paths are relative to (default: the file's folder).
        labels: label set.
        label_field: record key holding the label; None parses it from the last assistant answer.
        id_field: record key holding the sample id (fallback: the first media file's stem).
    Returns:
        Samples in file order.
    Raises:
        ValueError: on a bad record (see module docstring).
    """
    return _read_chat(
        path,
        media_root=media_root,
        labels=labels,
        label_field=label_field,
        id_field=id_field,
        allow_conversations=False,
    )
