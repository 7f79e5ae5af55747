"""Generation-time overhead of attention reallocation (AR): AR on / AR off, measured side by side in one run.

    python bench/ar_overhead.py                                   # tiny thinker, configs/tiny_cpu.yaml
    python bench/ar_overhead.py --rounds 15 --new-tokens 64 ar.layers=[0,1] ar.mode=scores
    python bench/ar_overhead.py --run runs/ablation/seed0/full --data .cache/mllm_mer/testbed_data/test.jsonl \
        ar.target_mode=paths ar.strength=0.9                     # per-sample AR of a trained DCR run

One left-padded batch of test clips is collated once; `generate()` (greedy, exactly --new-tokens tokens) then
runs alternately without and with AR (A B A B ..., torch threads 1, after one warm-up of each), and the
median of the per-round time ratios is reported. The figure uses the thread's CPU time (with one torch
thread it is the generation's compute time, and it does not count the time the process waits while other
jobs hold a shared CPU); the wall-clock median ratio is in the JSON too. Prints one JSON line, then the
ratio as the last line.
Trailing `key.path=value` arguments override the config (the `ar.*` settings used for the "on" runs;
`ar.enabled` is forced on for them). With `--run` a trained run is measured instead of the bare backbone (its
methods' inference scopes included: per-sample AR's first pass over the unimodal paths counts as AR's cost).
With `--predict` the timed call is the whole `predict_rows` on those clips (the heads' forward, the answer and,
with a fitted arbiter, the re-answers) instead of `generate()` alone: there the first pass also serves the
heads' forward (`reusing_path_runs`), so per-sample AR costs little more than the attention function.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from mllm_mer.config import load_config, load_run_config  # noqa: E402
from mllm_mer.data.collate import model_inputs  # noqa: E402
from mllm_mer.data.jsonl import read_jsonl  # noqa: E402
from mllm_mer.data.loading import ensure_inputs, read_splits  # noqa: E402
from mllm_mer.generation import inference_loader, inference_scope, load_for_inference, predict_rows  # noqa: E402
from mllm_mer.prompts import load_prompt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny_cpu.yaml")
    p.add_argument("--rounds", type=int, default=15, help="A/B pairs measured (after one warm-up pair)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--run", help="a trained run directory (default: the config's bare backbone)")
    p.add_argument("--data", help="JSONL of clips to generate for (default: the config's data.test)")
    p.add_argument("--predict", action="store_true",
                   help="time predict_rows (heads + answer) instead of generate() alone (needs --run)")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    args = p.parse_args()
    if args.predict and not args.run:
        p.error("--predict times a trained run's predict_rows: give --run")
    torch.set_num_threads(1)
    if args.run:
        cfg = load_run_config(args.run, args.overrides)
        model = load_for_inference(run_dir=args.run, cfg=cfg)
    else:
        cfg = load_config(args.config, args.overrides)
        ensure_inputs(cfg)
        model = load_for_inference(model_path=cfg.model.path, cfg=cfg)
    samples = (read_jsonl(args.data, cfg.data.labels) if args.data else read_splits(cfg, ("test",))["test"])
    samples = samples[: args.batch_size]
    batch = next(iter(inference_loader(model, samples, load_prompt("label"), args.batch_size)))
    inputs = model_inputs(batch)
    variants = {"off": dataclasses.replace(model, cfg=dataclasses.replace(cfg, ar=dataclasses.replace(cfg.ar, enabled=False))),
                "on": dataclasses.replace(model, cfg=dataclasses.replace(cfg, ar=dataclasses.replace(cfg.ar, enabled=True)))}

    @torch.no_grad()
    def timed(variant: str) -> tuple[float, float]:
        start, start_cpu = time.perf_counter(), time.thread_time()
        if args.predict:
            list(predict_rows(variants[variant], samples, batch_size=len(samples), prompt_name="label"))
        else:
            with inference_scope(variants[variant], batch):
                model.generator.generate(**inputs, use_audio_in_video=batch["use_audio_in_video"], do_sample=False,
                                         max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                         pad_token_id=model.backbone.token_ids.pad)
        return time.perf_counter() - start, time.thread_time() - start_cpu

    timed("off"), timed("on")  # warm-up
    wall: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for variant in ("off", "on"):
            w, c = timed(variant)
            wall[variant].append(w)
            cpu[variant].append(c)
    wall_ratio = statistics.median(on / off for on, off in zip(wall["on"], wall["off"], strict=True))
    ratios = [on / off for on, off in zip(cpu["on"], cpu["off"], strict=True)]
    ratio = statistics.median(ratios)
    print(json.dumps({
        "bench": "ar_overhead", "backbone": cfg.model.path, "run": args.run, "batch_size": len(samples),
        "prompt_tokens": int(batch["input_ids"].shape[1]), "timed": "predict_rows" if args.predict else "generate",
        "new_tokens": None if args.predict else args.new_tokens, "rounds": args.rounds,
        "ar": dataclasses.asdict(cfg.ar) | {"enabled": True}, "torch_threads": torch.get_num_threads(),
        "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "median_wall_s": {k: statistics.median(v) for k, v in wall.items()},
        "cpu_ratios": [round(r, 4) for r in ratios], "median_wall_ratio_on_off": round(wall_ratio, 4),
        "median_cpu_ratio_on_off": round(ratio, 4), "goal": "<= 1.30" if cfg.ar.target_mode == "paths" else "<= 1.10",
    }))
    what = "predict_rows" if args.predict else "generation"
    print(f"AR on / AR off {what} time (thread CPU time, median of {args.rounds} A/B rounds): {ratio:.3f}")


if __name__ == "__main__":
    main()
