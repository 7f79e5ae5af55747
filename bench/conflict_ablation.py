"""Conflict ablation: fine-tune every method configuration on the frozen stage-0 backbone, print one table.

    python bench/conflict_ablation.py                                  # defaults: testbed data, seed 0
    python bench/conflict_ablation.py --data data/syn --seed 1 --steps 120 --output runs/ablation/report.json
    python bench/conflict_ablation.py --configs plain_lora,mose --workdir runs/ablation train.batch_size=4

Rows (`ROWS`): plain_lora (no overrides), mose (`adapter=mose`), ar (the plain_lora run with
`ar.enabled=true` at inference), mose_ar, dcr (`dcr.enabled=true`), dnr (`dnr.enabled=true`) and full
(all of them). A row whose keys the config does not know yet (`load_config` raises "unknown key") is
skipped, with a printed line, and listed under `skipped`. Rows with the same training overrides share one
training run (ar reuses plain_lora's, mose_ar reuses mose's).

Each training run is `python scripts/finetune.py --config configs/testbed.yaml model.path=<stage-0>
data.train=<DATA>/train.jsonl data.dev=<DATA>/dev.jsonl train.seed=S train.max_steps=N train.log_every=1
...` in a subprocess (`configs/tiny_cpu.yaml` if testbed.yaml is missing; trailing `key.path=value`
arguments are added to every run). Test predictions come from the fused head (`predict_rows`) on
`<DATA>/test.jsonl`.

Columns: per-subset accuracy, weighted F1, the audio-dominance index (on audio/video conflict clips, the
share of cue-following predictions that follow the audio cue; from the designed cues), the exact number
of trained parameters (the sum of numel of every tensor the run saved: adapters, including peft's extra
adapters in adapter/<name>/, MoSE weights, heads and any unfrozen base weights; checked against the
`mllm_mer.trainable` table with a printed WARNING on mismatch), and step_time_ratio = median seconds per optimizer step of the row's training run / the
same for plain_lora (from train_log.jsonl, first step excluded). The runs are sequential, so on a shared
machine the ratio carries load noise; every run pins one torch thread.

Writes OUT.json (`{"rows": [...], "skipped": [...]}`) and OUT.png (per-subset accuracy per config).
Defaults: `--data` builds the testbed set (`mllm_mer.testbed.TESTBED_DATA`) in
.cache/mllm_mer/testbed_data; `--backbone` is the cached stage-0 backbone (built on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO / ".cache" / "mllm_mer" / "testbed_data"
DEFAULT_STEPS = 120
"""2 epochs of the 480-clip testbed set at batch 8: plain LoRA has converged on the consistent and
audio-aligned clips by then, and all seven rows fit in 30 min on 2 shared CPU cores (measured: about
0.4 s per plain step; MoSE 1.5x)."""


@dataclass(frozen=True)
class Row:
    """One table row: overrides applied when training, and to the run's config when predicting."""

    name: str
    train: tuple[str, ...] = ()
    infer: tuple[str, ...] = ()


ROWS: tuple[Row, ...] = (
    Row("plain_lora"),
    Row("mose", train=("adapter=mose",)),
    Row("ar", infer=("ar.enabled=true",)),
    Row("mose_ar", train=("adapter=mose",), infer=("ar.enabled=true",)),
    Row("dcr", train=("dcr.enabled=true",)),
    Row("dnr", train=("dnr.enabled=true",)),
    Row(
        "full",
        train=("adapter=mose", "dcr.enabled=true", "dnr.enabled=true"),
        infer=("ar.enabled=true",),
    ),
)
BASELINE = "plain_lora"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", type=Path, help="folder with train/dev/test.jsonl (default: build the testbed set)"
    )
    p.add_argument("--seed", type=int, default=0, help="training seed (train.seed) of every run")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps per training run")
    p.add_argument("--output", type=Path, default=REPO / "runs" / "conflict_ablation" / "report.json")
    p.add_argument("--backbone", type=Path, help="frozen backbone directory (default: the stage-0 backbone)")
    p.add_argument("--config", type=Path, help="run YAML (default: configs/testbed.yaml, else tiny_cpu.yaml)")
    p.add_argument("--workdir", type=Path, help="where the runs are kept (default: a temporary folder)")
    p.add_argument("--configs", default=",".join(r.name for r in ROWS), help="comma-separated subset of rows")
    p.add_argument("--batch-size", type=int, default=16, help="prediction batch size")
    p.add_argument("overrides", nargs="*", help="key.path=value added to every training run")
    args = p.parse_args(argv)
    known = {r.name for r in ROWS}
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        p.error(f"--configs {args.configs!r}: unknown {unknown}; valid: {[r.name for r in ROWS]}")
    if BASELINE not in names:
        p.error(f"--configs must include {BASELINE} (the step-time baseline)")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    args.rows = [r for r in ROWS if r.name in names]
    return args


def default_config() -> Path:
    testbed = REPO / "configs" / "testbed.yaml"
    return testbed if testbed.is_file() else REPO / "configs" / "tiny_cpu.yaml"


def base_overrides(args: argparse.Namespace, data: Path, backbone: Path) -> list[str]:
    return [
        f"model.path={backbone}",
        "model.build_tiny=false",
        "data.synthetic_dir=null",
        f"data.train={data / 'train.jsonl'}",
        f"data.dev={data / 'dev.jsonl'}",
        f"train.seed={args.seed}",
        f"train.max_steps={args.steps}",
        "train.log_every=1",
        "train.save_every=0",
        "train.torch_threads=1",
        *args.overrides,
    ]


def plan_rows(config: Path, base: list[str], rows: Sequence[Row]) -> tuple[list[Row], list[tuple[Row, str]]]:
    """Split `rows` into runnable rows and skipped ones (with the reason) by loading each row's config.

    Raises:
        ConfigError: a problem other than an unknown key (a real mistake, e.g. a bad override value).
    """
    from mllm_mer.config import ConfigError, load_config

    runnable, skipped = [], []
    for row in rows:
        try:
            load_config(config, [*base, *row.train, *row.infer])
        except ConfigError as exc:
            unknown = [e for e in exc.errors if e.startswith("unknown key")]
            if not unknown:
                raise
            skipped.append((row, "; ".join(e.split(" (valid:")[0] for e in unknown)))
            continue
        runnable.append(row)
    return runnable, skipped


def train_run(config: Path, overrides: list[str], out_dir: Path) -> None:
    """Run scripts/finetune.py into `out_dir` (a previous run there is replaced)."""
    if out_dir.exists():
        if any(out_dir.iterdir()) and not (out_dir / "config.yaml").is_file():
            raise FileExistsError(f"{out_dir} exists and is not a run directory; choose another --workdir")
        shutil.rmtree(out_dir)
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "finetune.py"),
        "--config",
        str(config),
        *overrides,
        f"train.output_dir={out_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"training failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )


def trained_parameters(run_dir: Path) -> int:
    """Sum of numel over every tensor the run saved (top-level *.safetensors and adapter/, including the
    per-adapter subfolders peft writes for extra adapters such as DCR's adapter/dcr_<path>/), read lazily."""
    from safetensors import safe_open

    files = sorted(run_dir.glob("*.safetensors")) + sorted((run_dir / "adapter").rglob("*.safetensors"))
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                n = 1
                for d in fh.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def median_step_time(run_dir: Path) -> float:
    rows = [
        json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()
    ]
    times = [r["step_time"] for r in rows if "step_time" in r]
    if not times:
        raise ValueError(f"{run_dir / 'train_log.jsonl'} has no step_time rows (train.log_every=1 expected)")
    return statistics.median(times[1:] if len(times) > 1 else times)


def evaluate_row(row: Row, run_dir: Path, test_file: Path, batch_size: int) -> dict:
    """Fused-head predictions on the test set with the row's inference overrides; metrics for the table."""
    from mllm_mer.config import load_run_config
    from mllm_mer.data.jsonl import read_jsonl
    from mllm_mer.generation import load_for_inference, predict_rows
    from mllm_mer.metrics import audio_dominance, classification_metrics
    from mllm_mer.trainable import apply_trainable

    cfg = load_run_config(run_dir, list(row.infer))
    model = load_for_inference(run_dir=run_dir, cfg=cfg)
    samples = read_jsonl(test_file, cfg.data.labels)
    preds = [r["label"] for r in predict_rows(model, samples, batch_size=batch_size)]
    m = classification_metrics(
        [s.label for s in samples], preds, cfg.data.labels, [s.subset for s in samples]
    )
    dom = audio_dominance(
        preds, [s.cues.get("audio") for s in samples], [s.cues.get("video") for s in samples]
    )
    saved = trained_parameters(run_dir)
    declared = sum(t for t, _ in apply_trainable(model.mer, cfg).values())  # the start-up table's "all"
    if saved != declared:
        print(
            f"WARNING {row.name}: the run saved {saved:,} trained values but its trainable table counts "
            f"{declared:,}; reporting the saved count",
            flush=True,
        )
    return {
        "config": row.name,
        "per_subset": {k: {"accuracy": v["accuracy"]} for k, v in m["per_subset"].items()},
        "weighted_f1": m["weighted_f1"],
        "audio_dominance": dom["index"],
        "trainable_params": saved,
    }


def ensure_inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """The data folder and the backbone directory (building the defaults if needed)."""
    if args.data is None:
        from mllm_mer.data.synthetic import ensure_synthetic_set
        from mllm_mer.testbed import TESTBED_DATA

        data = ensure_synthetic_set(DEFAULT_DATA_DIR, TESTBED_DATA, workers=min(2, os.cpu_count() or 1))
    else:
        data = args.data
    missing = [f"{data / s}.jsonl" for s in ("train", "dev", "test") if not (data / f"{s}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"--data {data}: missing {missing}")
    if args.backbone is None:
        if str(REPO / "scripts") not in sys.path:
            sys.path.insert(0, str(REPO / "scripts"))  # scripts/ is not installed
        from pretrain_tiny import ensure_stage0_backbone

        backbone = ensure_stage0_backbone(REPO / ".cache" / "mllm_mer")
    else:
        backbone = args.backbone
    return data.resolve(), Path(backbone).resolve()


def format_table(rows: list[dict]) -> str:
    from mllm_mer.data.schema import SUBSETS

    head = f"{'config':<12}" + "".join(f"{s:>15}" for s in SUBSETS)
    head += f"{'wF1':>8}{'audio_dom':>11}{'trainable':>12}{'step_time':>11}"
    lines = [head]
    for r in rows:
        accs = "".join(f"{r['per_subset'].get(s, {}).get('accuracy', float('nan')):>15.3f}" for s in SUBSETS)
        dom = "n/a" if r["audio_dominance"] is None else f"{r['audio_dominance']:.3f}"
        lines.append(
            f"{r['config']:<12}{accs}{r['weighted_f1']:>8.3f}{dom:>11}{r['trainable_params']:>12,}"
            f"{r['step_time_ratio']:>10.2f}x"
        )
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: Path) -> Path:
    """Grouped bars: per-subset accuracy (one group per config)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mllm_mer.data.schema import SUBSETS

    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 3.6))
    width = 0.8 / len(SUBSETS)
    for j, subset in enumerate(SUBSETS):
        xs = [i + (j - (len(SUBSETS) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r["per_subset"].get(subset, {}).get("accuracy", 0.0) for r in rows], width, label=subset)
    ax.set_xticks(range(len(rows)), [r["config"] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace, workdir: Path) -> dict:
    data, backbone = ensure_inputs(args)
    config = args.config or default_config()
    base = base_overrides(args, data, backbone)
    runnable, skipped = plan_rows(config, base, args.rows)
    for row, reason in skipped:
        print(f"skip {row.name}: the config does not know its keys yet ({reason})", flush=True)
    run_dirs: dict[tuple[str, ...], Path] = {}
    results = []
    for row in runnable:
        if row.train not in run_dirs:
            run_dir = workdir / row.name
            start = time.perf_counter()
            train_run(config, [*base, *row.train], run_dir)
            print(
                f"trained {row.name} ({args.steps} steps) in {time.perf_counter() - start:.0f} s", flush=True
            )
            run_dirs[row.train] = run_dir
        run_dir = run_dirs[row.train]
        result = evaluate_row(row, run_dir, data / "test.jsonl", args.batch_size)
        result["step_time_ratio"] = median_step_time(run_dir) / median_step_time(run_dirs[()])
        results.append(result)
    return {"rows": results, "skipped": [row.name for row, _ in skipped]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from mllm_mer.config import ConfigError
    from mllm_mer.data.jsonl import DataError

    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            report = run(args, args.workdir.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="conflict_ablation-") as tmp:
                report = run(args, Path(tmp))
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = plot_rows(report["rows"], out.with_suffix(".png"))
    print(format_table(report["rows"]))
    if report["skipped"]:
        print(f"skipped: {', '.join(report['skipped'])}")
    print(f"wrote {out} and {png} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
