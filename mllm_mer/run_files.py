"""Checks of the files a reader takes from a run directory, made before anything is loaded.

Every reader of a finished run (`mllm_mer.generation.load_for_inference`, hence `scripts/generate.py`,
`fit_arbiter.py`, `export.py`, `bias_report.py --run`) calls `check_run_files`, and resume checks its
checkpoint's files (`mllm_mer.training.checkpoint.verify_checkpoint`) with `file_problem`. The files expected
are the heads, the unfrozen base weights when a `model.freeze.*` switch is off, and each active method's own
files (`Method.files`); a safetensors file must be complete (`mllm_mer.safetensors_check`) and hold the
tensors its owner marks (`Method.param_marker`, the heads' `fusion_` prefix), a JSON file must parse. A
problem is one line naming the file, what is wrong and what to do (`RunFileError`; the scripts print it and
exit with 2).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from mllm_mer.config import RUN_CONFIG, RunConfig
from mllm_mer.model import BASE_FILE, HEAD_PREFIX, HEADS_FILE, active_methods
from mllm_mer.safetensors_check import SafetensorsError, read_header, tensor_names


class RunFileError(ValueError):
    """A file of a run directory or checkpoint is missing or damaged (one line: path, problem, what to do)."""


def file_problem(path: Path, names_ok: Callable[[str], bool] | None = None) -> str | None:
    """What is wrong with the file at `path`, or None: missing, an incomplete safetensors file (or one holding
    no tensor, or a tensor for which `names_ok` is False), a JSON file that does not parse."""
    if not path.is_file():
        return "missing"
    if path.suffix == ".safetensors":
        try:
            names = tensor_names(read_header(path))
        except (OSError, SafetensorsError) as exc:
            return str(exc)
        if not names:
            return "holds no tensor"
        unexpected = [n for n in names if names_ok is not None and not names_ok(n)]
        if unexpected:
            return f"holds tensors of something else, e.g. {unexpected[0]!r}"
    elif path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"not valid JSON ({exc})"
    return None


def expected_files(cfg: RunConfig) -> dict[str, Callable[[str], bool] | None]:
    """{file relative to the run directory: check of its tensor names (None = any)} a finished run of `cfg`
    holds: the heads, the unfrozen base weights (when a `model.freeze.*` switch is off) and every active
    method's files (`Method.files`)."""
    files: dict[str, Callable[[str], bool] | None] = {HEADS_FILE: lambda n: n.startswith(HEAD_PREFIX)}
    if not all(dataclasses.asdict(cfg.model.freeze).values()):
        files[BASE_FILE] = None
    for m in active_methods(cfg):
        marker = m.param_marker
        for name in m.files(cfg):
            files.setdefault(name, (lambda n, mark=marker: mark in n) if marker else None)
    return files


def fix_hint(run_dir: Path) -> str:
    """What to do about a damaged or missing final file of the run in `run_dir`."""
    return ("restore it from a copy, or write the run's final files again from its last checkpoint: "
            f"accelerate launch scripts/finetune.py --config {run_dir / RUN_CONFIG} train.output_dir={run_dir} "
            "train.resume_from=latest")


def check_run_files(run_dir: str | Path, cfg: RunConfig, also: Sequence[str] = ()) -> None:
    """Check every file a reader loads from the finished run `run_dir` (`expected_files(cfg)`), plus the
    files named in `also` when they exist (e.g. "arbiter.json").

    Raises:
        RunFileError: one line per damaged or missing file, joined (path, problem, what to do).
    """
    run_dir = Path(run_dir)
    problems = []
    files = expected_files(cfg)
    files.update({name: None for name in also if name not in files and (run_dir / name).exists()})
    for name, names_ok in files.items():
        problem = file_problem(run_dir / name, names_ok)
        if problem:
            problems.append(f"{run_dir / name} is {'missing' if problem == 'missing' else f'damaged ({problem})'}")
    if problems:
        raise RunFileError(f"{'; '.join(problems)}: {fix_hint(run_dir)}")
