"""Export a finished run: merged thinker checkpoint (plain LoRA) or base reference + adapters, plus a model card.

    python scripts/export.py --run runs/tiny_cpu --out exports/tiny_cpu

The merged directory loads with plain transformers (`Qwen2_5OmniThinkerForConditionalGeneration`, or
`Qwen3OmniMoeThinkerForConditionalGeneration` for a Qwen3-Omni run, and `AutoProcessor`) and therefore
with vLLM; `mllm_mer/` inside it keeps the parts that need mllm_mer
(heads, MoSE, arbiter, ...), listed in README.md (the model card) and mllm_mer/export.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from mllm_mer.export import export_run
from mllm_mer.logs import run_output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="finished run directory")
    p.add_argument("--out", required=True, help="new output directory")
    p.add_argument("--verbose", action="store_true", help="every library's log and warning (mllm_mer.logs)")
    args = p.parse_args(argv)
    try:
        with run_output(args.verbose):  # what other libraries may print; restored on exit
            summary = export_run(args.run, args.out)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
