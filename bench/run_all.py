"""Run every speed / size benchmark and write their figures to bench/RESULTS.md (the file the README links).

    python bench/run_all.py                          # every bench at its own defaults
    python bench/run_all.py --quick                  # one short round each: checks they run, figures are rough
    python bench/run_all.py --only cache_speedup,trainable_share --output /tmp/RESULTS.md

Each bench runs in its own process (torch threads 1, the tiny thinker and synthetic set built on first use)
and prints one JSON line and a headline as its last line; both, and the rest of its output (e.g. a table), are
copied into the file unchanged, with the exact command and the bench's CPU time (user + sys of its process, from `resource`). The header records the
date, the machine (CPU model, cores, memory), the Python / torch / transformers versions and the git commit.
Nothing in RESULTS.md is typed by hand: rerun this script to refresh it. The conflict ablation
(`bench/conflict_ablation.py`) is not part of it: it trains every method row and writes its own report.
A bench that fails is recorded with its exit code and the end of its output; the script then exits with 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    name: str
    args: tuple[str, ...]
    """Arguments of a full run (the bench's defaults unless listed)."""
    quick: tuple[str, ...]
    """Arguments of a `--quick` run (one short round)."""
    what: str


BENCHES: tuple[Bench, ...] = (
    Bench("cache_speedup", (), ("--samples", "4", "--rounds", "1", "--clips", "config"),
          "training-epoch CPU time: no cache / decode cache / warm frozen-encoder cache (camera-sized clips; --quick: the toy clips)"),
    Bench("stack_overhead", (), ("--rounds", "1", "--batch-size", "2"),
          "training-step CPU time of MoSE, DnR, DCR and all together / plain LoRA"),
    Bench("ar_overhead", (), ("--rounds", "2", "--new-tokens", "8"),
          "generation CPU time with / without attention reallocation"),
    Bench("trainable_share", (), (),
          "trainable / total parameters of every method on the real 3B and 7B architectures (meta device)"),
    Bench("gpu_step", (), (),
          "7B training step on one GPU, LoRA vs QLoRA (prints a skip line without CUDA)"),
)


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        mem = "unknown"
    import torch
    import transformers

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical cores", "memory": mem, "gpu": cuda,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "os": platform.platform(),
    }


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}{' (with uncommitted changes)' if dirty else ''}" if sha else "unknown"


def run(bench: Bench, quick: bool) -> dict:
    """Run one bench; its command, exit code, CPU and wall seconds, JSON line and last line."""
    cmd = [sys.executable, str(REPO / "bench" / f"{bench.name}.py"), *(bench.quick if quick else bench.args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = proc.stdout.strip().splitlines()
    shown = ["python", str(Path("bench") / f"{bench.name}.py"), *(bench.quick if quick else bench.args)]
    return {
        "bench": bench, "command": shlex.join(shown), "returncode": proc.returncode, "cpu_s": cpu, "wall_s": wall,
        "json": next((line for line in lines if line.startswith("{")), None),
        "headline": lines[-1] if lines else "",
        "output": [line for line in lines if not line.startswith("{")][-40:],
        "tail": (proc.stdout[-1500:] + proc.stderr[-2500:]) if proc.returncode else "",
    }


def render(results: list[dict], quick: bool, started: str) -> str:
    """RESULTS.md: header (command, date, machine, commit), one table row per bench, then each JSON line."""
    argv = shlex.join(["python", "bench/run_all.py", *sys.argv[1:]])
    total = sum(r["cpu_s"] for r in results)
    out = [
        "# Benchmark results",
        "",
        f"Written by `{argv}` (do not edit by hand: rerun it). Started {started}; the benches took "
        f"{total / 60:.1f} CPU minutes in all{' (--quick: one short round each, rough figures)' if quick else ''}.",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine().items()],
        f"| commit | {git_commit()} |",
        "",
        "Each bench's docstring says what it measures and how (side by side in one process, CPU time, median "
        "over rounds). The headline is the bench's last line.",
        "",
        "| bench | what | headline | CPU s | command |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        head = r["headline"] if r["returncode"] == 0 else f"FAILED (exit {r['returncode']})"
        out.append(f"| `{r['bench'].name}` | {r['bench'].what} | {head} | {r['cpu_s']:.0f} | `{r['command']}` |")
    out += ["", "## Each bench's output", ""]
    for r in results:
        out += [f"### {r['bench'].name}", "", "```", *r["output"], "```", "", "```json"]
        out.append(json.dumps(json.loads(r["json"]), indent=1) if r["json"] else "(no JSON line)")
        out += ["```", ""]
        if r["tail"]:
            out += ["Output of the failed run:", "", "```", r["tail"], "```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one short round per bench")
    p.add_argument("--only", help="comma-separated bench names (default: all)")
    p.add_argument("--output", default=str(REPO / "bench" / "RESULTS.md"))
    args = p.parse_args(argv)
    names = [b.name for b in BENCHES]
    wanted = args.only.split(",") if args.only else names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        p.error(f"unknown bench(es) {unknown}; valid: {names}")
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    results = []
    for bench in (b for b in BENCHES if b.name in wanted):
        print(f"running {bench.name} ...", flush=True)
        r = run(bench, args.quick)
        print(f"  {r['headline'] if r['returncode'] == 0 else 'FAILED'} ({r['cpu_s']:.0f} CPU s)", flush=True)
        results.append(r)
    out = Path(args.output)
    out.write_text(render(results, args.quick, started) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
