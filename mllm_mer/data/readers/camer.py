"""CA-MER: one annotation file per conflict subset (`video_aligned`, `audio_aligned`, `consistent`).

`CAMERLayout` sets where they are: `annotation` (default `"{subset}.json"`) and `media` (default
`"{subset}/{name}"`, extension added), both relative to the root, with `{subset}` and `{name}` filled
in. A `.json` annotation file is a list of objects with `file_name` and `label` (a `file_name` may carry
its extension); any other file is Emotion-LLaMA-style text, one sample per line `name <frames> label`
(whitespace-separated, frames an integer; blank lines skipped).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mllm_mer.data.paths import resolve_inside
from mllm_mer.data.readers.common import (
    MEDIA_EXTENSIONS,
    UniqueIds,
    check_label,
    find_media,
    media_file,
    sample_name,
)
from mllm_mer.data.schema import MER2023_LABELS, SUBSETS, Sample


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
        ValueError: unknown subset or a bad entry (see the module docstring).
    """
    layout = layout or CAMERLayout()
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise ValueError(f"CA-MER subsets {unknown} unknown; valid: {list(SUBSETS)}")
    root = Path(root)
    ids, samples = UniqueIds(), []
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
            label = check_label(raw_label, labels, what=where)
            sample_id = Path(stem).name
            ids.add(sample_id, where)
            rel = layout.media.format(subset=subset, name=stem)
            what = f"{where} (media of {file_name!r})"
            video = (
                media_file(root, rel + ext, what=what)
                if ext
                else find_media(root, rel, what=what, extensions=layout.extensions)
            )
            samples.append(Sample(id=sample_id, video=video, label=label, subset=subset))
    return samples
