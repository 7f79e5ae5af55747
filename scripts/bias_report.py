"""Modality-bias report of a backbone, and of a fine-tuned run on it, on a balanced synthetic test set.

    python scripts/bias_report.py --backbone .cache/mllm_mer/stage0-KEY/backbone \\
        --data .cache/mllm_mer/testbed_data/test.jsonl --train .cache/mllm_mer/testbed_data/train.jsonl \\
        --output reports/stage0_bias.json
    python scripts/bias_report.py --backbone DIR --data TEST_JSONL --output report.json --run runs/plain_lora

Always: the per-layer share of attention mass on text / audio / video tokens at the generating position
(the last prompt position), for the bare backbone and, with `--run`, for the fine-tuned model; overall
and per conflict subset.

Always, for the answering model (the run with `--run`, else the bare backbone), from its greedy generated
answers (the label parsed from the generated text, `mllm_mer.labels.parse_label`; `generate.*` settings):

- `generated`: accuracy per subset and parse rate with both modalities, and `audio_dominance` (on
  audio/video conflicts, the share of cue-following answers that follow the audio cue; the counts in
  `audio_dominance_counts`);
- `unimodal.audio_only` / `unimodal.video_only`: the same answers with only the audio, or only the video,
  in the prompt; `own_cue_accuracy` against that modality's own cue on the clips whose display of it is at
  full intensity (the reference explanation calls it "strong"; all clips when the references name no
  intensity), `own_cue_accuracy_all` on every clip;
- `explanations` (`mllm_mer.explanations.explanation_quality` of the full-prompt answers):
  `parse_rate` over all clips; `video_cue_accuracy`, `audio_cue_accuracy` and the intensity accuracies on
  the consistent clips (on a conflict clip the right description of one display is the wrong label);
  every subset under `per_subset`;
- with `--train TRAIN_JSONL`, `probes` (`mllm_mer.probes`): linear probes on the frozen, modality-pooled
  hidden states of every layer, fitted on the train clips and scored once on the test clips, for
  `audio` (audio cue, from the audio tokens), `video` (video cue, from the video tokens) and `genuine`
  (which modality is genuine on conflict clips, from all slots); layer and regularisation chosen by
  cross-validation on train.

With `--run` also (accuracy of the run's classification heads, `head_label` of `predict_rows`):

- per-subset accuracy, weighted F1 and the audio-dominance index (on audio/video conflicts, the share of
  cue-following predictions that follow the audio cue) of the fused head;
- unimodal recognition: the same heads with only the audio, or only the video, in the prompt
  (`predict_rows(use_video=False)` / `use_audio=False`); accuracy against the label and against that
  modality's own cue.

`predict_rows` also generates each condition's answer; when it decodes exactly as the generated answers
above (`predict_decodes_like`: same prompt, batch size and decoding settings) those texts are reused, so
each condition is generated once.

Writes OUT.json and OUT.png (audio and video share per layer, one line per model) and prints a markdown
summary. `--run` without `--backbone` uses the run's own `model.path`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from mllm_mer.attention.stats import MODALITIES, collect_attention_shares, plot_shares
from mllm_mer.config import ConfigError, dump_config, load_config, load_run_config, shorthand_overrides
from mllm_mer.data.jsonl import DataError, read_jsonl
from mllm_mer.data.media import MediaError
from mllm_mer.data.schema import MER2023_LABELS, SUBSETS, Sample
from mllm_mer.explanations import explanation_quality, full_displays
from mllm_mer.generation import (
    InferenceModel,
    generate_rows,
    inference_loader,
    load_for_inference,
    predict_decodes_like,
    predict_rows,
)
from mllm_mer.labels import UNKNOWN_LABEL, parse_label
from mllm_mer.metrics import audio_dominance, classification_metrics, cue_accuracy
from mllm_mer.probes import pooled_hidden_states, probe_report
from mllm_mer.prompts import PromptTemplate, load_prompt
from mllm_mer.run_files import check_run_files

UNIMODAL = {"audio_only": {"use_video": False}, "video_only": {"use_audio": False}}
"""`predict_rows` flags of the unimodal conditions (the removed modality is absent from the prompt)."""
OWN_CUE = {"audio_only": "audio", "video_only": "video"}
"""The modality whose cue each unimodal condition is scored against."""
PROBE_NAMES = {"audio_cue": "audio", "video_cue": "video", "genuine": "genuine"}
"""Report names of the `mllm_mer.probes` targets."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backbone", help="backbone checkpoint directory (default with --run: the run's model.path)"
    )
    p.add_argument(
        "--data", required=True, help="test JSONL (a balanced synthetic set with subsets and cues)"
    )
    p.add_argument("--train", help="train JSONL of the same kind: fits the linear probes (skipped without it)")
    p.add_argument("--output", required=True, help="report JSON; the PNG goes beside it")
    p.add_argument(
        "--run", help="finished run directory: adds accuracy, audio dominance, unimodal recognition"
    )
    p.add_argument(
        "--prompt", help="prompt template (default: the run's data.prompt, else generate.prompt: 'explain')"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, help="generated tokens per answer (default: generate.max_new_tokens)")
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


def condition_rows(model: InferenceModel, samples: Sequence[Sample], prompt: str, batch_size: int) -> dict:
    """{"full" | "audio_only" | "video_only": the `predict_rows` rows of that condition}."""
    return {name: list(predict_rows(model, samples, batch_size=batch_size, prompt_name=prompt, **flags))
            for name, flags in {"full": {}, **UNIMODAL}.items()}


def accuracy_report(model: InferenceModel, samples: Sequence[Sample], rows: dict[str, list[dict]]) -> dict:
    """Fused-head metrics on the full prompt, the audio-dominance index, and unimodal recognition, from the
    heads' argmax (`head_label`) of each condition's `condition_rows`."""
    labels = list(model.cfg.data.labels)
    y_true = [s.label for s in samples]
    subsets = [s.subset for s in samples]
    audio_cues = [s.cues.get("audio") for s in samples]
    video_cues = [s.cues.get("video") for s in samples]
    preds = [r["head_label"] for r in rows["full"]]
    m = classification_metrics(y_true, preds, labels, subsets)
    out = {
        "fused": {"accuracy": m["accuracy"], "weighted_f1": m["weighted_f1"], "per_subset": m["per_subset"]},
        "audio_dominance": audio_dominance(preds, audio_cues, video_cues),
        "unimodal": {},
    }
    for name in UNIMODAL:
        uni = [r["head_label"] for r in rows[name]]
        cues = audio_cues if name == "audio_only" else video_cues
        known = [i for i, c in enumerate(cues) if c in labels]
        um = classification_metrics(y_true, uni, labels, subsets)
        out["unimodal"][name] = {
            "accuracy": um["accuracy"],
            "per_subset": {k: {"accuracy": v["accuracy"]} for k, v in um["per_subset"].items()},
            "cue_accuracy": (sum(uni[i] == cues[i] for i in known) / len(known)) if known else None,
        }
    return out


def generated_answers(
    model: InferenceModel, samples: Sequence[Sample], prompt: PromptTemplate, batch_size: int, max_new_tokens: int,
    *, use_video: bool = True, use_audio: bool = True, predicted: list[dict] | None = None,
) -> list[str]:
    """Greedy generated text per sample, in order (`generate_rows`), with `use_video=False` / `use_audio=False`
    removing that modality from every prompt; `predicted` (the same condition's `predict_rows` rows) is reused
    when it decoded exactly so (`predict_decodes_like`)."""
    options = replace(model.cfg.generate, prompt=prompt.name, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      do_sample=False)
    if predicted is not None and predict_decodes_like(model, prompt, batch_size, options):
        return [row["text"] for row in predicted]
    rows = generate_rows(model, samples, options, progress=False, use_video=use_video, use_audio=use_audio)
    return [row["text"] for row in rows]


def _intensity_known(samples: Sequence[Sample], modality: str, labels: Sequence[str]) -> list[bool] | None:
    """Clips whose reference explanation calls the `modality` display "strong"; None when no reference names
    an intensity (then every clip counts as full)."""
    full = full_displays(samples, modality, labels)
    return full if any(full) else None


def generated_report(
    model: InferenceModel, samples: Sequence[Sample], prompt: PromptTemplate, batch_size: int, max_new_tokens: int,
    predicted: dict[str, list[dict]] | None = None,
) -> dict:
    """The answering model's generated answers: full prompt, audio-only, video-only, and explanation quality;
    `predicted`: `condition_rows` of a run, reused where they decoded the same way."""
    predicted = predicted or {}
    labels = list(model.cfg.data.labels)
    y_true = [s.label for s in samples]
    subsets = [s.subset for s in samples]
    cues = {m: [s.cues.get(m) for s in samples] for m in ("audio", "video")}
    texts = generated_answers(model, samples, prompt, batch_size, max_new_tokens, predicted=predicted.get("full"))
    preds = [parse_label(t, labels, mode=model.cfg.generate.label_mode) for t in texts]
    m = classification_metrics(y_true, preds, labels, subsets)
    dom = audio_dominance(preds, cues["audio"], cues["video"])
    out: dict = {
        "generated": {
            "prompt": prompt.name, "max_new_tokens": max_new_tokens, "accuracy": m["accuracy"],
            "weighted_f1": m["weighted_f1"], "per_subset": m["per_subset"],
            "parse_rate": sum(p != UNKNOWN_LABEL for p in preds) / len(preds), "examples": texts[:3],
        },
        "audio_dominance": dom["index"],
        "audio_dominance_counts": dom,
        "unimodal": {},
    }
    for name, flags in UNIMODAL.items():
        uni_texts = generated_answers(model, samples, prompt, batch_size, max_new_tokens, **flags,
                                      predicted=predicted.get(name))
        uni = [parse_label(t, labels, mode=model.cfg.generate.label_mode) for t in uni_texts]
        own = OWN_CUE[name]
        um = classification_metrics(y_true, uni, labels, subsets)
        full = cue_accuracy(uni, cues[own], _intensity_known(samples, own, labels))
        out["unimodal"][name] = {
            "own_cue": own,
            "own_cue_accuracy": full["accuracy"],
            "own_cue_n": full["n"],
            "own_cue_accuracy_all": cue_accuracy(uni, cues[own])["accuracy"],
            "accuracy": um["accuracy"],
            "per_subset": {k: {"accuracy": v["accuracy"]} for k, v in um["per_subset"].items()},
            "parse_rate": sum(p != UNKNOWN_LABEL for p in uni) / len(uni),
        }
    quality = explanation_quality(texts, samples, labels)
    consistent = quality["per_subset"].get("consistent", {})
    keys = ("video_cue_accuracy", "audio_cue_accuracy", "video_intensity_accuracy", "audio_intensity_accuracy")
    out["explanations"] = {
        "parse_rate": quality["parse_rate"],
        **{k: consistent.get(k) for k in keys},
        "cue_scope": "consistent",
        "n_consistent": consistent.get("n", 0),
        "per_subset": quality["per_subset"],
        "all": {k: quality[k] for k in keys},
    }
    return out


def probes_report(
    model: InferenceModel, train: Sequence[Sample], samples: Sequence[Sample], prompt: PromptTemplate,
    batch_size: int,
) -> dict:
    """Linear probes on the answering model's frozen pooled hidden states: fitted on `train`, scored on `samples`."""
    net = model.mer if model.mer is not None else model.backbone.model
    feats = [pooled_hidden_states(net, inference_loader(model, ss, prompt, batch_size)) for ss in (train, samples)]
    raw = probe_report(feats[0], train, feats[1], samples)
    return {PROBE_NAMES[k]: v for k, v in raw.items()}


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
    if "generated" in report:
        gen, uni, expl = report["generated"], report["unimodal"], report["explanations"]
        dom = report["audio_dominance"]

        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        lines += [
            "",
            f"Generated answers ({report['answering']}, prompt {gen['prompt']}, greedy):",
            "",
            "| condition | accuracy | " + " | ".join(SUBSETS) + " | own cue (full displays) |",
            "|---|---|" + "---|" * len(SUBSETS) + "---|",
        ]
        rows = [("audio+video", gen, None), *((k, v, v["own_cue_accuracy"]) for k, v in uni.items())]
        for name, r, own in rows:
            per = [f"{r['per_subset'][s]['accuracy']:.3f}" if s in r["per_subset"] else "-" for s in SUBSETS]
            lines.append(f"| {name} | {r['accuracy']:.3f} | " + " | ".join(per) + f" | {fmt(own)} |")
        lines += [
            "",
            f"Audio dominance of the generated answers: {fmt(dom)}; parse rate {gen['parse_rate']:.3f}",
            f"Explanations: parse rate {fmt(expl['parse_rate'])}; on consistent clips video cue "
            f"{fmt(expl['video_cue_accuracy'])}, audio cue {fmt(expl['audio_cue_accuracy'])}, video intensity "
            f"{fmt(expl['video_intensity_accuracy'])}, audio intensity {fmt(expl['audio_intensity_accuracy'])}",
        ]
    probes = report.get("probes")
    if probes and "skipped" not in probes:
        lines += ["", "Linear probes on frozen features (test accuracy at the layer chosen on train; per layer):", ""]
        for name, r in probes.items():
            if "skipped" in r:
                lines.append(f"- {name}: skipped ({r['skipped']})")
            else:
                per = " ".join(f"{x:.2f}" for x in r["per_layer"])
                lines.append(f"- {name}: {r['test_accuracy']:.3f} (layer {r['selected_layer']}; per layer {per}; "
                             f"majority {r['majority_test_accuracy']:.3f})")
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
        cfg = run_cfg or load_config(None, overrides)
        prompt = args.prompt or (run_cfg.data.prompt if run_cfg else cfg.generate.prompt)
        labels = run_cfg.data.labels if run_cfg else MER2023_LABELS
        samples = read_jsonl(args.data, labels)
        train = read_jsonl(args.train, labels) if args.train else None
        report: dict = {
            "backbone": str(backbone),
            "run": args.run,
            "data": str(args.data),
            "train": args.train,
            "n": len(samples),
            "prompt": prompt,
            "modalities": list(MODALITIES),
            "subset_counts": {s: sum(x.subset == s for x in samples) for s in SUBSETS},
            "attention": {},
        }
        template = load_prompt(prompt)
        bare = load_for_inference(model_path=str(backbone), cfg=cfg)  # the run's data settings, if any
        loader = inference_loader(bare, samples, template, args.batch_size)
        shares = {"backbone": collect_attention_shares(bare.backbone.model, loader)}
        model, predicted = bare, None
        if args.run:
            del bare
            model = load_for_inference(run_dir=args.run, cfg=run_cfg)
            loader = inference_loader(model, samples, template, args.batch_size)
            shares["fine-tuned"] = collect_attention_shares(model.mer, loader)
            predicted = condition_rows(model, samples, prompt, args.batch_size)
            report["accuracy"] = accuracy_report(model, samples, predicted)
        report["answering"] = "fine-tuned" if args.run else "backbone"
        max_new = args.max_new_tokens or model.cfg.generate.max_new_tokens
        report.update(generated_report(model, samples, template, args.batch_size, max_new, predicted))
        report["probes"] = (probes_report(model, train, samples, template, args.batch_size) if train is not None
                            else {"skipped": "no --train"})
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
