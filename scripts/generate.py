"""Generate emotion explanations / labels for a dataset with a trained run or a base model.

    python scripts/generate.py --run runs/tiny_cpu --data .cache/mllm_mer/synthetic/test.jsonl \
        --prompt explain --output runs/tiny_cpu/preds_test.jsonl
    python scripts/generate.py --model PATH_TO_QWEN_OMNI --data test.jsonl --prompt label --output zs.jsonl
    python scripts/generate.py --run RUN --data D --prompt ov --output ov.jsonl data.fps=2
    python scripts/generate.py --run RUN --data D --prompt label --output ar.jsonl ar.enabled=true ar.strength=0.5

Each output row: id, prompt, prompt_sha256, text, label (parsed), labels_ov (ov prompt), probs (runs with
heads). `<output>.meta.json` records the backbone, prompt hash and decoding settings. The config is the run's
saved one (zero-shot: the defaults) with trailing `key.path=value` overrides deep-merged (e.g.
data.cache_dir=..., `generate.*`, or `ar.*` to apply attention reallocation while generating; see README
"AR"); the flags are shorthands for `generate.*` keys; `--print-config` prints the resolved config. With
--run and no --prompt (nor generate.prompt=...), the prompt is the one the run was trained on (`data.prompt`),
as scripts/bias_report.py does: a run trained to answer with a label is not asked to explain.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from mllm_mer.config import (
    ConfigError,
    config_to_dict,
    dump_config,
    load_config,
    load_run_config,
    parse_overrides,
    shorthand_overrides,
)
from mllm_mer.data.jsonl import DataError
from mllm_mer.data.media import MediaError
from mllm_mer.data.sources import read_samples
from mllm_mer.generation import generate_rows, generation_record, load_for_inference
from mllm_mer.labels import LABEL_MODES
from mllm_mer.logs import run_output

SHORTHANDS = ("prompt", "batch_size", "max_new_tokens", "do_sample", "temperature", "top_p", "label_mode")
"""Flags that are shorthands for the `generate.*` key of the same name (an explicit dotted override wins)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="finished run directory (config.yaml, its methods' weights, heads.safetensors)")
    src.add_argument("--model", help="base Qwen2.5-Omni / Qwen3-Omni checkpoint for zero-shot generation")
    p.add_argument("--data", help="sample JSONL (required unless --print-config)")
    p.add_argument("--output", help="predictions JSONL to write (required unless --print-config)")
    p.add_argument("--prompt", help="generate.prompt: template name in prompts/ (explain, label, ov); default "
                   "with --run: the run's data.prompt")
    p.add_argument("--batch-size", type=int, help="generate.batch_size")
    p.add_argument("--max-new-tokens", type=int, help="generate.max_new_tokens")
    p.add_argument("--do-sample", action="store_true", help="generate.do_sample: sample instead of greedy")
    p.add_argument("--temperature", type=float, help="generate.temperature")
    p.add_argument("--top-p", type=float, help="generate.top_p")
    p.add_argument("--label-mode", choices=LABEL_MODES, help="generate.label_mode")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--verbose", action="store_true", help="every library's log and warning (mllm_mer.logs)")
    p.add_argument("overrides", nargs="*", help="key.path=value deep-merged into the config")
    args = p.parse_args(argv)
    if not args.print_config and (args.data is None or args.output is None):
        p.error("--data and --output are required (unless --print-config)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        flags = shorthand_overrides({f"generate.{k}": getattr(args, k) for k in SHORTHANDS})
        if args.run:
            cfg = load_run_config(args.run, [*flags, *args.overrides])
            if "prompt" not in parse_overrides([*flags, *args.overrides]).get("generate", {}):
                # neither --prompt nor generate.prompt=...: the prompt the run was trained on
                cfg = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, prompt=cfg.data.prompt))
        else:  # zero-shot: the defaults with the base model
            cfg = load_config(None, [f"model.path={args.model}", *flags, *args.overrides])
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        samples = read_samples(args.data, cfg.data.format, cfg.data.labels, label_field=cfg.data.label_field,
                               require_label=False, media_root=cfg.data.media_root)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with run_output(args.verbose):  # what other libraries may print; restored on exit
            model = load_for_inference(run_dir=args.run, model_path=args.model, cfg=cfg)
            with tmp.open("w") as fh:
                for row in generate_rows(model, samples):
                    fh.write(json.dumps(row) + "\n")
        os.replace(tmp, out)
        meta = generation_record(model) | {"data": str(args.data), "run": args.run}
        out.with_name(out.name + ".meta.json").write_text(json.dumps(meta, indent=2))
        print(f"wrote {len(samples)} predictions to {out} ({config_to_dict(cfg.generate)})")
    except (ConfigError, DataError, MediaError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
