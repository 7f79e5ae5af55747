"""Export a finished run for other tools: a merged checkpoint where possible, and a model card.

Plain LoRA on the language model (and any unfrozen base weights) merges into the thinker's weights, so
the result is an ordinary thinker directory of the base model's family
(`Qwen2_5OmniThinkerForConditionalGeneration` or `Qwen3OmniMoeThinkerForConditionalGeneration`) with its processor,
loadable by plain `transformers` (and hence by vLLM). Parts that cannot be expressed as base weights
stay mllm_mer files in `<out>/mllm_mer/`: the classification heads (always), MoSE experts (token-routed),
the ADA arbiter, DnR parts and the AR inference hooks. When the run uses MoSE (no plain LoRA to
merge), the export holds a reference to the base model plus the adapter files instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

import mllm_mer
from mllm_mer import model as mer_model
from mllm_mer.backbone.families import QWEN2_5_OMNI, family_named
from mllm_mer.config import RUN_CONFIG, RunConfig, load_run_config
from mllm_mer.fusion.dcr.ada import ARBITER_FILE
from mllm_mer.generation import load_for_inference
from mllm_mer.model import BASE_FILE, HEADS_FILE, active_methods
from mllm_mer.run_files import RunFileError, check_run_files, file_problem

RUN_FILES = (HEADS_FILE, BASE_FILE, ARBITER_FILE, "gate_stats.json", RUN_CONFIG, "run_info.json",
             "final_metrics.json")
"""Run-directory files an export keeps (when present) besides the methods' own files (`Method.files`)."""


def methods_on(cfg: RunConfig) -> dict[str, bool]:
    """Which methods a run used, by name (every method of `mllm_mer.model.METHODS`)."""
    return {m.name: m.enabled(cfg) for m in mer_model.METHODS}


def needs_mllm_mer(cfg: RunConfig) -> list[str]:
    """Parts that need mllm_mer at inference (not expressible as base-model weights): the heads and each active
    method's `export_note`."""
    notes = [m.export_note(cfg) for m in active_methods(cfg)]
    return ["classification heads (heads.safetensors)", *(n for n in notes if n)]


def export_run(run_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the export of `run_dir` into `out_dir` (atomically) and return a summary dict.

    Raises:
        FileNotFoundError: `run_dir` is not a finished run.
        FileExistsError: `out_dir` exists.
        RunFileError: a file of the run is missing or damaged (`mllm_mer.run_files`).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / HEADS_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run (no {HEADS_FILE})")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new output directory")
    cfg = load_run_config(run_dir)
    check_run_files(run_dir, cfg, also=RUN_FILES)  # every file copied or read below, before anything loads
    methods = methods_on(cfg)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    active = active_methods(cfg)
    mergers = [m for m in active if m.merges_into_base]
    model = load_for_inference(run_dir=run_dir, cfg=cfg)
    if mergers:  # e.g. plain LoRA: the "default" adapter merges into the weights
        merged = model.mer.backbone
        for m in mergers:
            merged = m.merge(merged)
        merged.save_pretrained(tmp)
        mode = "merged"
    else:
        model.backbone.model.config.save_pretrained(tmp / "mllm_mer" / "base_config")
        (tmp / "base_model.json").write_text(json.dumps({"base_model": cfg.model.path}, indent=2))
        mode = "adapter"
    model.backbone.processor.save_pretrained(tmp)
    extra = tmp / "mllm_mer"
    extra.mkdir(exist_ok=True)
    for name in (*RUN_FILES, *(f for m in active for f in m.files(cfg))):
        source, target = run_dir / name, extra / name
        if source.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for folder in {Path(f).parts[0] for m in active for f in m.files(cfg) if len(Path(f).parts) > 1}:
        if (run_dir / folder).is_dir():  # e.g. the whole peft adapter folder (configs + every adapter)
            shutil.copytree(run_dir / folder, extra / folder, dirs_exist_ok=True)
    summary = {
        "mode": mode,
        "base_model": cfg.model.path,
        "base_family": model.backbone.family.name,
        "methods": methods,
        "needs_mllm_mer": needs_mllm_mer(cfg),
        "version": mllm_mer.__version__,
    }
    (extra / "export.json").write_text(json.dumps(summary, indent=2))
    (tmp / "README.md").write_text(model_card(run_dir, cfg, summary))
    os.replace(tmp, out_dir)
    return summary


def _metrics_table(run_dir: Path) -> list[str]:
    lines = []
    sources = [run_dir / "final_metrics.json", *sorted(run_dir.glob("eval*.json"))]
    for path in sources:
        if not path.is_file():
            continue
        problem = file_problem(path)
        if problem:
            raise RunFileError(f"{path} is damaged ({problem}): write it again (scripts/evaluate.py) or move it "
                               "out of the run directory")
        data = json.loads(path.read_text())
        block = data.get("dev") if "dev" in data else data.get("metrics")
        if not isinstance(block, dict) or "accuracy" not in block:
            continue
        name = "dev (training run)" if path.name == "final_metrics.json" else f"{data.get('task', path.stem)}"
        lines.append(f"| {name} | all | {block['accuracy']:.4f} | {block.get('weighted_f1', float('nan')):.4f} |")
        for subset, m in block.get("per_subset", {}).items():
            lines.append(f"| {name} | {subset} | {m['accuracy']:.4f} | {m.get('weighted_f1', float('nan')):.4f} |")
    if not lines:
        return ["No metrics were recorded in the run directory."]
    return ["| benchmark | subset | accuracy | weighted F1 |", "|---|---|---|---|", *lines]


def model_card(run_dir: str | Path, cfg: RunConfig, summary: dict) -> str:
    """A model card (markdown) generated from the run directory."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run_info.json").read_text()) if (run_dir / "run_info.json").is_file() else {}
    prompts = info.get("prompts", {})
    methods = ", ".join(k for k, v in summary["methods"].items() if v) or "none"
    family = family_named(summary.get("base_family", QWEN2_5_OMNI.name)).display
    data_lines = [f"- {split}: `{getattr(cfg.data, split)}` (format {cfg.data.format})"
                  for split in ("train", "dev", "test") if getattr(cfg.data, split)]
    synthetic = cfg.data.synthetic_dir is not None or any(
        (Path(getattr(cfg.data, s)).parent / "manifest.json").is_file() for s in ("train",) if cfg.data.train
    )
    licences = [
        "- Code: mllm_mer, Apache-2.0.",
        "- Base model: see the licence of the base checkpoint "
        f"(`{cfg.model.path}`; {family} is released under its own licence).",
        "- Training data: the synthetic conflict set generated by mllm_mer (no third-party content)."
        if synthetic else "- Training data: check the licence of each dataset listed above (MER datasets are "
        "licence-bound research data).",
        "- Open-vocabulary scores, if reported, use the MERTools emotion-wheel tables (CC BY-NC 4.0).",
    ]
    lines = [
        f"# MER model exported from `{run_dir.name}`",
        "",
        f"Exported by mllm_mer {summary['version']} (git {info.get('git_sha') or 'unknown'}), seed "
        f"{info.get('seed', cfg.train.seed)}.",
        "",
        "## Base model",
        f"- `{cfg.model.path}` ({family} thinker), dtype {cfg.model.dtype}",
        f"- Export mode: **{summary['mode']}** "
        + ("(LoRA merged into the weights; load with plain `transformers`)." if summary["mode"] == "merged"
           else "(base model reference + adapter files in `mllm_mer/adapter`)."),
        "",
        "## Methods",
        f"- On: {methods}",
        "- Needs mllm_mer at inference: " + "; ".join(summary["needs_mllm_mer"]),
        "",
        "## Data",
        *data_lines,
        f"- Labels: {', '.join(cfg.data.labels)}",
        "",
        "## Prompts",
        *[f"- `{name}`: sha256 `{digest}`" for name, digest in prompts.items()],
        "",
        "## Metrics",
        *_metrics_table(run_dir),
        "",
        "## Configuration",
        "```yaml",
        yaml.safe_dump(yaml.safe_load((run_dir / RUN_CONFIG).read_text()), sort_keys=False).rstrip(),
        "```",
        "",
        "## Licences",
        *licences,
        "",
    ]
    return "\n".join(lines)
