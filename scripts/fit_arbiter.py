"""Fit DCR's ADA arbiter (LinUCB over fused/text/audio/video) on held-out predictions of a finished run.

    python scripts/fit_arbiter.py --run runs/dcr --data .cache/mllm_mer/synthetic/dev.jsonl
    python scripts/fit_arbiter.py --run runs/dcr --data dev.jsonl dcr.arbiter.alpha=1.0 \\
        dcr.arbiter.feedback=full
    python scripts/fit_arbiter.py --run runs/dcr --data dev.jsonl --search   # choose the settings on DATA

The run must be trained with `dcr.enabled=true`. DATA must be held out: it is refused when it is the run's
`data.train` file (same path or same file) or shares any sample id with it. The script predicts every path's
class probabilities on DATA (`predict_rows`) and, with `dcr.arbiter.reward=answer` (default), each arm's answer
(generated from that arm's modalities alone: three more prediction passes), fits the arbiter from those and
the labels alone (`mllm_mer.fusion.dcr.ada.fit_arbiter`) and writes `<run>/arbiter.json`; from then on
`predict_rows` / `scripts/generate.py` add the "arbiter" path and each row's chosen `arm`, and answer a clip
routed to a unimodal arm from that modality (`dcr.arbiter.answer=arm`). It prints the arm choices and the
always-fuse / best-single / oracle baselines on DATA with the arbiter CROSS-FITTED: DATA is split into
`dcr.arbiter.folds` seeded folds and each fold is scored by an arbiter fitted on the other folds only, so
no sample is scored by an arbiter that saw its label (`crossfit` in the saved `fit` record).
With `--search` the arbiter's settings are first chosen on DATA (`mllm_mer.fusion.dcr.ada.search_arbiter`, ours):
every combination of `SEARCH_GRID` (state, feedback, calibration weight, fusion margin; 24 settings, the
conflict ablation's grid) is scored by the same cross-fitting, the best routed-answer accuracy wins (ties keep
the earlier, plainer setting), and the arbiter is fitted with it; arbiter.json keeps the chosen settings and
every setting's score (`fit.search`). The cross-fitted accuracy printed for the chosen setting is then
optimistic (it won among 24 on the same folds): judge it on another split.
Trailing `key.path=value` arguments are deep-merged into the run's saved config (`dcr.arbiter.alpha=1` keeps the
other `dcr.arbiter.*` keys; `data.cache_dir`, ...); `--print-config` prints the resolved config and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path

from mllm_mer.config import ConfigError, dump_config, load_run_config
from mllm_mer.data.jsonl import DataError
from mllm_mer.data.media import MediaError
from mllm_mer.data.sources import read_samples
from mllm_mer.fusion.dcr.ada import (
    ARBITER_FILE,
    ARMS,
    SEARCH_GRID,
    answer_inputs,
    arbiter_inputs,
    check_held_out,
    crossfit_accuracy,
    fit_arbiter,
    reliability_inputs,
    save_arbiter,
    search_arbiter,
)
from mllm_mer.fusion.dcr.report import format_report, fuse_or_drop_report
from mllm_mer.generation import answers_per_arm, load_for_inference, predict_rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run", required=True, type=Path, help="finished run directory trained with dcr.enabled=true"
    )
    p.add_argument("--data", required=True, type=Path, help="held-out labelled samples (e.g. the dev split)")
    p.add_argument("--batch-size", type=int, default=16, help="prediction batch size")
    p.add_argument("--search", action="store_true",
                   help="choose the dcr.arbiter settings on DATA by cross-fitted accuracy (SEARCH_GRID) first")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key.path=value deep-merged into the run's saved config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.run, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        if not cfg.dcr.enabled:
            raise ValueError(
                f"{args.run} was trained without dcr.enabled=true: it has no unimodal paths to arbitrate"
            )
        labels = list(cfg.data.labels)
        samples = read_samples(args.data, cfg.data.format, labels, label_field=cfg.data.label_field,
                               media_root=cfg.data.media_root)
        if not cfg.data.train or not Path(cfg.data.train).is_file():
            raise FileNotFoundError(
                f"the run's training data {cfg.data.train!r} (data.train) is not readable, so {args.data} "
                "cannot be checked to be held out; pass data.train=PATH to point at it"
            )
        train = read_samples(cfg.data.train, cfg.data.format, labels, label_field=cfg.data.label_field,
                             media_root=cfg.data.media_root)
        check_held_out(args.data, [s.id for s in samples], cfg.data.train, [s.id for s in train])
        model = load_for_inference(run_dir=args.run, cfg=cfg)
        model.arbiter = None  # predictions of the paths themselves (a previous arbiter is replaced)
        rows = list(predict_rows(model, samples, batch_size=args.batch_size, progress=True))
        probs, y = arbiter_inputs(rows, {s.id: s.label for s in samples}, labels)
        answers = None
        if cfg.dcr.arbiter.reward == "answer":  # each arm judged by the answer from its modalities
            answers = answer_inputs(answers_per_arm(model, samples, args.batch_size, rows), labels)
        reliability = reliability_inputs(rows)  # predicted path reliabilities (state "reliable")
        config, search = cfg.dcr.arbiter, None
        if args.search:
            config, records = search_arbiter(probs, y, config, answers, reliability)
            search = {"settings": records, "chosen": {k: getattr(config, k) for k in SEARCH_GRID}}
        arbiter = fit_arbiter(probs, y, config, answers, reliability)
        # answer_accuracy (with answers): what the arbiter decides, the answer from the chosen arm's modalities
        arms, scores = crossfit_accuracy(probs, y, config, answers, reliability)
        crossfit = {"folds": config.folds, **scores}
        sha = hashlib.sha256(args.data.read_bytes()).hexdigest()
        arbiter = dataclasses.replace(
            arbiter,
            labels=tuple(labels),
            fit_info={"data": str(args.data), "data_sha256": sha, **arbiter.fit_info, "crossfit": crossfit,
                      **({"search": search} if search is not None else {})},
        )
        out = save_arbiter(arbiter, args.run / ARBITER_FILE)
    except (ConfigError, DataError, MediaError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    preds = {a: [labels[i] for i in probs[a].argmax(-1).tolist()] for a in ARMS}
    report = fuse_or_drop_report([s.label for s in samples], preds, [s.subset for s in samples], arms)
    answer = f", answer from the chosen arm {crossfit['answer_accuracy']:.3f}" if "answer_accuracy" in crossfit else ""
    if search is not None:
        tried = len(search["settings"])
        print(f"searched {tried} dcr.arbiter settings by cross-fitted accuracy on {args.data}; chosen: "
              + " ".join(f"{k}={v}" for k, v in search["chosen"].items())
              + f" (its accuracy below won among {tried} on these folds: optimistic)")
    print(f"fit on {len(samples)} held-out samples of {args.data}; arbiter column cross-fitted over "
          f"{crossfit['folds']} folds (accuracy {crossfit['accuracy']:.3f}{answer}):")
    print(format_report(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
