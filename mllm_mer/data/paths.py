"""Path safety shared by every dataset reader: media paths must stay inside the dataset root.

A row in an annotation file can name `../../etc/passwd`, an absolute path, or a symlink that points
out of the dataset. `resolve_inside` resolves all of these (symlinks included) and refuses any path
whose real location is not under the real location of the root.
"""

from __future__ import annotations

from pathlib import Path


def resolve_inside(root: Path, rel: str, *, what: str) -> Path:
    """Resolve `rel` against `root` and check that the result stays inside `root`.

    Symlinks are resolved on both sides, so a link inside the root that points outside it is refused,
    and an absolute `rel` is accepted only when it lies under the root. The path need not exist.

    Args:
        root: dataset root directory.
        rel: path from an annotation file, relative to `root` (or absolute).
        what: what the path is, for the error message (e.g. "video of row 3 in train.csv").
    Returns:
        The resolved absolute path.
    Raises:
        ValueError: if `rel` is empty, contains a NUL byte, or escapes the dataset root.
    """
    if not rel or not rel.strip():
        raise ValueError(f"{what}: empty path")
    if "\x00" in rel:
        raise ValueError(f"{what}: path {rel!r} contains a NUL byte")
    real_root = Path(root).expanduser().resolve()
    candidate = (real_root / rel).resolve()
    if candidate != real_root and not candidate.is_relative_to(real_root):
        raise ValueError(
            f"{what}: path {rel!r} escapes dataset root {str(real_root)!r} (resolves to {str(candidate)!r}); "
            "media paths must point inside the root"
        )
    if candidate == real_root:
        raise ValueError(f"{what}: path {rel!r} is the dataset root itself, not a file inside it")
    return candidate
