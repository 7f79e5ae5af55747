"""Training-step time of the full method stack / a plain-LoRA step, measured side by side in one run.

    python bench/stack_overhead.py                                  # tiny thinker, configs/tiny_cpu.yaml
    python bench/stack_overhead.py --rounds 15 --batch-size 8 data.prompt=label

Variants, each its own model on the same frozen backbone weights, all trained on the same collated batch
(processor outputs; the towers run in every variant, and DCR's unimodal paths run them again):

    lora   plain LoRA (peft) + fused head                      (the baseline)
    mose   MoSE experts instead of LoRA                        (adapter=mose)
    dnr    LoRA + DnR divide/refine heads                      (dnr.enabled)
    dcr    LoRA + DCR unimodal paths, path adapters, AFD       (dcr.enabled)
    full   MoSE + DnR + DCR                                    (every part this package has)

One step = forward, backward, AdamW step. Each round runs every variant once in turn, starting one variant
later every round (after one warm-up round), torch threads 1, and each variant's ratio to the round's `lora`
step is taken; the medians over the rounds are reported (main-thread CPU time; wall-clock medians in the
JSON). Prints one JSON line, then the full-stack ratio as the last line. Trailing `key.path=value`
arguments override the config.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from mllm_mer.backbone import load_backbone  # noqa: E402
from mllm_mer.config import RANDOM_TWIN, load_config  # noqa: E402
from mllm_mer.data.dataset import MerDataset, build_media_dataset, decode_options  # noqa: E402
from mllm_mer.data.loading import build_collator, ensure_inputs, read_splits  # noqa: E402
from mllm_mer.model import build_mer_model  # noqa: E402
from mllm_mer.trainable import apply_trainable  # noqa: E402
from mllm_mer.training.loop import build_optimizer  # noqa: E402

VARIANTS: dict[str, tuple[str, ...]] = {
    "lora": (),
    "mose": ("adapter=mose",),
    "dnr": ("dnr.enabled=true",),
    "dcr": ("dcr.enabled=true",),
    "full": ("adapter=mose", "dnr.enabled=true", "dcr.enabled=true"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny_cpu.yaml")
    p.add_argument("--rounds", type=int, default=10, help="rounds measured (after one warm-up round)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("overrides", nargs="*", help="key.path=value")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfgs = {name: load_config(args.config, [*RANDOM_TWIN, *args.overrides, *extra]) for name, extra in VARIANTS.items()}
    base_cfg = cfgs["dcr"]  # its collator adds the unimodal sub-batches; the other variants ignore them
    ensure_inputs(base_cfg)
    samples = read_splits(base_cfg, ("train",))["train"][: args.batch_size]
    steps = {}
    for name, cfg in cfgs.items():
        backbone = load_backbone(cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation)
        model = build_mer_model(backbone, cfg)
        counts = apply_trainable(model, cfg)
        optimizer, _ = build_optimizer(model, cfg, total_steps=1000)
        model.train()
        steps[name] = (model, optimizer, sum(t for t, _ in counts.values()))
    options = decode_options(base_cfg, backbone.processor)
    data = MerDataset(samples, build_media_dataset(samples, options, base_cfg.data.cache_dir), options)
    batch = build_collator(base_cfg, backbone, train=True)([data[i] for i in range(len(data))])
    batch["train_step"] = 10**6  # past every stage switch: all parts active

    def step(name: str) -> tuple[float, float]:
        model, optimizer, _ = steps[name]
        torch.manual_seed(0)
        start, start_cpu = time.perf_counter(), time.thread_time()
        out = model(batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start, time.thread_time() - start_cpu

    for name in VARIANTS:  # warm-up
        step(name)
    wall: dict[str, list[float]] = {n: [] for n in VARIANTS}
    cpu: dict[str, list[float]] = {n: [] for n in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.rounds):  # the order rotates every round: no variant always runs right after another
        for name in names[r % len(names):] + names[: r % len(names)]:
            w, c = step(name)
            wall[name].append(w)
            cpu[name].append(c)
    ratios = {n: statistics.median(a / b for a, b in zip(cpu[n], cpu["lora"], strict=True)) for n in VARIANTS}
    print(
        json.dumps(
            {
                "bench": "stack_overhead",
                "backbone": base_cfg.model.path,
                "batch_size": len(samples),
                "tokens": int(batch["input_ids"].shape[1]),
                "prompt": base_cfg.data.prompt,
                "rounds": args.rounds,
                "torch_threads": torch.get_num_threads(),
                "ratio_to_lora_cpu": ratios,
                "ratio_to_lora_wall": {
                    n: statistics.median(a / b for a, b in zip(wall[n], wall["lora"], strict=True))
                    for n in VARIANTS
                },
                "median_step_cpu_s": {n: statistics.median(v) for n, v in cpu.items()},
                "trainable_params": {n: s[2] for n, s in steps.items()},
            }
        )
    )
    parts = ", ".join(f"{n} {r:.2f}" for n, r in ratios.items() if n not in ("lora", "full"))
    print(f"per part / lora: {parts}")
    print(
        "stack overhead (full MoSE+DnR+DCR step / plain LoRA step, median CPU-time ratio): "
        f"{ratios['full']:.2f}"
    )


if __name__ == "__main__":
    main()
