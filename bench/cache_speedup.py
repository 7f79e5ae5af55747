"""Training-epoch time without / with the frozen-encoder cache, measured side by side in one run.

    python bench/cache_speedup.py                                  # tiny thinker, configs/tiny_cpu.yaml
    python bench/cache_speedup.py --samples 48 --rounds 7 data.prompt=label train.batch_size=16

Both variants train the same model (LoRA + fused head, the config's parts) for one epoch over the same
training samples:

- **uncached**: the default loader (decoded frames/audio from the `datasets` decode cache, so no media
  decoding in either variant; the processor's feature extraction, the towers and the language model run
  every step);
- **cached**: `data.feature_cache=true`, cache warm (filled once before timing): prompt ids and tower outputs
  read from the safetensors shards, only the language model (and heads) run.

Epochs alternate A B A B (after one warm-up of each), torch threads 1, DataLoader workers 0, and the median
of the per-round ratios is reported. The figure uses the main thread's CPU time (with one torch thread and
no workers it is the epoch's compute, and it does not count time lost to other jobs on a shared CPU); the
wall-clock median ratio is in the JSON too, and so is the time spent producing batches (collation; the
towers run inside the model step). Prints one JSON line, then the ratio as the last line.
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

import torch  # noqa: E402

from mllm_mer.backbone import load_backbone  # noqa: E402
from mllm_mer.config import load_config  # noqa: E402
from mllm_mer.model import build_mer_model  # noqa: E402
from mllm_mer.trainable import apply_trainable  # noqa: E402
from mllm_mer.training import build_loader, build_optimizer, ensure_inputs, read_splits  # noqa: E402


class _Local:
    """The few Accelerator members the loaders use, for one process without accelerate."""

    process_index, num_processes, mixed_precision, device = 0, 1, "no", torch.device("cpu")

    @staticmethod
    def main_process_first():
        from contextlib import nullcontext

        return nullcontext()

    @staticmethod
    def autocast():
        from contextlib import nullcontext

        return nullcontext()

    @staticmethod
    def wait_for_everyone() -> None:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny_cpu.yaml")
    p.add_argument("--samples", type=int, default=24, help="training samples per epoch")
    p.add_argument("--rounds", type=int, default=5, help="A/B pairs measured (after one warm-up pair)")
    p.add_argument("--cache-dir", default=None, help="feature cache directory (default: a fresh temp dir)")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, [*args.overrides, "data.num_workers=0"])
    ensure_inputs(cfg)
    samples = read_splits(cfg, ("train",))["train"][: args.samples]
    backbone = load_backbone(cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation)
    acc = _Local()
    with tempfile.TemporaryDirectory(prefix="mllm_mer_bench_cache_") as tmp:
        cached_cfg = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, feature_cache=True, feature_cache_dir=args.cache_dir or tmp),
        )
        loaders = {
            "uncached": build_loader(cfg, backbone, samples, train=True, accelerator=acc)[0],
            "cached": build_loader(cached_cfg, backbone, samples, train=True, accelerator=acc)[0],  # fills
        }
        model = build_mer_model(backbone, cfg)
        apply_trainable(model, cfg)
        optimizer, _ = build_optimizer(model, cfg, total_steps=1000)
        model.train()

        def epoch(variant: str) -> tuple[float, float, float]:
            """(wall s, CPU s, CPU s spent producing batches) of one training epoch."""
            torch.manual_seed(0)
            start, start_cpu, data_cpu = time.perf_counter(), time.thread_time(), 0.0
            batches = iter(loaders[variant])
            while True:
                t = time.thread_time()
                batch = next(batches, None)
                data_cpu += time.thread_time() - t
                if batch is None:
                    break
                out = model(batch)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            return time.perf_counter() - start, time.thread_time() - start_cpu, data_cpu

        epoch("uncached"), epoch("cached")  # warm-up
        wall: dict[str, list[float]] = {"uncached": [], "cached": []}
        cpu: dict[str, list[float]] = {"uncached": [], "cached": []}
        data: dict[str, list[float]] = {"uncached": [], "cached": []}
        for _ in range(args.rounds):
            for variant in ("uncached", "cached"):
                w, c, d = epoch(variant)
                wall[variant].append(w)
                cpu[variant].append(c)
                data[variant].append(d)
    ratios = [u / c for u, c in zip(cpu["uncached"], cpu["cached"], strict=True)]
    ratio = statistics.median(ratios)
    print(
        json.dumps(
            {
                "bench": "cache_speedup",
                "backbone": cfg.model.path,
                "samples": len(samples),
                "batch_size": cfg.train.batch_size,
                "prompt": cfg.data.prompt,
                "rounds": args.rounds,
                "torch_threads": torch.get_num_threads(),
                "median_epoch_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
                "median_epoch_wall_s": {k: statistics.median(v) for k, v in wall.items()},
                "wall_ratio": statistics.median(
                    u / c for u, c in zip(wall["uncached"], wall["cached"], strict=True)
                ),
                "median_epoch_batching_cpu_s": {k: statistics.median(v) for k, v in data.items()},
                "batching_ratio": statistics.median(
                    u / c for u, c in zip(data["uncached"], data["cached"], strict=True)
                ),
                "cpu_ratios": ratios,
            }
        )
    )
    print(f"cache speedup (epoch time uncached / cached, median CPU-time ratio): {ratio:.2f}")


if __name__ == "__main__":
    main()
