"""The stage-0 emotion backbone shipped with the package: a tiny Qwen2.5-Omni thinker that perceives, explains
and trusts the voice (the conflict testbed's frozen backbone, `mllm_mer.testbed`).

`scripts/pretrain_tiny.py` makes it (about 5 CPU-minutes); the result of its default recipe and seed is
shipped in `mllm_mer/resources/stage0/` (1.6 MB of safetensors plus processor files) so that the quick start
and the testbed need no stage-0 training:

- `backbone/`: a normal checkpoint directory (`load_backbone` reads it like a 7B one);
- `stage0.json`: provenance: the recipe key it was made from (`mllm_mer.testbed.stage0_key`), the command,
  the package and library versions, CPU seconds, the final dev metrics of each phase, and the SHA-256 of
  every file of `backbone/` (checked on every install).

`install_stage0(out_dir)` copies it to `out_dir` (`model.build_tiny=true` with `model.tiny_weights=stage0`,
and `scripts/pretrain_tiny.py`'s `ensure_stage0_backbone` when the recipe key matches). The tests check that
the shipped key is the current recipe's (a changed recipe must ship a rebuilt backbone) and, in the slow
tier, rebuild it and compare.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

SHIPPED_STAGE0 = Path(__file__).resolve().parent.parent / "resources" / "stage0"
"""Folder of the shipped stage-0 backbone: `backbone/` and `stage0.json`."""
MARKER = "mllm_mer_stage0.json"
"""Written into an installed copy: the shipped provenance (an installed copy is recognised by it)."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def backbone_hashes(backbone: str | Path) -> dict[str, str]:
    """{file name: SHA-256} of every file of a backbone directory (sorted by name)."""
    return {p.name: file_sha256(p) for p in sorted(Path(backbone).iterdir()) if p.is_file()}


def shipped_stage0_info(root: str | Path = SHIPPED_STAGE0) -> dict:
    """The shipped backbone's provenance (`stage0.json`).

    Raises:
        FileNotFoundError: the package was installed without it.
    """
    path = Path(root) / "stage0.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: this installation has no shipped stage-0 backbone; build one with "
            "`python scripts/pretrain_tiny.py` and point model.path at the directory it prints"
        )
    return json.loads(path.read_text())


def install_stage0(out_dir: str | Path, root: str | Path = SHIPPED_STAGE0) -> Path:
    """Copy the shipped stage-0 backbone to `out_dir` unless that copy is already there; return `out_dir`.

    The copy is written beside `out_dir` and renamed into place, after every file's SHA-256 is checked
    against the provenance, so an interrupted or damaged install never looks finished.

    Raises:
        ValueError: `out_dir` holds something else (it is never overwritten), or a shipped file does not
            match its recorded hash.
        FileNotFoundError: no shipped backbone in this installation.
    """
    info = shipped_stage0_info(root)
    out_dir = Path(out_dir)
    marker = out_dir / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()).get("files") == info["files"]:
            return out_dir
        raise ValueError(
            f"{out_dir} holds another stage-0 backbone than the one this package ships; delete the directory "
            "or choose another model.path"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not a stage-0 backbone installed by mllm_mer; choose another "
                         "model.path")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(Path(root) / "backbone", tmp)
    got = backbone_hashes(tmp)
    if got != info["files"]:
        bad = sorted(k for k in {*got, *info["files"]} if got.get(k) != info["files"].get(k))
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"the shipped stage-0 backbone in {Path(root) / 'backbone'} is damaged: {bad} do not "
                         "match stage0.json; reinstall the package")
    (tmp / MARKER).write_text(json.dumps(info, indent=1))
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked above)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir
