"""Stage-0 of the conflict testbed: train the whole tiny thinker into a small emotion MLLM that explains.

    python scripts/pretrain_tiny.py [--root .cache/mllm_mer] [--seed 0] [key.path=value ...]
    python scripts/pretrain_tiny.py --ship          # also (re)write the shipped copy in mllm_mer/resources/stage0

Builds the stage-0 synthetic set (`mllm_mer.testbed.STAGE0_DATA`) and the random tiny thinker of
`STAGE0_SPEC` (4 text layers), trains all weights with `configs/pretrain_tiny.yaml` through the same loop
as scripts/finetune.py, once per phase of `STAGE0_PHASES` (label prompt on single-modality batches, then
the `explain` prompt; each phase starts from the previous one's export), and exports the thinker +
processor to `<root>/stage0-<key>/backbone` (a normal checkpoint directory for `load_backbone`), with
`stage0.json` beside it (wall and CPU seconds, load average, final dev metrics per phase). Skips
everything when that directory already exists. Overrides (applied to every phase, after the phase's
own) change the key. The last line printed is the backbone directory.

The package ships the backbone of the default recipe and seed 0 (`mllm_mer.backbone.stage0`:
`mllm_mer/resources/stage0/`, written by `--ship` with its provenance: recipe key, versions, CPU time, dev
metrics, file hashes); `configs/tiny_cpu.yaml` fine-tunes on it.

Importable (scripts/ is not installed: put it on `sys.path`): `ensure_stage0_backbone(root, seed)` returns
the cached backbone: the shipped copy when its recipe key is this recipe's, else this script run in a child
process (`bench/conflict_ablation.py` does so); `backbone_dir` says where it is cached.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune import train  # noqa: E402  (the one training loop)

import mllm_mer  # noqa: E402
from mllm_mer.backbone.stage0 import SHIPPED_STAGE0, backbone_hashes, install_stage0  # noqa: E402
from mllm_mer.backbone.tiny import ensure_tiny_thinker  # noqa: E402
from mllm_mer.config import load_config  # noqa: E402
from mllm_mer.data.synthetic import ensure_synthetic_set  # noqa: E402
from mllm_mer.testbed import (  # noqa: E402
    STAGE0_DATA,
    STAGE0_PHASES,
    STAGE0_SPEC,
    export_backbone,
    stage0_dir,
    stage0_key,
)

REPO = Path(__file__).resolve().parent.parent
PRETRAIN_CONFIG = REPO / "configs" / "pretrain_tiny.yaml"
"""The stage-0 training config (the `explain` phase; `STAGE0_PHASES` adds each phase's overrides)."""


def backbone_dir(root: str | Path = ".cache/mllm_mer", seed: int = 0, overrides: list[str] | tuple = ()) -> Path:
    """Where the stage-0 backbone of this config, seed and overrides is (or will be) cached."""
    return stage0_dir(PRETRAIN_CONFIG.read_text(), root, seed, overrides) / "backbone"


def ensure_stage0_backbone(root: str | Path = ".cache/mllm_mer", seed: int = 0) -> Path:
    """The cached stage-0 backbone directory, running this script first (in a child process) if missing.

    For the benches and scripts that need the testbed backbone (`bench/conflict_ablation.py`).

    Raises:
        RuntimeError: stage-0 training failed (its output is included).
    """
    backbone = backbone_dir(root, seed)
    if (backbone / "config.json").is_file():
        return backbone
    if shipped_matches(seed):  # the shipped copy is this recipe's result: no need to train
        install_stage0(backbone)
        shutil.copy2(SHIPPED_STAGE0 / "stage0.json", backbone.parent / "stage0.json")
        return backbone
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--root", str(root), "--seed", str(seed)],
        capture_output=True, text=True, cwd=REPO,
    )
    if proc.returncode != 0 or not (backbone / "config.json").is_file():
        raise RuntimeError(f"stage-0 pretraining failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return backbone


def shipped_matches(seed: int = 0, overrides: list[str] | tuple = ()) -> bool:
    """Whether the shipped stage-0 backbone was made by this recipe, seed and overrides (same key)."""
    info_file = SHIPPED_STAGE0 / "stage0.json"
    if overrides or not info_file.is_file():
        return False
    return json.loads(info_file.read_text()).get("key") == stage0_key(PRETRAIN_CONFIG.read_text(), seed)


def ship(out: Path, seed: int) -> Path:
    """Write the built backbone `out/backbone` and its provenance to `mllm_mer/resources/stage0`."""
    import torch
    import transformers

    info = json.loads((out / "stage0.json").read_text())
    provenance = {
        "key": stage0_key(PRETRAIN_CONFIG.read_text(), seed),
        "seed": seed,
        "command": f"python scripts/pretrain_tiny.py --seed {seed}",
        "made_with": {"mllm_mer": mllm_mer.__version__, "torch": torch.__version__,
                      "transformers": transformers.__version__},
        "license": "Apache-2.0 (trained from scratch by this project on its own synthetic clips)",
        **{k: info[k] for k in ("cpu_seconds", "wall_seconds", "phases", "data", "overrides")},
        "dev": {phase: {k: v for k, v in m.items() if k != "confusion"} for phase, m in info["dev"].items()},
        "files": backbone_hashes(out / "backbone"),
    }
    tmp = SHIPPED_STAGE0.with_name(SHIPPED_STAGE0.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out / "backbone", tmp / "backbone")
    (tmp / "stage0.json").write_text(json.dumps(provenance, indent=1) + "\n")
    shutil.rmtree(SHIPPED_STAGE0, ignore_errors=True)
    os.replace(tmp, SHIPPED_STAGE0)
    return SHIPPED_STAGE0


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (data workers, encoders)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".cache/mllm_mer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ship", action="store_true",
                   help="also write the backbone and its provenance to mllm_mer/resources/stage0 (default recipe)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    root = Path(args.root)
    out = backbone_dir(root, args.seed, args.overrides).parent
    if args.ship and args.overrides:
        p.error("--ship writes the package's stage-0 backbone: only the default recipe (no overrides)")
    if (out / "backbone" / "config.json").is_file():
        print(f"stage-0 backbone already built in {out}")
        if args.ship and (out / "stage0.json").is_file():
            print(f"shipped to {ship(out, args.seed)}")
        print(out / "backbone")
        return 0
    start, start_cpu = time.time(), cpu_seconds()
    data = ensure_synthetic_set(root / "stage0_data", STAGE0_DATA, workers=min(2, os.cpu_count() or 1))
    model = ensure_tiny_thinker(out / "init", STAGE0_SPEC)  # the random twin stage 0 starts from
    dev: dict[str, dict] = {}
    for name, phase_overrides in STAGE0_PHASES:
        run = out / f"run_{name}"
        for stale in (run, out / name):  # left by an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        cfg = load_config(PRETRAIN_CONFIG, [
            f"model.path={model}", "model.build_tiny=false", f"data.train={data / 'train.jsonl'}",
            f"data.dev={data / 'dev.jsonl'}", f"train.output_dir={run}", f"train.seed={args.seed}",
            f"data.cache_dir={root / 'decoded'}", *phase_overrides, *args.overrides,
        ])
        dev[name] = train(cfg)["dev"]
        model = export_backbone(run, out / name)
        shutil.rmtree(run, ignore_errors=True)
    for name, _ in STAGE0_PHASES[:-1]:
        shutil.rmtree(out / name)
    shutil.rmtree(out / "init")
    os.replace(model, out / "backbone")
    info = {
        "wall_seconds": round(time.time() - start, 1), "cpu_seconds": round(cpu_seconds() - start_cpu, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()], "dev": dev,
        "phases": [[name, list(o)] for name, o in STAGE0_PHASES], "data": STAGE0_DATA.to_dict(),
        "overrides": args.overrides,
    }
    (out / "stage0.json").write_text(json.dumps(info, indent=2))
    print(f"stage-0 backbone built in {info['wall_seconds']} s wall, {info['cpu_seconds']} s CPU "
          f"(load average {info['load_average'][0]})")
    if args.ship:
        print(f"shipped to {ship(out, args.seed)}")
    print(out / "backbone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
