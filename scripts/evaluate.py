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

Tasks: synthetic, ca-mer, emer-ov, emer-judge, mer2023, dfew (see eval/tasks.py for the reference
formats). Predictions: our generation JSONL (`id`, `label`, `text`, optional `labels_ov`, `probs`) or a
CSV `name,label` / `name,discrete` / `name,openset`.

Missing predictions: a reference id without a prediction is an error; --allow-missing scores it as
wrong instead and records a warning in OUT.json. Prediction ids outside the references, duplicate ids
and unparseable rows are always errors. Input errors print `error: ...` on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from eval.report import summary_line, write_report  # noqa: E402
from eval.tasks import EMER_LANGUAGES, JUDGES, TASKS, EvalOptions, run_task  # noqa: E402
from mllm_mer.data.readers import CAMERLayout  # noqa: E402
from mllm_mer.labels import LABEL_MODES  # noqa: E402


def parse_args(argv: list[str] | None) -> tuple[str, EvalOptions, Path]:
    d = EvalOptions(predictions=Path(), references=Path())
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=list(TASKS))
    parser.add_argument("--predictions", required=True, type=Path, help="prediction JSONL or CSV")
    parser.add_argument("--references", required=True, type=Path, help="reference file (CA-MER: root folder)")
    parser.add_argument(
        "--output", required=True, type=Path, help="OUT.json; OUT.md and OUT.*.png go beside it"
    )
    parser.add_argument(
        "--labels-mode",
        choices=LABEL_MODES,
        default=d.labels_mode,
        help="how `text` is parsed when a row has no `label`",
    )
    parser.add_argument("--reparse", action="store_true", help="parse `text` even when `label` is present")
    parser.add_argument("--allow-missing", action="store_true", help="score missing predictions as wrong")
    parser.add_argument(
        "--camer-annotation", default=d.camer_layout.annotation, help="CA-MER annotation pattern"
    )
    parser.add_argument(
        "--camer-media", default=d.camer_layout.media, help="CA-MER media pattern (no extension)"
    )
    parser.add_argument("--judge", choices=JUDGES, help="emer-judge backend (embedding = offline PROXY)")
    parser.add_argument("--judge-url", default=d.judge_url, help="OpenAI-compatible server root")
    parser.add_argument(
        "--judge-model", help="openai: model name; local: model folder; embedding: MiniLM folder"
    )
    parser.add_argument("--judge-cache", type=Path, help="folder caching judge replies")
    parser.add_argument(
        "--judge-device", default=d.judge_device, help="torch device of local/embedding judges"
    )
    parser.add_argument(
        "--emer-language", choices=EMER_LANGUAGES, default=d.emer_language, help="EMER v2 reference column"
    )
    args = parser.parse_args(argv)
    try:
        layout = CAMERLayout(annotation=args.camer_annotation, media=args.camer_media)
        opts = EvalOptions(
            predictions=args.predictions,
            references=args.references,
            labels_mode=args.labels_mode,
            reparse=args.reparse,
            allow_missing=args.allow_missing,
            camer_layout=layout,
            judge=args.judge,
            judge_url=args.judge_url,
            judge_model=args.judge_model,
            judge_cache=args.judge_cache,
            judge_device=args.judge_device,
            emer_language=args.emer_language,
        )
    except ValueError as err:
        parser.error(str(err))
    return args.task, opts, args.output


def main(argv: list[str] | None = None) -> int:
    task, opts, out = parse_args(argv)
    try:
        result = run_task(task, opts)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
