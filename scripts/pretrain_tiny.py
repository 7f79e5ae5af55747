"""Stage-0 of the conflict testbed: train the whole tiny thinker into an audio-biased backbone.

    python scripts/pretrain_tiny.py [--root .cache/mllm_mer] [--seed 0] [key.path=value ...]

Builds the stage-0 synthetic set (`mllm_mer.testbed.STAGE0_DATA`: clean audio, weak video), trains all
weights with `configs/pretrain_tiny.yaml` through the same loop as scripts/finetune.py, and exports the
thinker + processor to `<root>/stage0-<key>/backbone` (a normal checkpoint directory for
`load_backbone`). Skips everything when that directory already exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune import train  # noqa: E402  (the one training loop)

from mllm_mer.config import load_config  # noqa: E402
from mllm_mer.data.synthetic import ensure_synthetic_set  # noqa: E402
from mllm_mer.testbed import PRETRAIN_CONFIG, STAGE0_DATA, export_backbone, stage0_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".cache/mllm_mer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    out = stage0_dir(args.root, args.seed)
    if (out / "backbone" / "config.json").is_file():
        print(f"stage-0 backbone already built: {out / 'backbone'}")
        return 0
    start = time.time()
    data = ensure_synthetic_set(Path(args.root) / "stage0_data", STAGE0_DATA, workers=min(2, os.cpu_count() or 1))
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)
    cfg = load_config(PRETRAIN_CONFIG, [
        f"model.path={Path(args.root) / 'tiny-qwen2_5-omni'}", f"data.train={data / 'train.jsonl'}",
        f"data.dev={data / 'dev.jsonl'}", f"train.output_dir={run}", f"train.seed={args.seed}",
        f"data.cache_dir={Path(args.root) / 'decoded'}", *args.overrides,
    ])
    final = train(cfg)
    export_backbone(run, out / "backbone")
    info = {"seconds": round(time.time() - start, 1), "dev": final["dev"], "data": STAGE0_DATA.to_dict()}
    (out / "stage0.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    print(f"stage-0 backbone: {out / 'backbone'} ({info['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
