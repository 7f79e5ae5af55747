"""Score predictions on one benchmark; write OUT.json, OUT.md and PNG plots next to it.

    python scripts/evaluate.py synthetic --predictions runs/tiny/pred_test.jsonl \\
        --references .cache/mllm_mer/synthetic/test.jsonl --output runs/tiny/eval_test.json
    python scripts/evaluate.py ca-mer --predictions pred.jsonl --references /data/CA-MER --output camer.json
    python scripts/evaluate.py mer2023 --predictions pred.csv --references /data/MER2023/test1-label.csv \\
        --output mer.json --labels-mode emotion_llama --reparse
    python scripts/evaluate.py dfew --predictions pred.jsonl \\
        --references /data/DFEW/EmoLabel_DataSplit/test\\(single-labeled\\)/set_1.csv --output dfew1.json
    python scripts/evaluate.py emer-ov --predictions pred_ov.csv --references ov-gt.csv --output ov.json
    python scripts/evaluate.py emer-judge --predictions pred_explain.jsonl --references gt-eng.csv \\
        --output judge.json --judge openai --judge-model gpt-4o-mini --judge-cache .cache/judge
    python scripts/evaluate.py emer-judge ... --judge embedding     # offline PROXY, never an EMER score

Tasks: synthetic, ca-mer, emer-ov, emer-judge, mer2023, dfew (see eval/tasks/ for the reference
formats). Predictions: our generation JSONL (`id`, `label`, `text`, optional `labels_ov`, `probs`) or a
CSV `name,label` / `name,discrete` / `name,openset`.

Options are the `eval.*` keys of a config (`--run RUN`: the run's saved config; `--config FILE`; else the
defaults) with trailing `key.path=value` overrides; the flags are shorthands for them; `--print-config` prints
the resolved config. Missing predictions: a reference id without a prediction is an error; --allow-missing
scores it as wrong instead and records a warning in OUT.json. Prediction ids outside the references, duplicate ids
and unparseable rows are always errors. Input errors print `error: ...` on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # eval/ is not installed

from eval.report import summary_line, write_report  # noqa: E402
from eval.tasks import TASKS, EvalOptions, run_task  # noqa: E402
from mllm_mer.config import (  # noqa: E402
    EMER_LANGUAGES,
    JUDGES,
    ConfigError,
    RunConfig,
    dump_config,
    load_config,
    load_run_config,
    shorthand_overrides,
)
from mllm_mer.data.readers import CAMERLayout  # noqa: E402
from mllm_mer.labels import LABEL_MODES  # noqa: E402

SHORTHANDS = ("labels_mode", "reparse", "allow_missing", "camer_annotation", "camer_media", "judge", "judge_url",
              "judge_model", "judge_cache", "judge_device", "emer_language")
"""Flags that are shorthands for the `eval.*` key of the same name (an explicit dotted override wins)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=list(TASKS))
    parser.add_argument("--predictions", type=Path, help="prediction JSONL or CSV")
    parser.add_argument("--references", type=Path, help="reference file (CA-MER: root folder)")
    parser.add_argument("--output", type=Path, help="OUT.json; OUT.md and OUT.*.png go beside it")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--run", help="take the options (eval.*) from this run's saved config")
    src.add_argument("--config", help="take the options (eval.*) from this run YAML")
    parser.add_argument("--labels-mode", choices=LABEL_MODES, help="eval.labels_mode: how `text` is parsed "
                        "when a row has no `label`")
    parser.add_argument("--reparse", action="store_true", help="eval.reparse: parse `text` even when `label` "
                        "is present")
    parser.add_argument("--allow-missing", action="store_true", help="eval.allow_missing: score missing "
                        "predictions as wrong")
    parser.add_argument("--camer-annotation", help="eval.camer_annotation: CA-MER annotation pattern")
    parser.add_argument("--camer-media", help="eval.camer_media: CA-MER media pattern (no extension)")
    parser.add_argument("--judge", choices=JUDGES, help="eval.judge: emer-judge backend (embedding = offline "
                        "PROXY)")
    parser.add_argument("--judge-url", help="eval.judge_url: OpenAI-compatible server root")
    parser.add_argument("--judge-model", help="eval.judge_model: openai: model name; local: model folder; "
                        "embedding: MiniLM folder")
    parser.add_argument("--judge-cache", help="eval.judge_cache: folder caching judge replies")
    parser.add_argument("--judge-device", help="eval.judge_device: torch device of local/embedding judges")
    parser.add_argument("--emer-language", choices=EMER_LANGUAGES, help="eval.emer_language: EMER v2 "
                        "reference column")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key.path=value deep-merged into the config (eval.*)")
    args = parser.parse_args(argv)
    if not args.print_config and None in (args.predictions, args.references, args.output):
        parser.error("--predictions, --references and --output are required (unless --print-config)")
    return args


def eval_options(cfg: RunConfig, args: argparse.Namespace) -> EvalOptions:
    """`EvalOptions` from the resolved `eval.*` section and the file arguments."""
    e = cfg.eval
    return EvalOptions(
        predictions=args.predictions,
        references=args.references,
        labels_mode=e.labels_mode,
        reparse=e.reparse,
        allow_missing=e.allow_missing,
        camer_layout=CAMERLayout(annotation=e.camer_annotation, media=e.camer_media),
        judge=e.judge,
        judge_url=e.judge_url,
        judge_model=e.judge_model,
        judge_cache=Path(e.judge_cache) if e.judge_cache else None,
        judge_device=e.judge_device,
        emer_language=e.emer_language,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = [*shorthand_overrides({f"eval.{k}": getattr(args, k) for k in SHORTHANDS}), *args.overrides]
        cfg = load_run_config(args.run, overrides) if args.run else load_config(args.config, overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        opts = eval_options(cfg, args)
        result = run_task(args.task, opts)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written = write_report(result, out)
    print(summary_line(result))
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {out} and {', '.join(p.name for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
