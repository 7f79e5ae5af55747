"""Build a tiny random thinker checkpoint of either backbone family (offline, about a second on a CPU).

    python scripts/build_tiny.py --arch qwen2_5_omni --out .cache/mllm_mer/tiny-qwen2_5-omni
    python scripts/build_tiny.py --arch qwen3_omni --out .cache/mllm_mer/tiny-qwen3-omni
    accelerate launch scripts/finetune.py model.path=.cache/mllm_mer/tiny-qwen3-omni model.build_tiny=false

The directory is an ordinary checkpoint (config, safetensors, tokenizer, processor) that `model.path` points
at; see `mllm_mer.backbone.tiny` and `mllm_mer.backbone.tiny_qwen3` for the sizes. An existing twin of the
same spec is kept; a directory holding anything else is never overwritten (exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from mllm_mer.backbone.families import FAMILIES
from mllm_mer.backbone.tiny import ensure_tiny_thinker, tiny_spec


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, build (or find) the twin and print its directory; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=sorted(FAMILIES), default="qwen2_5_omni", help="backbone family")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same bytes)")
    args = parser.parse_args(argv)
    spec = dataclasses.replace(tiny_spec(args.arch), seed=args.seed)
    start = time.time()
    try:
        out = ensure_tiny_thinker(args.out, spec)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tiny {FAMILIES[args.arch].display} thinker at {out} ({time.time() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
