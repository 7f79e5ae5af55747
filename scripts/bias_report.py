"""Modality-bias report of a backbone, and of a fine-tuned run on it, on a balanced synthetic test set.

    python scripts/bias_report.py --backbone .cache/mllm_mer/stage0-KEY/backbone \\
        --data .cache/mllm_mer/testbed_data/test.jsonl --output reports/stage0_bias.json
    python scripts/bias_report.py --backbone DIR --data TEST_JSONL --output report.json --run runs/plain_lora

Always: the per-layer share of attention mass on text / audio / video tokens at the generating position
(the last prompt position), for the bare backbone and, with `--run`, for the fine-tuned model; overall
and per conflict subset. With `--run` (accuracy needs the run's classification heads):

- per-subset accuracy, weighted F1 and the audio-dominance index (on audio/video conflicts, the share of
  cue-following predictions that follow the audio cue) of the fused head;
- unimodal recognition: the same heads with only the audio, or only the video, in the prompt
  (`predict_rows(use_video=False)` / `use_audio=False`); accuracy against the label and against that
  modality's own cue.

Writes OUT.json and OUT.png (audio and video share per layer, one line per model) and prints a markdown
summary. `--run` without `--backbone` uses the run's own `model.path`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mllm_mer.attention.stats import MODALITIES, collect_attention_shares, plot_shares
from mllm_mer.config import ConfigError, dump_config, load_config, load_run_config, shorthand_overrides
from mllm_mer.data.jsonl import DataError, read_jsonl
from mllm_mer.data.media import MediaError
from mllm_mer.data.schema import MER2023_LABELS, SUBSETS, Sample
from mllm_mer.generation import InferenceModel, inference_loader, load_for_inference, predict_rows
from mllm_mer.metrics import audio_dominance, classification_metrics
from mllm_mer.prompts import load_prompt
from mllm_mer.run_files import check_run_files

UNIMODAL = {"audio_only": {"use_video": False}, "video_only": {"use_audio": False}}
"""`predict_rows` flags of the unimodal conditions (the removed modality is absent from the prompt)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backbone", help="backbone checkpoint directory (default with --run: the run's model.path)"
    )
    p.add_argument(
        "--data", required=True, help="test JSONL (a balanced synthetic set with subsets and cues)"
    )
    p.add_argument("--output", required=True, help="report JSON; the PNG goes beside it")
    p.add_argument(
        "--run", help="finished run directory: adds accuracy, audio dominance, unimodal recognition"
    )
    p.add_argument("--prompt", help="prompt template (default: the run's data.prompt, else 'label')")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key.path=value deep-merged into the run's saved config")
    args = p.parse_args(argv)
    if not args.backbone and not args.run:
        p.error("give --backbone (attention shares) and/or --run (adds accuracy)")
    return args


def shares_report(per_sample: torch.Tensor, samples: Sequence[Sample]) -> dict:
    """{"overall": [[text, audio, video] per layer], "per_subset": {...}} from (N, L, 3) shares."""
    out = {"overall": per_sample.mean(0).tolist(), "per_subset": {}}
    for subset in SUBSETS:
        idx = [i for i, s in enumerate(samples) if s.subset == subset]
        if idx:
            out["per_subset"][subset] = per_sample[idx].mean(0).tolist()
    return out


def accuracy_report(model: InferenceModel, samples: Sequence[Sample], prompt: str, batch_size: int) -> dict:
    """Fused-head metrics on the full prompt, the audio-dominance index, and unimodal recognition."""
    labels = list(model.cfg.data.labels)
    y_true = [s.label for s in samples]
    subsets = [s.subset for s in samples]
    audio_cues = [s.cues.get("audio") for s in samples]
    video_cues = [s.cues.get("video") for s in samples]
    preds = [r["label"] for r in predict_rows(model, samples, batch_size=batch_size, prompt_name=prompt)]
    m = classification_metrics(y_true, preds, labels, subsets)
    out = {
        "fused": {"accuracy": m["accuracy"], "weighted_f1": m["weighted_f1"], "per_subset": m["per_subset"]},
        "audio_dominance": audio_dominance(preds, audio_cues, video_cues),
        "unimodal": {},
    }
    for name, flags in UNIMODAL.items():
        rows = predict_rows(model, samples, batch_size=batch_size, prompt_name=prompt, **flags)
        uni = [r["label"] for r in rows]
        cues = audio_cues if name == "audio_only" else video_cues
        known = [i for i, c in enumerate(cues) if c in labels]
        um = classification_metrics(y_true, uni, labels, subsets)
        out["unimodal"][name] = {
            "accuracy": um["accuracy"],
            "per_subset": {k: {"accuracy": v["accuracy"]} for k, v in um["per_subset"].items()},
            "cue_accuracy": (sum(uni[i] == cues[i] for i in known) / len(known)) if known else None,
        }
    return out


def markdown(report: dict) -> str:
    """The printed summary: attention shares per layer, then (with --run) accuracy per condition."""
    names = list(report["attention"])
    lines = [
        f"## Modality bias: {report['data']} (n={report['n']})",
        "",
        "Attention share at the generating position (audio / video):",
        "",
        "| layer | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    overall = [report["attention"][n]["overall"] for n in names]
    for layer, rows in enumerate(zip(*overall, strict=True)):
        lines.append(f"| {layer} | " + " | ".join(f"{r[1]:.3f} / {r[2]:.3f}" for r in rows) + " |")
    acc = report.get("accuracy")
    if acc:
        lines += [
            "",
            "| condition | accuracy | " + " | ".join(SUBSETS) + " |",
            "|---|---|" + "---|" * len(SUBSETS),
        ]
        for name, r in [("fused (audio+video)", acc["fused"]), *acc["unimodal"].items()]:
            per = [f"{r['per_subset'][s]['accuracy']:.3f}" if s in r["per_subset"] else "-" for s in SUBSETS]
            lines.append(f"| {name} | {r['accuracy']:.3f} | " + " | ".join(per) + " |")
        dom = acc["audio_dominance"]
        index = "n/a" if dom["index"] is None else f"{dom['index']:.3f}"
        cue = ", ".join(
            f"{k} {v['cue_accuracy']:.3f}"
            for k, v in acc["unimodal"].items()
            if v["cue_accuracy"] is not None
        )
        lines += [
            "",
            f"Audio-dominance index: {index} (audio {dom['audio_follow']} / video {dom['video_follow']} of "
            f"{dom['n_conflict']} conflicts); weighted F1 {acc['fused']['weighted_f1']:.3f}; unimodal "
            f"accuracy against the modality's own cue: {cue}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = [*shorthand_overrides({"model.path": args.backbone}), *args.overrides]
        run_cfg = load_run_config(args.run, overrides) if args.run else None
        if args.print_config:
            print(dump_config(run_cfg or load_config(None, overrides)), end="")
            return 0
        if args.run:
            check_run_files(args.run, run_cfg)  # before the long pass over the bare backbone
        backbone = args.backbone or run_cfg.model.path
        prompt = args.prompt or (run_cfg.data.prompt if run_cfg else "label")
        labels = run_cfg.data.labels if run_cfg else MER2023_LABELS
        samples = read_jsonl(args.data, labels)
        report: dict = {
            "backbone": str(backbone),
            "run": args.run,
            "data": str(args.data),
            "n": len(samples),
            "prompt": prompt,
            "modalities": list(MODALITIES),
            "subset_counts": {s: sum(x.subset == s for x in samples) for s in SUBSETS},
            "attention": {},
        }
        bare = load_for_inference(model_path=str(backbone), cfg=run_cfg)  # run's data settings, if any
        loader = inference_loader(bare, samples, load_prompt(prompt), args.batch_size)
        shares = {"backbone": collect_attention_shares(bare.backbone.model, loader)}
        del bare
        if args.run:
            model = load_for_inference(run_dir=args.run, cfg=run_cfg)
            loader = inference_loader(model, samples, load_prompt(prompt), args.batch_size)
            shares["fine-tuned"] = collect_attention_shares(model.mer, loader)
            report["accuracy"] = accuracy_report(model, samples, prompt, args.batch_size)
        report["attention"] = {name: shares_report(s, samples) for name, s in shares.items()}
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        png = plot_shares(
            {n: s.mean(0) for n, s in shares.items()},
            out.with_suffix(".png"),
            title="attention share at the generating position",
        )
        report["plot"] = png.name
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(markdown(report))
        print(f"\nwrote {out} and {png}")
    except (ConfigError, DataError, MediaError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
