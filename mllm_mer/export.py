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
from mllm_mer.backbone.families import QWEN2_5_OMNI, family_named
from mllm_mer.config import RunConfig

EXTRA_FILES = ("heads.safetensors", "mose.safetensors", "arbiter.json", "gate_stats.json", "config.yaml",
               "run_info.json", "final_metrics.json")


def methods_on(cfg: RunConfig) -> dict[str, bool]:
    """Which parts a run used (sections that do not exist in this version count as off)."""
    out = {"lora": cfg.lora.enabled}
    for name in ("mose", "ar", "dcr", "dnr"):
        section = getattr(cfg, name, None)
        out[name] = bool(getattr(section, "enabled", False))
    return out


def needs_mllm_mer(methods: dict[str, bool]) -> list[str]:
    """Parts that need mllm_mer at inference (not expressible as base-model weights)."""
    parts = ["classification heads (heads.safetensors)"]
    if methods.get("mose"):
        parts.append("MoSE modality-routed experts (mose.safetensors; routing needs token_modality)")
    if methods.get("ar"):
        parts.append("AR attention reallocation (an inference-time attention function, no weights)")
    if methods.get("dcr"):
        parts.append("DCR unimodal paths and the ADA arbiter (adapter/<path>, arbiter.json)")
    if methods.get("dnr"):
        parts.append("DnR divide-and-refine parts (in heads.safetensors)")
    return parts


def export_run(run_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the export of `run_dir` into `out_dir` (atomically) and return a summary dict.

    Raises:
        FileNotFoundError: `run_dir` is not a finished run.
        FileExistsError: `out_dir` exists.
    """
    from mllm_mer.generation import load_for_inference, load_run_config

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "heads.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run (no heads.safetensors)")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new output directory")
    cfg = load_run_config(run_dir)
    methods = methods_on(cfg)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    mergeable = cfg.lora.enabled and not methods["mose"]
    model = load_for_inference(run_dir=run_dir, cfg=cfg)
    if mergeable:
        merged = model.mer.backbone.merge_and_unload(adapter_names=["default"])
        merged.save_pretrained(tmp)
        mode = "merged"
    else:
        model.backbone.model.config.save_pretrained(tmp / "mllm_mer" / "base_config")
        (tmp / "base_model.json").write_text(json.dumps({"base_model": cfg.model.path}, indent=2))
        mode = "adapter"
    model.backbone.processor.save_pretrained(tmp)
    extra = tmp / "mllm_mer"
    extra.mkdir(exist_ok=True)
    for name in EXTRA_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, extra / name)
    if (run_dir / "adapter").is_dir():
        shutil.copytree(run_dir / "adapter", extra / "adapter")
    summary = {
        "mode": mode,
        "base_model": cfg.model.path,
        "base_family": model.backbone.family.name,
        "methods": methods,
        "needs_mllm_mer": needs_mllm_mer(methods),
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
        yaml.safe_dump(yaml.safe_load((run_dir / "config.yaml").read_text()), sort_keys=False).rstrip(),
        "```",
        "",
        "## Licences",
        *licences,
        "",
    ]
    return "\n".join(lines)
