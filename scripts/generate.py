"""Generate emotion explanations / labels for a dataset with a trained run or a base model.

    python scripts/generate.py --run runs/tiny_cpu --data .cache/mllm_mer/synthetic/test.jsonl \
        --prompt explain --output runs/tiny_cpu/preds_test.jsonl
    python scripts/generate.py --model PATH_TO_QWEN_OMNI --data test.jsonl --prompt label --output zs.jsonl
    python scripts/generate.py --run RUN --data D --prompt ov --output ov.jsonl data.fps=2
    python scripts/generate.py --run RUN --data D --prompt label --output ar.jsonl ar.enabled=true ar.strength=0.5

Each output row: id, prompt, prompt_sha256, text, label (parsed), labels_ov (ov prompt), probs (runs with
heads). `<output>.meta.json` records the backbone, prompt hash and decoding settings. Trailing
`key.path=value` arguments override the run's saved config (e.g. data.cache_dir=..., or `ar.*` to apply
attention reallocation while generating; see README "AR").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from mllm_mer.config import ConfigError, parse_overrides
from mllm_mer.data.jsonl import DataError
from mllm_mer.data.media import MediaError
from mllm_mer.data.sources import read_samples
from mllm_mer.generation import (
    GenerationOptions,
    generate_rows,
    generation_record,
    load_for_inference,
    load_run_config,
)
from mllm_mer.labels import LABEL_MODES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="finished run directory (config.yaml, adapter/, heads.safetensors)")
    src.add_argument("--model", help="base Qwen2.5-Omni checkpoint for zero-shot generation")
    p.add_argument("--data", required=True, help="sample JSONL")
    p.add_argument("--prompt", default="explain", help="template name in prompts/ (explain, label, ov)")
    p.add_argument("--output", required=True, help="predictions JSONL to write")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--label-mode", choices=LABEL_MODES, default="strict")
    p.add_argument("overrides", nargs="*", help="key.path=value applied to the run's config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        cfg = load_run_config(args.run, overrides) if args.run else None
        if args.model and overrides:
            from mllm_mer.config import config_from_dict

            cfg = config_from_dict({"model": {"path": args.model}, "data": {"train": "-"}, **overrides})
        options = GenerationOptions(args.max_new_tokens, args.do_sample, args.temperature, args.top_p,
                                    args.label_mode, args.batch_size)
        data_cfg = cfg.data if cfg else None
        samples = read_samples(
            args.data, data_cfg.format if data_cfg else "mer_jsonl",
            data_cfg.labels if data_cfg else _default_labels(),
            label_field=data_cfg.label_field if data_cfg else None, require_label=False,
        )
        model = load_for_inference(run_dir=args.run, model_path=args.model, cfg=cfg)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w") as fh:
            for row in generate_rows(model, samples, args.prompt, options):
                fh.write(json.dumps(row) + "\n")
        os.replace(tmp, out)
        meta = generation_record(model, args.prompt, options) | {"data": str(args.data), "run": args.run}
        out.with_name(out.name + ".meta.json").write_text(json.dumps(meta, indent=2))
        print(f"wrote {len(samples)} predictions to {out} ({asdict(options)})")
    except (ConfigError, DataError, MediaError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _default_labels() -> tuple[str, ...]:
    from mllm_mer.data.schema import MER2023_LABELS

    return MER2023_LABELS


if __name__ == "__main__":
    sys.exit(main())
