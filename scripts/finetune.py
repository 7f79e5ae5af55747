"""Fine-tune a Qwen2.5-Omni thinker with mllm_mer parts: LoRA + fused classification head.

    accelerate launch scripts/finetune.py                                  # tiny model, synthetic data
    accelerate launch scripts/finetune.py --config configs/tiny_cpu.yaml train.lr=5e-4 train.max_steps=50
    accelerate launch --config_file configs/accelerate/ddp_cpu.yaml scripts/finetune.py
    accelerate launch scripts/finetune.py train.resume_from=latest
    accelerate launch scripts/finetune.py train.overwrite=true             # move the run in output_dir aside
    python scripts/finetune.py --check-data data.train=my/train.jsonl      # decode every sample, list problems
    accelerate launch scripts/finetune.py --verbose                        # every library's log and warning

Only `--config`, `--check-data`, `--print-config`, `--verbose` (= `train.verbose=true`) and dotted
`key.path=value` overrides are accepted. The run directory (`train.output_dir`) receives config.yaml,
run_info.json, the methods' weights (adapter/ with adapter=lora; mose.safetensors and gate_stats.json with
adapter=mose), heads.safetensors, checkpoints/, tb/, train_log.jsonl, dev_log.jsonl, final_metrics.json and
curves.png; the run ends with a summary (dev metrics beside chance and the best evaluation, the next commands).
A run owns that directory: one holding another run is refused (see `mllm_mer.training.ownership`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm_mer.startup import skip_unused_imports

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"

if __name__ == "__main__":  # before peft / transformers load (`mllm_mer.startup`)
    skip_unused_imports(sys.argv[1:], DEFAULT_CONFIG)

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from mllm_mer.adapters.mose.model import GateStatsMean
from mllm_mer.backbone import load_backbone
from mllm_mer.config import ConfigError, RunConfig, dump_config, load_config, shorthand_overrides
from mllm_mer.data import loading as D
from mllm_mer.logs import run_output, say
from mllm_mer.model import build_mer_model
from mllm_mer.trainable import apply_trainable, format_trainable_table
from mllm_mer.training import checkpoint as C
from mllm_mer.training import loop as L
from mllm_mer.training import run_dir as R
from mllm_mer.training import summary as S
from mllm_mer.training.evaluate import report_dev
from mllm_mer.training.ownership import claim_output_dir


def parse_args(argv: list[str] | None) -> tuple[RunConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run YAML (default: configs/tiny_cpu.yaml)")
    parser.add_argument("--check-data", action="store_true", help="decode every sample, list problems, exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true", help="train.verbose: every library's log and warning")
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args(argv)
    flags = shorthand_overrides({"train.verbose": args.verbose})
    return load_config(args.config, [*flags, *args.overrides]), args


def check_data_only(cfg: RunConfig) -> int:
    """Check every row and every sample's media of train/dev/test; print one line per problem."""
    problems, n, splits = D.check_all_data(cfg)
    for line in problems:
        print(line)
    print(f"checked {n} samples in {splits} split(s): {len(problems)} problem(s)")
    return 1 if problems else 0


def train(cfg: RunConfig) -> dict:
    missing = cfg.data.training_problems()
    if missing:
        raise ConfigError(missing, "the run config")
    accelerator = L.build_accelerator(cfg)
    with claim_output_dir(cfg, accelerator):  # lock train.output_dir; refuse one holding another run
        return run_training(cfg, accelerator)


def run_training(cfg: RunConfig, accelerator: Accelerator) -> dict:
    main = accelerator.is_main_process
    if cfg.train.torch_threads > 0:
        torch.set_num_threads(cfg.train.torch_threads)
    set_seed(cfg.train.seed)
    with accelerator.main_process_first():
        D.ensure_inputs(cfg)
    data_report: dict[str, list[str]] = {}  # problems of samples skipped under data.on_error=skip
    samples = D.read_splits(cfg, report=data_report)  # every row checked before the model loads
    resume = C.resolve_resume(cfg)
    m = cfg.model
    backbone = load_backbone(m.path, m.dtype, m.attn_implementation, m.quantization)
    train_dl, dev_dl, samples = D.build_loaders(cfg, backbone, samples, accelerator, data_report)
    model = build_mer_model(backbone, cfg)
    counts = apply_trainable(model, cfg)
    total = L.total_steps(cfg, len(train_dl), accelerator.num_processes)
    optimizer, scheduler = L.build_optimizer(model, cfg, total)
    # the scheduler stays unprepared: accelerate would step it once per process (schedule `total` is global)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    accelerator.register_for_checkpointing(scheduler)
    dev_dl = accelerator.prepare(dev_dl) if dev_dl is not None else None
    R.write_run_start(cfg, accelerator, backbone, format_trainable_table(counts), total, samples, data_report)
    state = C.resume_state(accelerator, resume)
    writer = L.open_writer(cfg, accelerator)  # None off the main process
    log_file = Path(cfg.train.output_dir) / "train_log.jsonl"
    bar = tqdm(total=total, initial=state.step, disable=not main, desc="train")
    dev_metrics: dict = {}
    timer = L.StepTimer(state.step)  # seconds per optimizer step, logged every train.log_every steps
    gate_mean = GateStatsMean()  # MoSE gate statistics over the run (rank 0's batches)
    guard = L.LoopGuard(cfg, accelerator)  # train.nan_policy and train.max_minutes, same answer on all ranks
    throughput = L.Throughput()  # train_runtime, samples / tokens per second (final_metrics.json)
    clipped = [p for p in model.parameters() if p.requires_grad]  # listed once, not filtered every step
    model.train()
    while state.step < total and not guard.stopped_early:
        for batch in L.epoch_batches(accelerator, train_dl, state):  # a resumed epoch skips the batches seen
            # dropout draws depend only on (seed, rank, epoch, batch): a resumed run repeats them exactly
            torch.manual_seed(C.batch_seed(cfg.train.seed, accelerator.process_index, state))
            batch["train_step"] = state.step  # gates DnR's Refine stage (dnr.refine_start_step)
            batch["train_steps_total"] = total  # DnR's phased schedule: where Divide ends (dnr.divide_fraction)
            with accelerator.accumulate(model):
                out = model(batch)
                if guard.skip_nonfinite(out.loss, state, batch["sample_ids"], optimizer):
                    continue  # batch dropped under train.nan_policy=skip (=stop raises)
                throughput.add(batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(clipped, cfg.train.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            if main and out.gate_stats:
                gate_mean.add(out.gate_stats)
            state.batch_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            throughput.steps += 1
            bar.update(1)
            if main and state.step % cfg.train.log_every == 0:
                lr = scheduler.get_last_lr()[0]
                row = L.log_train_step(writer, log_file, state.step, out, lr, timer.lap(state.step))
                bar.set_postfix(loss=f"{row['loss']:.3f}")
            if dev_dl is not None and cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
                dev_metrics = report_dev(model, dev_dl, accelerator, cfg, samples["dev"], state.step, writer)
            if cfg.train.save_every and state.step % cfg.train.save_every == 0 and state.step < total:
                C.save_checkpoint(accelerator, cfg, state)
            if guard.out_of_time(state) or state.step >= total:  # out_of_time announces the early stop
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            if dev_dl is not None and not cfg.train.eval_every and state.step < total:
                dev_metrics = report_dev(model, dev_dl, accelerator, cfg, samples["dev"], state.step, writer)
    bar.close()
    speed = throughput.metrics(accelerator)
    fitted = L.after_training(model, train_dl, accelerator, cfg)  # closed-form parts, e.g. DCR's reliability heads
    C.save_checkpoint(accelerator, cfg, state)
    if dev_dl is not None:
        dev_metrics = report_dev(model, dev_dl, accelerator, cfg, samples["dev"], state.step, writer)
    final = {"dev": dev_metrics, "step": state.step, **guard.summary(), **speed}
    if fitted:
        final["after_training"] = fitted
    R.save_run(accelerator, model, cfg, final, gate_mean)  # weights, final_metrics.json, gate_stats.json
    if main:
        writer.close()
        say(S.write_summary(cfg, final, samples.get("dev", []), Path(__file__).resolve().parent))  # + curves.png
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        with run_output(cfg.train.verbose):  # what other libraries may print; restored on exit
            if args.check_data:
                return check_data_only(cfg)
            train(cfg)
    except (ConfigError, ValueError, FileNotFoundError, L.NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
