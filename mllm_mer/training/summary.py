"""The end of a training run: dev metrics beside chance and the best evaluation, curves, and what to run next.

During the run `append_dev_row` keeps every dev evaluation in `<run>/dev_log.jsonl` (beside the training
losses of `train_log.jsonl`). At the end `write_summary` (main process) draws `<run>/curves.png`
(`write_curves`: training loss, dev accuracy and weighted F1, per-subset dev accuracy, per step) and returns
the text the script prints (`format_summary`): a table of the final dev metrics per subset next to the chance
level (always answering the most frequent dev label) and the best dev accuracy seen during the run with its
step, the run directory, and the next commands (`next_commands`: generate, evaluate, export) with the run's
paths filled in. `sample_explanations` (behind `train.summary_explanations`, 0 = off) generates answers for a
few dev clips and prints them beside the clips' true cues: worth switching on once the backbone can speak.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.integrations import deepspeed as hf_deepspeed

from mllm_mer.config import RunConfig
from mllm_mer.data.schema import Sample
from mllm_mer.generation import generate_rows, load_for_inference

DEV_LOG = "dev_log.jsonl"
"""Every dev evaluation of a run, one JSON row per evaluation: step, accuracy, weighted_f1, loss, per_subset."""
TRAIN_LOG = "train_log.jsonl"
CURVES = "curves.png"
TEXT_WIDTH = 160
"""Generated explanations longer than this are cut (with "...") in the printed summary."""


def append_dev_row(run_dir: str | Path, step: int, metrics: dict[str, Any]) -> None:
    """Append one dev evaluation (`training.evaluate.evaluate`'s metrics at optimizer step `step`) to
    `<run_dir>/dev_log.jsonl`."""
    row = {
        "step": step,
        "accuracy": metrics["accuracy"],
        "weighted_f1": metrics["weighted_f1"],
        "loss": metrics.get("loss"),
        "per_subset": {k: v["accuracy"] for k, v in metrics.get("per_subset", {}).items()},
    }
    with (Path(run_dir) / DEV_LOG).open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a `train_log.jsonl` / `dev_log.jsonl` by step; when a resumed run logged a step again,
    its last row wins. A missing file gives []; a line that is not JSON (a run killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def chance_levels(samples: Sequence[Sample]) -> dict[str, float]:
    """Accuracy of always answering the most frequent label: `{"all": ..., subset: ...}` over `samples`."""
    def majority(labels: list[str]) -> float:
        return Counter(labels).most_common(1)[0][1] / len(labels) if labels else 0.0

    out = {"all": majority([s.label for s in samples])}
    for subset in dict.fromkeys(s.subset for s in samples if s.subset is not None):
        out[subset] = majority([s.label for s in samples if s.subset == subset])
    return out


def best_dev(history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The dev evaluation with the highest accuracy (the earliest on ties), or None without evaluations."""
    if not history:
        return None
    return max(history, key=lambda r: (r["accuracy"], -r["step"]))


def write_curves(run_dir: str | Path) -> Path | None:
    """Draw `<run_dir>/curves.png` from `train_log.jsonl` and `dev_log.jsonl`: training loss, dev accuracy and
    weighted F1, per-subset dev accuracy, against the optimizer step. None when neither log has a row.

    Uses matplotlib's object API with the Agg canvas (no pyplot, so no global backend or figure state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    train, dev = read_log(run_dir / TRAIN_LOG), read_log(run_dir / DEV_LOG)
    if not train and not dev:
        return None
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, dev_ax, sub_ax = fig.subplots(1, 3)
    if train:
        steps = [r["step"] for r in train]
        loss_ax.plot(steps, [r["loss"] for r in train], label="loss")
        for part in ("lm_loss", "cls_loss"):
            if all(part in r for r in train):
                loss_ax.plot(steps, [r[part] for r in train], label=part, alpha=0.7)
        loss_ax.legend(fontsize=8)
    else:
        loss_ax.text(0.5, 0.5, "no rows logged\n(one every train.log_every steps)", ha="center", va="center",
                     transform=loss_ax.transAxes)
    loss_ax.set(title="training loss", xlabel="step")
    if dev:
        steps = [r["step"] for r in dev]
        dev_ax.plot(steps, [r["accuracy"] for r in dev], marker="o", label="accuracy")
        dev_ax.plot(steps, [r["weighted_f1"] for r in dev], marker="s", label="weighted F1")
        dev_ax.legend(fontsize=8)
        for subset in dict.fromkeys(k for r in dev for k in r.get("per_subset", {})):
            pts = [(r["step"], r["per_subset"][subset]) for r in dev if subset in r.get("per_subset", {})]
            sub_ax.plot(*zip(*pts, strict=True), marker="o", label=subset)
        if any(r.get("per_subset") for r in dev):
            sub_ax.legend(fontsize=8)
    dev_ax.set(title="dev", xlabel="step", ylim=(0, 1.02))
    sub_ax.set(title="dev accuracy per subset", xlabel="step", ylim=(0, 1.02))
    out = run_dir / CURVES
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)
    return out


def shell_path(path: str | Path) -> str:
    """`path` for a command line: relative to the working directory when inside it, else absolute; quoted."""
    p = Path(path).absolute()
    try:
        shown = str(p.relative_to(Path.cwd()))
    except ValueError:
        shown = str(p)
    return shlex.quote(shown)


def free_path(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... the first that does not exist yet (export refuses an existing folder)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def next_commands(cfg: RunConfig, scripts_dir: str | Path, python: str | None = None) -> list[tuple[str, str]]:
    """(what, command) pairs to run after training, with the run's paths filled in: generate on the test split
    (dev when there is none) with the prompt the run was trained on (`data.prompt`: a run trained to answer with
    a label is not pointed at the explain prompt), evaluate those predictions (our JSONL data: the `synthetic`
    task, which scores any sample JSONL with subsets and cues), export the run.

    Args:
        cfg: the run's config (`train.output_dir`, `data.test` / `data.dev`, `data.format`, `data.prompt`).
        scripts_dir: the repository's `scripts/` folder.
        python: the interpreter to show (default: this one, relative to the working directory when inside it).
    """
    py = python or shell_path(sys.executable)
    scripts = Path(scripts_dir)
    run = Path(cfg.train.output_dir)
    split = "test" if cfg.data.test and Path(cfg.data.test).is_file() else "dev"
    data = cfg.data.test if split == "test" else cfg.data.dev
    preds = run / f"preds_{split}.jsonl"
    cmds = [("generate", f"{py} {shell_path(scripts / 'generate.py')} --run {shell_path(run)} --data "
             f"{shell_path(data)} --prompt {cfg.data.prompt} --output {shell_path(preds)}")]
    if cfg.data.format == "mer_jsonl":
        cmds.append(("evaluate", f"{py} {shell_path(scripts / 'evaluate.py')} synthetic --run {shell_path(run)} "
                     f"--predictions {shell_path(preds)} --references {shell_path(data)} "
                     f"--output {shell_path(run / f'eval_{split}.json')}"))
    export = free_path(run / "export")
    cmds.append(("export", f"{py} {shell_path(scripts / 'export.py')} --run {shell_path(run)} "
                 f"--out {shell_path(export)}"))
    return cmds


def format_summary(
    cfg: RunConfig,
    final: dict[str, Any],
    dev_samples: Sequence[Sample],
    history: Sequence[dict[str, Any]],
    commands: Sequence[tuple[str, str]],
    curves: Path | None,
) -> str:
    """The printed end-of-run summary (see the module docstring).

    Args:
        cfg: the run's config.
        final: what `final_metrics.json` holds (`{"dev": metrics, "step", ...}`).
        dev_samples: the dev samples the metrics were computed on (chance levels).
        history: the run's dev evaluations (`read_log` of `dev_log.jsonl`).
        commands: `next_commands`' pairs.
        curves: the written `curves.png`, if any.
    """
    cache = f"on ({shell_path(cfg.data.feature_cache_dir)})" if cfg.data.feature_cache else "off"
    lines = [f"run {shell_path(cfg.train.output_dir)} finished at step {final['step']}; frozen-encoder cache {cache}"]
    if final.get("stopped_early"):
        lines.append("  stopped early by train.max_minutes; continue with train.resume_from=latest")
    dev = final.get("dev") or {}
    if dev:
        chance = chance_levels(dev_samples)
        best = best_dev(history)
        best_head = f"best (step {best['step']})" if best else "best"
        lines.append(f"  {'dev (' + str(len(dev_samples)) + ' clips)':<24}{'final':>8}{best_head:>18}{'chance':>9}")
        rows = [("accuracy", dev["accuracy"], best["accuracy"] if best else None, chance["all"]),
                ("weighted F1", dev["weighted_f1"], best["weighted_f1"] if best else None, None)]
        for subset, m in dev.get("per_subset", {}).items():
            b = best.get("per_subset", {}).get(subset) if best else None
            rows.append((f"  {subset}", m["accuracy"], b, chance.get(subset)))

        def cell(v: float | None, width: int) -> str:
            return f"{v:>{width}.3f}" if v is not None else f"{'-':>{width}}"

        lines += [f"  {name:<24}{cell(f, 8)}{cell(b, 18)}{cell(c, 9)}" for name, f, b, c in rows]
        lines.append("  chance: always answering the most frequent dev label; final weights are the last step's")
    if curves is not None:
        lines.append(f"curves: {shell_path(curves)}")
    lines.append("next:")
    lines += [f"  {what:<9} {cmd}" for what, cmd in commands]
    return "\n".join(lines)


def write_summary(cfg: RunConfig, final: dict[str, Any], dev_samples: Sequence[Sample], scripts_dir: str | Path) -> str:
    """Draw `curves.png` and return the summary text, followed by `sample_explanations` when
    `train.summary_explanations` > 0 (main process, after the run's weights are saved)."""
    run_dir = Path(cfg.train.output_dir)
    curves = write_curves(run_dir)
    text = format_summary(cfg, final, dev_samples, read_log(run_dir / DEV_LOG), next_commands(cfg, scripts_dir),
                          curves)
    if not (cfg.train.summary_explanations and dev_samples):
        return text
    if hf_deepspeed.is_deepspeed_zero3_enabled():
        # loading a whole model on the main process would partition it with collectives the other ranks
        # never join (a deadlock): ZeRO-3 runs point to the generate command instead
        return text + "\nexplanations: skipped under DeepSpeed ZeRO-3 (weights partitioned across ranks); run `generate` above"
    return text + "\n" + sample_explanations(cfg, dev_samples, cfg.train.summary_explanations)


# ------------------------------------------------------------------------------ sample explanations (hook)
def spread_by_subset(samples: Sequence[Sample], n: int) -> list[Sample]:
    """Up to `n` samples taking the first of each subset in turn (consistent, video_aligned, ... in order of
    first appearance), so a few explanations show the conflict clips too; file order within a subset."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.subset or "", []).append(s)
    out: list[Sample] = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        out += [g[i] for g in groups.values() if i < len(g)]
    return out[:n]


def sample_explanations(cfg: RunConfig, samples: Sequence[Sample], n: int) -> str:
    """Generate answers (`generate.*` settings, the run's prompt) for `n` of `samples` (`spread_by_subset`) with
    the finished run in `train.output_dir` and format each beside the clip's true label and cues.

    Meant for a backbone that can speak (e.g. the testbed's stage-0 backbone); `train.summary_explanations`
    switches it on. Loads the run from disk (`generation.load_for_inference`), so call it after the weights
    are saved, on the main process."""
    chosen = spread_by_subset(samples, n)
    if not chosen:
        return ""
    model = load_for_inference(run_dir=cfg.train.output_dir, cfg=cfg)
    lines = [f"explanations of {len(chosen)} dev clip(s) (prompt {cfg.generate.prompt}):"]
    for sample, row in zip(chosen, generate_rows(model, chosen, progress=False), strict=True):
        cues = ", ".join(f"{k}={v}" for k, v in sample.cues.items()) or "none recorded"
        text = " ".join(row["text"].split())
        text = text if len(text) <= TEXT_WIDTH else text[: TEXT_WIDTH - 3] + "..."
        lines.append(f"  {sample.id} [{sample.subset or '-'}] true {sample.label} (cues: {cues}) -> "
                     f"answered {row['label']}")
        lines.append(f"    \"{text}\"")
    return "\n".join(lines)
