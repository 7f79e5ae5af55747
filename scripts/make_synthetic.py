"""Build the synthetic conflict media set (mp4 clips + train/dev/test JSONL + manifest).

    python scripts/make_synthetic.py --out .cache/mllm_mer/synthetic                 # defaults: 480/96/96
    python scripts/make_synthetic.py --out /tmp/syn --seed 3 --train 60 --dev 12 --test 12
    python scripts/make_synthetic.py --out /tmp/hard --audio-noise 0.3 --video-noise 0.5 --masking-intensity 0.7
    python scripts/make_synthetic.py --out /tmp/varied --train-conflict-rate 0 --weak-display-rate 0.5

Rebuilds OUT only if its manifest's config hash differs (a non-synthetic OUT is never replaced).
See `mllm_mer.data.synthetic` for the exact noise and intensity semantics.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from mllm_mer.data.synthetic import SyntheticConfig, ensure_synthetic_set


def parse_args(argv: list[str] | None = None) -> tuple[str, SyntheticConfig, int]:
    d = SyntheticConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--train", type=int, default=d.train_size, help="train clips")
    parser.add_argument("--dev", type=int, default=d.dev_size, help="dev clips")
    parser.add_argument("--test", type=int, default=d.test_size, help="test clips")
    parser.add_argument("--audio-noise", type=float, default=d.audio_noise)
    parser.add_argument("--video-noise", type=float, default=d.video_noise)
    parser.add_argument("--text-noise", type=float, default=d.text_noise)
    parser.add_argument("--train-conflict-rate", type=float, default=d.train_conflict_rate)
    parser.add_argument("--masking-intensity", type=float, default=d.masking_intensity)
    parser.add_argument(
        "--weak-display-rate", type=float, default=d.weak_display_rate,
        help="consistent clips: per-modality probability of a clear/faint instead of a strong display",
    )
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="encoding processes (same output)"
    )
    args = parser.parse_args(argv)
    try:
        cfg = SyntheticConfig(
            seed=args.seed,
            train_size=args.train,
            dev_size=args.dev,
            test_size=args.test,
            audio_noise=args.audio_noise,
            video_noise=args.video_noise,
            text_noise=args.text_noise,
            train_conflict_rate=args.train_conflict_rate,
            masking_intensity=args.masking_intensity,
            weak_display_rate=args.weak_display_rate,
        )
    except ValueError as err:
        parser.error(str(err))
    return args.out, cfg, max(1, args.workers)


def main(argv: list[str] | None = None) -> None:
    out, cfg, workers = parse_args(argv)
    start = time.perf_counter()
    out_dir = ensure_synthetic_set(out, cfg, workers=workers)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    print(
        f"synthetic set in {out_dir} (config hash {manifest['config_hash']}, {time.perf_counter() - start:.1f} s)"
    )
    for split, counts in manifest["counts"].items():
        print(f"{split:5s} {counts['total']:5d}  subsets {counts['subset']}  labels {counts['label']}")


if __name__ == "__main__":
    main()
