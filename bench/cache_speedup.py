"""Training-epoch time without / with the frozen-encoder cache, measured side by side in one run.

    python bench/cache_speedup.py                                  # tiny thinker, configs/tiny_cpu.yaml
    python bench/cache_speedup.py --samples 48 --rounds 7 data.prompt=label train.batch_size=16

Three variants train the same model (LoRA + fused head, the config's parts) for one epoch over the same
training samples:

- **uncached** (`data.decode_cache=false`): what LLaMA-Factory and ms-swift do every epoch: decode each clip
  (PyAV), run the processor's feature extraction, the frozen towers and the language model;
- **decode-cached** (the default loader): decoded frames/audio read from the `datasets` Arrow cache; the
  feature extraction, the towers and the language model still run every step;
- **cached** (`data.feature_cache=true`, cache warm, filled once before timing): prompt ids and tower
  outputs read from the safetensors shards; only the language model (and heads) run.

Epochs rotate A B C A B C (after one warm-up of each), torch threads 1, DataLoader workers 0. Figures are
CPU times of the whole process (`time.process_time`: the epoch's compute, including PyAV's decoding
threads, and not the time lost to other jobs on a shared CPU); per round the ratio to the cached epoch is
taken and the median over rounds reported. Wall-clock medians and the time spent producing batches
(collation and decoding; the towers run inside the model step) are in the JSON too. Prints one JSON line,
then the decode-cached ratio, then the headline ratio (uncached / cached) as the last line.
Trailing `key.path=value` arguments override the config.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from mllm_mer.backbone import load_backbone  # noqa: E402
from mllm_mer.config import RANDOM_TWIN, load_config  # noqa: E402
from mllm_mer.data.loading import build_loader, ensure_inputs, read_splits  # noqa: E402
from mllm_mer.data.synthetic import SyntheticConfig, ensure_synthetic_set  # noqa: E402
from mllm_mer.model import build_mer_model  # noqa: E402
from mllm_mer.trainable import apply_trainable  # noqa: E402
from mllm_mer.training.loop import build_optimizer  # noqa: E402

CLIPS_ROOT = Path(".cache/mllm_mer/bench_clips")
"""Where the camera-sized clip sets are built (once per clip geometry and sample count)."""


class _Local:
    """The few Accelerator members the loaders use, for one process without accelerate."""

    process_index, num_processes, mixed_precision, device = 0, 1, "no", torch.device("cpu")

    @staticmethod
    def main_process_first():
        return nullcontext()

    @staticmethod
    def autocast():
        return nullcontext()

    @staticmethod
    def wait_for_everyone() -> None:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny_cpu.yaml")
    p.add_argument("--samples", type=int, default=24, help="training samples per epoch")
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds of the three variants measured (after one warm-up round)",
    )
    p.add_argument("--cache-dir", default=None, help="feature cache directory (default: a fresh temp dir)")
    p.add_argument(
        "--clips",
        choices=("camera", "config"),
        default="camera",
        help="camera: synthetic clips at --frame-size/--source-fps/--clip-seconds (default); config: the "
        "config's training set (the bundled tiny clips: 56 px, 4 fps, 2 s)",
    )
    p.add_argument("--frame-size", type=int, default=360, help="camera clips: frame side in pixels")
    p.add_argument("--source-fps", type=int, default=25, help="camera clips: frames per second in the file")
    p.add_argument("--clip-seconds", type=float, default=4.0, help="camera clips: duration")
    p.add_argument("--clips-dir", default=str(CLIPS_ROOT), help="camera clips: where the sets are built")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    args = p.parse_args()
    torch.set_num_threads(1)
    overrides = [*RANDOM_TWIN, *args.overrides, "data.num_workers=0"]
    if args.clips == "camera":
        clips = SyntheticConfig(
            seed=0,
            train_size=args.samples,
            dev_size=0,
            test_size=0,
            frame_size=args.frame_size,
            fps=args.source_fps,
            clip_seconds=args.clip_seconds,
        )
        root = ensure_synthetic_set(Path(args.clips_dir) / f"camera-{clips.config_hash()[:12]}", clips)
        overrides += ["data.synthetic_dir=null", f"data.train={root / 'train.jsonl'}", "data.dev="]
    cfg = load_config(args.config, overrides)
    ensure_inputs(cfg)
    samples = read_splits(cfg, ("train",))["train"][: args.samples]
    backbone = load_backbone(cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation)
    acc = _Local()
    with tempfile.TemporaryDirectory(prefix="mllm_mer_bench_cache_") as tmp:
        data = cfg.data
        variants = {  # the feature cache is on by default with frozen towers: the first two switch it off
            "uncached": dataclasses.replace(
                cfg, data=dataclasses.replace(data, decode_cache=False, feature_cache=False)
            ),
            "decode_cached": dataclasses.replace(cfg, data=dataclasses.replace(data, feature_cache=False)),
            "cached": dataclasses.replace(
                cfg,
                data=dataclasses.replace(data, feature_cache=True, feature_cache_dir=args.cache_dir or tmp),
            ),
        }
        loaders = {  # the decode cache and the feature cache are filled here, before any timing
            name: build_loader(c, backbone, samples, train=True, accelerator=acc)[0]
            for name, c in variants.items()
        }
        model = build_mer_model(backbone, cfg)
        apply_trainable(model, cfg)
        optimizer, _ = build_optimizer(model, cfg, total_steps=1000)
        model.train()

        def epoch(variant: str) -> tuple[float, float, float]:
            """(wall s, CPU s, CPU s spent producing batches) of one training epoch."""
            torch.manual_seed(0)
            start, start_cpu, data_cpu = time.perf_counter(), time.process_time(), 0.0
            batches = iter(loaders[variant])
            while True:
                t = time.process_time()
                batch = next(batches, None)
                data_cpu += time.process_time() - t
                if batch is None:
                    break
                out = model(batch)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            return time.perf_counter() - start, time.process_time() - start_cpu, data_cpu

        for variant in variants:  # warm-up
            epoch(variant)
        runs: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for variant in variants:
                runs[variant].append(epoch(variant))

    def median(variant: str, part: int) -> float:
        return statistics.median(r[part] for r in runs[variant])

    def ratio(variant: str, part: int = 1) -> float:
        """Median over rounds of (variant / cached) for wall (0), CPU (1) or batching CPU (2) time."""
        return statistics.median(
            a[part] / b[part] for a, b in zip(runs[variant], runs["cached"], strict=True)
        )

    print(
        json.dumps(
            {
                "bench": "cache_speedup",
                "backbone": cfg.model.path,
                "samples": len(samples),
                "batch_size": cfg.train.batch_size,
                "prompt": cfg.data.prompt,
                "clips": args.clips
                if args.clips == "config"
                else {
                    "frame_size": args.frame_size,
                    "source_fps": args.source_fps,
                    "clip_seconds": args.clip_seconds,
                },
                "rounds": args.rounds,
                "torch_threads": torch.get_num_threads(),
                "median_epoch_cpu_s": {v: median(v, 1) for v in variants},
                "median_epoch_wall_s": {v: median(v, 0) for v in variants},
                "median_epoch_batching_cpu_s": {v: median(v, 2) for v in variants},
                "cpu_ratio_to_cached": {v: ratio(v) for v in ("uncached", "decode_cached")},
                "wall_ratio_to_cached": {v: ratio(v, 0) for v in ("uncached", "decode_cached")},
                "batching_ratio_to_cached": {v: ratio(v, 2) for v in ("uncached", "decode_cached")},
                "cpu_ratios_uncached": [
                    a[1] / b[1] for a, b in zip(runs["uncached"], runs["cached"], strict=True)
                ],
            }
        )
    )
    print(f"decode-cached / cached epoch time (median CPU-time ratio): {ratio('decode_cached'):.2f}")
    print(f"cache speedup (epoch time uncached / cached, median CPU-time ratio): {ratio('uncached'):.2f}")


if __name__ == "__main__":
    main()
