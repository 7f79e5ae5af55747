"""Trainable / total parameters of each method configuration on the real Qwen2.5-Omni-3B and -7B thinkers.

    python bench/trainable_share.py
    python bench/trainable_share.py lora.r=16 mose.experts=8          # any config override

The thinkers are built on the meta device (no memory, no weights) from the published architecture values
shipped in `configs/model_configs/` (`qwen2_5_omni_{3b,7b}_thinker.json`), then wrapped exactly as
`scripts/finetune.py` wraps them (`build_mer_model` + `apply_trainable`, the defaults of
`configs/tiny_cpu.yaml` plus the overrides) for each method configuration:

    lora   plain LoRA + fused head          mose   MoSE experts + fused head
    dnr    LoRA + DnR heads                 dcr    LoRA + DCR path adapters and heads
    full   MoSE + DnR + DCR

Total = every parameter of the wrapped model (frozen thinker + adapters + heads). Prints one JSON line and a
table, then the full-stack shares as the last line (goal: <= 1%).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

from mllm_mer.backbone.loader import Backbone
from mllm_mer.config import load_config
from mllm_mer.model import build_mer_model
from mllm_mer.trainable import apply_trainable

REPO = Path(__file__).resolve().parent.parent
MODELS = {"3B": "qwen2_5_omni_3b_thinker.json", "7B": "qwen2_5_omni_7b_thinker.json"}
METHODS: dict[str, tuple[str, ...]] = {
    "lora": (),
    "mose": ("adapter=mose",),
    "dnr": ("dnr.enabled=true",),
    "dcr": ("dcr.enabled=true",),
    "full": ("adapter=mose", "dnr.enabled=true", "dcr.enabled=true"),
}


def share(config_file: Path, overrides: list[str]) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """(trainable, total, per-part counts) of one method configuration on one thinker, built on meta."""
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [*overrides, "model.build_tiny=false"])
    config = Qwen2_5OmniThinkerConfig.from_json_file(str(config_file))
    with torch.device("meta"):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config)
        thinker.requires_grad_(False)
        model = build_mer_model(
            Backbone(model=thinker, processor=None, token_ids=None, path=str(config_file)), cfg
        )
    counts = apply_trainable(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total, counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key.path=value")
    args = p.parse_args()
    results: dict[str, dict[str, dict]] = {}
    for size, name in MODELS.items():
        for method, extra in METHODS.items():
            trainable, total, counts = share(
                REPO / "configs" / "model_configs" / name, [*args.overrides, *extra]
            )
            results.setdefault(size, {})[method] = {
                "trainable": trainable,
                "total": total,
                "share": trainable / total,
                "trainable_by_part": {part: t for part, (t, _) in counts.items() if t},
            }
    print(json.dumps({"bench": "trainable_share", "overrides": args.overrides, "results": results}))
    print(f"{'method':<8}" + "".join(f"{size + ' trainable':>18}{size + ' share':>10}" for size in MODELS))
    for method in METHODS:
        row = "".join(
            f"{results[s][method]['trainable']:>18,}{results[s][method]['share']:>10.3%}" for s in MODELS
        )
        print(f"{method:<8}{row}")
    full = ", ".join(f"{s} {results[s]['full']['share']:.3%}" for s in MODELS)
    print(f"trainable share (trainable / total parameters), full stack MoSE+DnR+DCR: {full}")


if __name__ == "__main__":
    main()
