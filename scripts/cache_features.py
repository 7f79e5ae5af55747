"""Fill the frozen-encoder cache of a run's train/dev splits ahead of training (see `mllm_mer.cache`).

    python scripts/cache_features.py                                     # configs/tiny_cpu.yaml
    python scripts/cache_features.py --config configs/tiny_cpu.yaml data.feature_cache_dir=/fast/disk/features
    accelerate launch --config_file configs/accelerate/ddp_cpu.yaml scripts/cache_features.py  # ranks share

Computes, once per sample, the audio/vision towers' outputs and the prompt layouts the run's collators
need (missing entries only: a second call reuses everything), so that `scripts/finetune.py` with
`data.feature_cache=true` starts training at once. Without this script the first finetune run fills the
cache itself, before its first epoch. Only `--config` and dotted `key.path=value` overrides are accepted;
`data.feature_cache` is switched on here. Prints one JSON line per split.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from accelerate import Accelerator

from mllm_mer.backbone import load_backbone
from mllm_mer.cache import prepare_cache
from mllm_mer.config import ConfigError, dump_config, load_config
from mllm_mer.data import loading as D

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="run YAML (default: configs/tiny_cpu.yaml)"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, [*args.overrides, "data.feature_cache=true"])
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
        logging.basicConfig(
            level=logging.INFO if accelerator.is_main_process else logging.WARNING,
            format="%(levelname)s %(message)s",
        )
        with accelerator.main_process_first():
            D.ensure_inputs(cfg)
        splits = D.read_splits(cfg)
        backbone = load_backbone(
            cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.quantization
        )
        for split, samples in splits.items():
            collator = D.base_collator(cfg, backbone, train=split == "train")
            served, collate, _, report = prepare_cache(cfg, backbone, samples, collator, D.prompt_variants(cfg),
                                                       accelerator)
            if accelerator.is_main_process:
                print(
                    json.dumps(
                        {
                            "split": split,
                            "cache": str(collate.cache.root),
                            "samples": report.samples,
                            "served": len(served),
                            "reused": report.reused,
                            "features_computed": report.features_computed,
                            "layouts_computed": report.layouts_computed,
                            "skipped": len(report.skipped),
                            "seconds": round(report.seconds, 2),
                        }
                    )
                )
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
