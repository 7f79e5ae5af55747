"""Conflict ablation: fine-tune every method configuration on the frozen stage-0 backbone over several seeds,
choose every inference knob on dev, score test once, print one table with intervals.

    python bench/conflict_ablation.py                                  # testbed data, seeds 0,1,2
    python bench/conflict_ablation.py --data data/syn --seed 1 --output runs/ablation/report.json
    python bench/conflict_ablation.py --configs plain_lora,ar --seeds 0,1 --workdir runs/ablation train.batch_size=4

Rows (`ROWS`): plain_lora (no overrides), mose (`adapter=mose`), ar (the plain_lora run with AR at inference,
one target share for all clips), mose_ar, dcr (`dcr.enabled=true`), dnr (`dnr.enabled=true`) and full (all of
them, with per-sample AR: `ar.target_mode=paths`); the two arbiter rows also train with
`data.modality_dropout=0.2` (`ANSWER_DROPOUT`). Rows with the same
training overrides share one training run per seed (ar reuses plain_lora's, mose_ar reuses mose's). Every
row's overrides, and the trailing `key.path=value` arguments added to every run, are checked before anything
trains: an unknown key or a bad value stops the harness with the config error (exit 2), never a skipped row.

Protocol (the harness cannot fool itself):
- **Primary prediction = the model's answer**, as CA-MER scores it: the greedy generated answer parsed to a
  label (`mllm_mer.generation.predict_rows`, `label`), with the run's training prompt. The `dcr` and `full`
  rows fit their ADA arbiter on dev inside the harness and answer as `dcr.arbiter.answer="arm"` does: a clip
  the arbiter routes to a unimodal arm is answered again from that modality alone (`primary_path:
  "arbiter_answer"`, still a generated answer). Every row also reports each path it has (`by_path`:
  generated = the answer from both modalities, head = the fused head's argmax, arbiter = the chosen arm's
  head, arbiter_answer).
- **Knobs are chosen on dev** (`Row.search`: AR strength / target share; the arbiter's feedback,
  calibration weight and fusion margin, scored by K-fold cross-fitting within dev on the routed answer; its
  reward is the config's, by default each arm's own answer) by a grid
  search that reads dev labels only, run on
  the first seed; the chosen values are then used for every seed and recorded with the whole dev grid under
  `search`. Test is scored once per row and seed, after the search. Training knobs (loss weights, steps:
  `--steps`) are the config's values and are not searched (recorded under `fixed`).
- **Seeds** (`--seeds`, default the three seeds from `--seed`): each training run is repeated per seed
  (`train.seed`); per-subset accuracy is the mean over seeds with a 95% bootstrap interval (clips resampled
  within each subset, the same draw for every seed, 2000 draws), and per-seed rows are kept under `seeds`.

Each training run is `python scripts/finetune.py --config configs/testbed.yaml model.path=<stage-0>
data.train=<DATA>/train.jsonl data.dev=<DATA>/dev.jsonl train.seed=S train.max_steps=N train.log_every=1
...` in a subprocess (`configs/tiny_cpu.yaml` if testbed.yaml is missing).

Columns: per-subset accuracy of the primary prediction (mean [95% interval]), weighted F1, the
audio-dominance index (on audio/video conflict clips, the share of cue-following predictions that follow the
audio cue; from the designed cues; mean over seeds), the exact number of trained parameters (the sum of
numel of every tensor the run saved, checked against the `mllm_mer.trainable` table with a printed WARNING
on mismatch), and step_time_ratio = median seconds per optimizer step of the row's training runs / the same
for plain_lora (from train_log.jsonl, first step excluded; runs are sequential, one torch thread each, so
the ratio carries load noise).

Writes OUT.json (`{"rows": [...], "search": {...}, "seeds": [...], ...}`) and OUT.png (per-subset accuracy
per config with intervals). Defaults: `--data` builds the testbed set (`mllm_mer.testbed.TESTBED_DATA`) in
.cache/mllm_mer/testbed_data; `--backbone` is the cached stage-0 backbone (built on first use).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from mllm_mer.config import ConfigError, RunConfig, load_config, load_run_config  # noqa: E402
from mllm_mer.data.jsonl import DataError, read_jsonl  # noqa: E402
from mllm_mer.data.schema import SUBSETS, Sample  # noqa: E402
from mllm_mer.fusion.dcr.ada import (  # noqa: E402
    ARMS,
    SEARCH_GRID,
    answer_inputs,
    arbiter_inputs,
    fit_arbiter,
    reliability_inputs,
    search_arbiter,
)
from mllm_mer.fusion.dcr.config import ArbiterConfig  # noqa: E402
from mllm_mer.generation import (  # noqa: E402
    InferenceModel,
    answers_per_arm,
    load_for_inference,
    predict_rows,
    routed_answers,
)
from mllm_mer.metrics import audio_dominance, classification_metrics  # noqa: E402
from mllm_mer.trainable import apply_trainable  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO / ".cache" / "mllm_mer" / "testbed_data"
DEFAULT_STEPS = 120
"""2 epochs of the 480-clip testbed set at batch 8 (not searched: the same for every row)."""
BOOTSTRAP_DRAWS = 2000
CV_FOLDS = 4
"""Folds of the arbiter's cross-fitting within dev (each dev clip scored by an arbiter not fitted on it)."""


@dataclass(frozen=True)
class Row:
    """One table row.

    Attributes:
        train: overrides applied when training (and kept in the run's config).
        infer: overrides applied to the run's config when predicting.
        search: inference knobs chosen on dev: {dotted key: candidate values}; the grid is their product.
        arbiter: DCR's ADA arbiter is fitted on dev (its knobs in `ARBITER_GRID`) and the primary prediction is
            the answer from the modalities of the arm it picks.
    """

    name: str
    train: tuple[str, ...] = ()
    infer: tuple[str, ...] = ()
    search: dict[str, tuple] = field(default_factory=dict)
    arbiter: bool = False


AR_GRID: dict[str, tuple] = {"ar.strength": (0.0, 0.3, 0.6, 0.9), "ar.target_audio_share": (0.35, 0.5)}
"""AR's dev grid, one target share for every clip (strength 0 = AR off: the search may find that AR does not
help)."""
AR_PATHS_GRID: dict[str, tuple] = {"ar.strength": (0.0, 0.3, 0.6, 0.9), "ar.sample_sharpness": (1.0, 4.0),
                                   "ar.sample_confidence": ("max_prob", "reliability")}
"""Per-sample AR's dev grid (`ar.target_mode=paths`: each clip's target and strength from its unimodal paths;
needs DCR). "reliability" is left out for a run without reliability heads."""
ARBITER_GRID: dict[str, tuple] = SEARCH_GRID
"""The arbiter's dev grid (`ArbiterConfig` fields; `mllm_mer.fusion.dcr.ada.search_arbiter`, as
`scripts/fit_arbiter.py --search` runs it), scored by cross-fitting within dev over `CV_FOLDS` fixed
interleaved folds (the routed answer's accuracy; ties keep the earlier setting). "reliable" is left out for a
run without reliability heads."""

ANSWER_DROPOUT = "data.modality_dropout=0.2"
"""Training override of the arbiter rows (our choice, fixed before any run, not searched): their routed clips
are answered from one modality, so a fifth of their training batches keep only the audio or only the video
and the answer learns to come from one modality too. Without it the video-only answer disagreed with the
video head on about a fifth of the clips (it often named no emotion) while the audio-only answer never did.
Decided on a design set (`make_synthetic --seed 31`, not a set the README's main tables score), where plain
LoRA trained with it scored the same as without (README "Conflict testbed")."""

ROWS: tuple[Row, ...] = (
    Row("plain_lora"),
    Row("mose", train=("adapter=mose",)),
    Row("ar", infer=("ar.enabled=true",), search=AR_GRID),
    Row("mose_ar", train=("adapter=mose",), infer=("ar.enabled=true",), search=AR_GRID),
    Row("dcr", train=("dcr.enabled=true", ANSWER_DROPOUT), arbiter=True),
    Row("dnr", train=("dnr.enabled=true",)),
    Row("full", train=("adapter=mose", "dcr.enabled=true", "dnr.enabled=true", ANSWER_DROPOUT),
        infer=("ar.enabled=true", "ar.target_mode=paths"), search=AR_PATHS_GRID, arbiter=True),
)
BASELINE = "plain_lora"
PAIRED_KEY = f"paired_vs_{BASELINE}"
"""Where a row's paired differences against the baseline are kept (`paired_differences`)."""
CONFLICT_SUBSETS = ("video_aligned", "audio_aligned")
"""The subsets pooled into the conflict mean."""


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="folder with train/dev/test.jsonl (default: build the testbed set)")
    p.add_argument("--seed", type=int, default=0, help="the first training seed (train.seed)")
    p.add_argument("--seeds", help="comma-separated training seeds (default: --seed, --seed+1, --seed+2)")
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
    try:
        args.seed_list = ([int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds
                          else [args.seed, args.seed + 1, args.seed + 2])
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds {args.seeds!r}: give one or more distinct seeds")
    args.rows = [r for r in ROWS if r.name in names]
    return args


def default_config() -> Path:
    testbed = REPO / "configs" / "testbed.yaml"
    return testbed if testbed.is_file() else REPO / "configs" / "tiny_cpu.yaml"


def base_overrides(args: argparse.Namespace, data: Path, backbone: Path) -> list[str]:
    return [
        f"model.path={backbone}", "model.build_tiny=false", "data.synthetic_dir=null",
        f"data.train={data / 'train.jsonl'}", f"data.dev={data / 'dev.jsonl'}",
        f"train.max_steps={args.steps}", "train.log_every=1", "train.save_every=0", "train.torch_threads=1",
        *args.overrides,
    ]


def search_grid(row: Row, cfg: RunConfig) -> dict[str, tuple]:
    """The row's inference grid for a run with config `cfg`: per-sample AR's "reliability" confidence only
    when the run fits reliability heads (`DCRConfig.fits_reliability`)."""
    grid = dict(row.search)
    if "ar.sample_confidence" in grid and not cfg.dcr.fits_reliability:
        grid["ar.sample_confidence"] = tuple(v for v in grid["ar.sample_confidence"] if v != "reliability")
    return grid


def check_rows(config: Path, base: list[str], rows: Sequence[Row]) -> None:
    """Load every row's config (training overrides, inference overrides, each searched value) before any run.

    Raises:
        ConfigError: naming the row; an unknown key is an error like any other (no row is skipped).
    """
    for row in rows:
        try:
            grid = search_grid(row, load_config(config, [*base, *row.train]))
        except ConfigError as exc:
            raise ConfigError(exc.errors, f"row {row.name!r} of the ablation") from exc
        variants = [[]] + [[f"{k}={v}" for k, v in zip(grid, combo, strict=True)]
                           for combo in itertools.product(*grid.values())]
        for extra in variants:
            try:
                load_config(config, [*base, *row.train, *row.infer, *extra])
            except ConfigError as exc:
                raise ConfigError(exc.errors, f"row {row.name!r} of the ablation") from exc


# ----------------------------------------------------------------------------------------------- training
def train_run(config: Path, overrides: list[str], out_dir: Path) -> None:
    """Run scripts/finetune.py into `out_dir` (a previous harness run there is replaced)."""
    if out_dir.exists():
        if any(out_dir.iterdir()) and not (out_dir / "config.yaml").is_file():
            raise FileExistsError(f"{out_dir} exists and is not a run directory; choose another --workdir")
        shutil.rmtree(out_dir)
    cmd = [sys.executable, str(REPO / "scripts" / "finetune.py"), "--config", str(config), *overrides,
           f"train.output_dir={out_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def trained_parameters(run_dir: Path, buffers: set[str] = frozenset()) -> int:
    """Sum of numel over every tensor the run saved (top-level *.safetensors and adapter/, including the
    per-adapter subfolders peft writes for extra adapters such as DCR's adapter/dcr_<path>/), read lazily;
    saved tensors named in `buffers` (fitted, not trained by gradient, e.g. DCR's reliability heads) are
    left out."""
    files = sorted(run_dir.glob("*.safetensors")) + sorted((run_dir / "adapter").rglob("*.safetensors"))
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if key not in buffers:
                    total += int(np.prod(fh.get_slice(key).get_shape()))
    return total


def median_step_time(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    times = [r["step_time"] for r in rows if "step_time" in r]
    if not times:
        raise ValueError(f"{run_dir / 'train_log.jsonl'} has no step_time rows (train.log_every=1 expected)")
    return statistics.median(times[1:] if len(times) > 1 else times)


# ------------------------------------------------------------------------------------------------ scoring
def with_overrides(model: InferenceModel, run_dir: Path, overrides: Sequence[str]) -> InferenceModel:
    """The loaded model with inference overrides merged into its run's config (AR is read from it per batch)."""
    return dataclasses.replace(model, cfg=load_run_config(run_dir, list(overrides))) if overrides else model


def predict(model: InferenceModel, samples: Sequence[Sample], batch_size: int, **flags: bool) -> list[dict]:
    """`predict_rows` (flags: use_video / use_audio); the harness fits its own arbiter, so none is loaded."""
    return list(predict_rows(dataclasses.replace(model, arbiter=None), samples, batch_size=batch_size, **flags))


def path_labels(rows: Sequence[dict], arbiter: tuple[list[str], list[str]] | None) -> dict[str, list[str]]:
    """{path: predicted labels}: generated (the answer from both modalities), head (fused argmax) and, when
    an arbiter is fitted (`arbiter` = (its arm's head labels, the routed answers)), arbiter and
    arbiter_answer."""
    out = {"generated": [r["label"] for r in rows], "head": [r["head_label"] for r in rows]}
    if arbiter is not None:
        out["arbiter"], out["arbiter_answer"] = list(arbiter[0]), list(arbiter[1])
    return out


def subset_accuracy(samples: Sequence[Sample], preds: Sequence[str]) -> dict[str, float]:
    """Accuracy per subset (and "all")."""
    out = {}
    for subset in [*SUBSETS, "all"]:
        idx = [i for i, s in enumerate(samples) if subset == "all" or s.subset == subset]
        if idx:
            out[subset] = sum(preds[i] == samples[i].label for i in idx) / len(idx)
    return out


def fit_arbiter_on(rows: Sequence[dict], samples: Sequence[Sample], config: ArbiterConfig, labels: Sequence[str],
                   answers: dict[str, list[str]]):
    """The arbiter fitted on these rows' path probabilities, labels and (reward="answer") per-arm answers."""
    probs, y = arbiter_inputs(rows, {s.id: s.label for s in samples}, labels)
    arbiter = fit_arbiter(probs, y, config, answer_inputs(answers, labels) if config.reward == "answer" else None,
                          reliability_inputs(rows))
    return dataclasses.replace(arbiter, labels=tuple(labels))


def arbiter_choice(arbiter, rows: Sequence[dict], labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the arm the arbiter picks per row, that arm's head label), from the rows' path probabilities."""
    probs = {a: torch.tensor([[r["probs"][a][c] for c in labels] for r in rows], dtype=torch.float64)
             for a in ARMS}
    arms = arbiter.select(probs, reliability_inputs(rows))
    return arms, [max(r["probs"][arm], key=r["probs"][arm].get) for r, arm in zip(rows, arms, strict=True)]


def search_row(row: Row, model: InferenceModel, run_dir: Path, dev: Sequence[Sample], batch_size: int) -> dict:
    """Choose the row's knobs on dev (reads dev labels only): the inference grid by the primary prediction's
    dev accuracy, then (arbiter rows) the arbiter's settings by cross-fitted dev accuracy.

    Returns:
        {"chosen": {key: value}, "grid": [{"values", "dev_accuracy"}], "arbiter": {...} (arbiter rows)}.
    """
    out: dict = {"chosen": {}, "grid": []}
    best_rows, best_acc = None, -1.0
    search = search_grid(row, model.cfg)
    combos = list(itertools.product(*search.values())) if search else [()]
    for combo in combos:
        values = dict(zip(search, combo, strict=True))
        candidate = with_overrides(model, run_dir, [*row.infer, *(f"{k}={v}" for k, v in values.items())])
        rows = predict(candidate, dev, batch_size)
        acc = subset_accuracy(dev, [r["label"] for r in rows])["all"]
        if row.search:
            out["grid"].append({"values": values, "dev_accuracy": acc})
        if acc > best_acc:  # ties keep the earlier (weaker) setting
            best_rows, best_acc, out["chosen"] = rows, acc, values
    if row.arbiter:
        labels = list(model.cfg.data.labels)
        chosen_model = with_overrides(model, run_dir, [*row.infer, *(f"{k}={v}" for k, v in out["chosen"].items())])
        answers = answers_per_arm(chosen_model, dev, batch_size, best_rows)
        probs, y = arbiter_inputs(best_rows, {s.id: s.label for s in dev}, labels)
        config, records = search_arbiter(probs, y, model.cfg.dcr.arbiter, answer_inputs(answers, labels),
                                         reliability_inputs(best_rows), ARBITER_GRID, np.arange(len(dev)) % CV_FOLDS)
        grid = [{"values": r["values"], "cross_fitted_dev_accuracy": r["answer_accuracy"],
                 "cross_fitted_dev_accuracy_head": r["accuracy"]} for r in records]
        out["arbiter"] = {"grid": grid, "chosen": {k: getattr(config, k) for k in ARBITER_GRID}, "folds": CV_FOLDS}
    return out


def score_row(row: Row, model: InferenceModel, run_dir: Path, knobs: dict, dev: Sequence[Sample],
              test: Sequence[Sample], batch_size: int) -> dict:
    """Test predictions with the chosen knobs (arbiter rows: arbiter fitted on all of dev first)."""
    infer = [*row.infer, *(f"{k}={v}" for k, v in knobs["chosen"].items())]
    model = with_overrides(model, run_dir, infer)
    labels = list(model.cfg.data.labels)
    rows = predict(model, test, batch_size)
    routed = None
    if row.arbiter:
        config = dataclasses.replace(model.cfg.dcr.arbiter, **knobs["arbiter"]["chosen"])
        dev_rows = predict(model, dev, batch_size)
        arbiter = fit_arbiter_on(dev_rows, dev, config, labels, answers_per_arm(model, dev, batch_size, dev_rows))
        arms, heads = arbiter_choice(arbiter, rows, labels)
        routed = (heads, routed_answers(model, test, rows, arms, batch_size))
    paths = path_labels(rows, routed)
    primary = "arbiter_answer" if row.arbiter else "generated"
    preds = paths[primary]
    m = classification_metrics([s.label for s in test], preds, labels, [s.subset for s in test])
    dom = audio_dominance(preds, [s.cues.get("audio") for s in test], [s.cues.get("video") for s in test])
    return {
        "per_subset": {k: v["accuracy"] for k, v in m["per_subset"].items()},
        "weighted_f1": m["weighted_f1"],
        "audio_dominance": dom["index"],
        "by_path": {p: subset_accuracy(test, v) for p, v in paths.items()},
        "correct": {p: [int(a == s.label) for a, s in zip(v, test, strict=True)] for p, v in paths.items()},
        "primary_path": primary,
    }


def bootstrap_interval(correct: Sequence[Sequence[int]], rng: np.random.Generator) -> list[float]:
    """95% interval of the mean accuracy over seeds: (S, N) 0/1 per seed and clip; clips are resampled (the
    same draw for every seed)."""
    matrix = np.asarray(correct, dtype=float)
    n = matrix.shape[1]
    draws = rng.integers(0, n, size=(BOOTSTRAP_DRAWS, n))
    means = matrix[:, draws].mean(axis=(0, 2))
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_differences(row: dict, baseline: dict, test: Sequence[Sample], seed: int = 0) -> dict[str, dict]:
    """The row's primary prediction minus the baseline's on the same clips and seeds, as accuracy differences
    with a 95% paired bootstrap interval (clips resampled, the same draw for every seed and both rows).

    Args:
        row, baseline: `aggregate` results (their "correct": {seed: [0/1 per test clip]}).
        test: the test samples, in the order of "correct".
    Returns:
        {"conflict" (both conflict subsets pooled), "consistent", "video_aligned", "audio_aligned":
        {"difference", "ci"}} for the subsets present; empty when the rows share no seed.
    """
    seeds = [k for k in row["correct"] if k in baseline["correct"]]
    if not seeds:
        return {}
    ours = np.asarray([row["correct"][k] for k in seeds], float)  # (S, N)
    diff = ours - np.asarray([baseline["correct"][k] for k in seeds], float)
    groups = {"conflict": CONFLICT_SUBSETS, **{s: (s,) for s in SUBSETS}}
    rng = np.random.default_rng(seed)
    out = {}
    for name, subsets in groups.items():
        idx = [i for i, t in enumerate(test) if t.subset in subsets]
        if idx:
            d = diff[:, idx]
            out[name] = {"difference": float(d.mean()), "ci": bootstrap_interval(d, rng)}
    return out


def aggregate(row: Row, per_seed: list[dict], test: Sequence[Sample], seeds: Sequence[int]) -> dict:
    """Mean over seeds of the primary prediction's figures, with bootstrap intervals (per subset and for the
    conflict mean: both conflict subsets pooled); per-seed rows and per-clip correctness kept."""
    rng = np.random.default_rng(0)
    primary = per_seed[0]["primary_path"]
    per_subset, ci = {}, {}
    for subset in SUBSETS:
        idx = [i for i, s in enumerate(test) if s.subset == subset]
        if not idx:
            continue
        correct = [[r["correct"][primary][i] for i in idx] for r in per_seed]
        ci[subset] = bootstrap_interval(correct, rng)
        per_subset[subset] = {"accuracy": float(np.mean(correct)), "ci": ci[subset]}
    conflict = [i for i, s in enumerate(test) if s.subset in CONFLICT_SUBSETS]
    conflict_mean = None
    if conflict:  # both conflict subsets pooled (equal sizes on the testbed: their mean)
        correct = [[r["correct"][primary][i] for i in conflict] for r in per_seed]
        conflict_mean = {"accuracy": float(np.mean(correct)), "ci": bootstrap_interval(correct, rng)}
    doms = [r["audio_dominance"] for r in per_seed if r["audio_dominance"] is not None]
    by_path = {p: {k: float(np.mean([r["by_path"][p][k] for r in per_seed])) for k in per_seed[0]["by_path"][p]}
               for p in per_seed[0]["by_path"]}
    return {
        "config": row.name,
        "primary_path": primary,
        "per_subset": per_subset,
        "ci": ci,
        "conflict_mean": conflict_mean,
        "correct": {str(seed): r["correct"][primary] for seed, r in zip(seeds, per_seed, strict=True)},
        "weighted_f1": float(np.mean([r["weighted_f1"] for r in per_seed])),
        "audio_dominance": float(np.mean(doms)) if doms else None,
        "by_path": by_path,
        "seeds": [{"seed": s, **{k: v for k, v in r.items() if k != "correct"}}
                  for s, r in zip(seeds, per_seed, strict=True)],
    }


# ------------------------------------------------------------------------------------------------- driver
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


def run(args: argparse.Namespace, workdir: Path) -> dict:
    data, backbone = ensure_inputs(args)
    config = args.config or default_config()
    base = base_overrides(args, data, backbone)
    check_rows(config, base, args.rows)  # every config problem before the first run
    labels = load_config(config, base).data.labels
    dev = read_jsonl(data / "dev.jsonl", labels)
    test = read_jsonl(data / "test.jsonl", labels)
    searched: dict[str, dict] = {}
    per_seed: dict[str, list[dict]] = {r.name: [] for r in args.rows}
    step_times: dict[str, list[float]] = {r.name: [] for r in args.rows}
    params: dict[str, int] = {}
    for seed in args.seed_list:
        run_dirs: dict[tuple[str, ...], Path] = {}
        for row in args.rows:
            if row.train not in run_dirs:
                run_dir = workdir / f"seed{seed}" / (row.name if row.train else BASELINE)
                t0 = time.perf_counter()
                train_run(config, [*base, f"train.seed={seed}", *row.train], run_dir)
                print(f"seed {seed}: trained {row.name} ({args.steps} steps) in {time.perf_counter() - t0:.0f} s "
                      f"wall", flush=True)
                run_dirs[row.train] = run_dir
            run_dir = run_dirs[row.train]
            model = load_for_inference(run_dir=run_dir)
            if row.name not in searched:  # knobs: on dev, first seed only, before any test prediction
                searched[row.name] = search_row(row, model, run_dir, dev, args.batch_size)
            per_seed[row.name].append(score_row(row, model, run_dir, searched[row.name], dev, test, args.batch_size))
            step_times[row.name].append(median_step_time(run_dir) / median_step_time(run_dirs[()]))
            if row.name not in params:
                params[row.name] = trained_parameters(run_dir, {n for n, _ in model.mer.named_buffers()})
                declared = sum(t for t, _ in apply_trainable(model.mer, model.cfg).values())
                if params[row.name] != declared:
                    print(f"WARNING {row.name}: the run saved {params[row.name]:,} trained values but its "
                          f"trainable table counts {declared:,}; reporting the saved count", flush=True)
            del model
    results = []
    for row in args.rows:
        result = aggregate(row, per_seed[row.name], test, args.seed_list)
        result["knobs"] = searched[row.name]["chosen"] | (
            {f"dcr.arbiter.{k}": v for k, v in searched[row.name]["arbiter"]["chosen"].items()} if row.arbiter else {})
        result["trainable_params"] = params[row.name]
        result["step_time_ratio"] = float(statistics.median(step_times[row.name]))
        results.append(result)
    baseline = next(r for r in results if r["config"] == BASELINE)
    for result in results:
        if result is not baseline:
            result[PAIRED_KEY] = paired_differences(result, baseline, test)
    return {
        "rows": results,
        "search": searched,
        "seeds": list(args.seed_list),
        "fixed": {"train.max_steps": args.steps, "overrides": list(args.overrides), "config": str(config)},
        "data": str(data),
        "backbone": str(backbone),
        "test_clips_per_subset": {s: sum(t.subset == s for t in test) for s in SUBSETS},
    }


def format_table(rows: list[dict]) -> str:
    head = f"{'config':<11}{'primary':>15}" + "".join(f"{s:>22}" for s in SUBSETS)
    head += f"{'wF1':>7}{'audio_dom':>10}{'head v/a':>13}{'trainable':>11}{'step':>7}"
    lines = [head]
    for r in rows:
        cells = ""
        for s in SUBSETS:
            v = r["per_subset"].get(s)
            cells += f"{v['accuracy']:>8.3f} [{v['ci'][0]:.2f},{v['ci'][1]:.2f}]" if v else f"{'n/a':>22}"
        dom = "n/a" if r["audio_dominance"] is None else f"{r['audio_dominance']:.3f}"
        head_va = r["by_path"]["head"]
        hv = f"{head_va.get('video_aligned', float('nan')):.2f}/{head_va.get('audio_aligned', float('nan')):.2f}"
        lines.append(f"{r['config']:<11}{r['primary_path']:>15}{cells}{r['weighted_f1']:>7.3f}{dom:>10}{hv:>13}"
                     f"{r['trainable_params']:>11,}{r['step_time_ratio']:>6.2f}x")
    paired = [r for r in rows if r.get(PAIRED_KEY)]
    if paired:
        lines.append(f"paired against {BASELINE} (points, 95% bootstrap over clips): conflict mean / consistent")
        for r in paired:
            d = r[PAIRED_KEY]
            lines.append(f"  {r['config']:<11}" + " / ".join(
                f"{100 * d[k]['difference']:+.1f} [{100 * d[k]['ci'][0]:+.1f}, {100 * d[k]['ci'][1]:+.1f}]"
                for k in ("conflict", "consistent") if k in d))
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: Path) -> Path:
    """Grouped bars with 95% intervals: per-subset accuracy of the primary prediction (one group per config)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 3.6))
    width = 0.8 / len(SUBSETS)
    for j, subset in enumerate(SUBSETS):
        xs = [i + (j - (len(SUBSETS) - 1) / 2) * width for i in range(len(rows))]
        acc = [r["per_subset"].get(subset, {}).get("accuracy", 0.0) for r in rows]
        lo = [a - r["per_subset"].get(subset, {}).get("ci", [a, a])[0] for a, r in zip(acc, rows, strict=True)]
        hi = [r["per_subset"].get(subset, {}).get("ci", [a, a])[1] - a for a, r in zip(acc, rows, strict=True)]
        ax.bar(xs, acc, width, yerr=[lo, hi], capsize=2, label=subset)
    ax.set_xticks(range(len(rows)), [r["config"] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy (answer)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.process_time()
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
    report["elapsed_s"] = {"wall": time.perf_counter() - start, "harness_cpu": time.process_time() - cpu}
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = plot_rows(report["rows"], out.with_suffix(".png"))
    print(format_table(report["rows"]))
    print(f"seeds {report['seeds']}; knobs chosen on dev: "
          + "; ".join(f"{r['config']}: {r['knobs']}" for r in report["rows"] if r["knobs"]))
    print(f"wrote {out} and {png} ({report['elapsed_s']['wall']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
