"""The one place that decides what trains, and the start-up table of parameter counts per part.

Rules: every backbone weight is frozen unless its part is unfrozen in `model.freeze`; adapter weights
(peft `lora_`, MoSE `mose_`) and head weights (`fusion_`) always train. `apply_trainable` sets `requires_grad` on every
parameter of the model, so nothing else in the package needs to. Exception: with `dnr.stage: refine` the DnR
Divide heads (`fusion_dnr.divide.*`, `DnRConfig.frozen_prefixes`) stay frozen.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from mllm_mer.backbone.families import backbone_part
from mllm_mer.config import RunConfig

PARTS = (
    "lora", "mose", "heads", "language_model", "audio_tower", "audio_projector", "vision_tower", "vision_projector",
)


def part_of(name: str) -> str:
    """Which part a parameter belongs to, from its full name in MerModel."""
    if ".lora_" in name:
        return "lora"
    if ".mose_" in name:
        return "mose"
    if name.startswith("fusion_"):
        return "heads"
    part = backbone_part(name)  # towers, projectors, language model: per family (mllm_mer.backbone.families)
    if part is not None:
        return part
    raise ValueError(f"parameter {name!r} belongs to no known part; update mllm_mer.trainable.part_of")


def apply_trainable(model: nn.Module, cfg: RunConfig) -> dict[str, tuple[int, int]]:
    """Set `requires_grad` on every parameter of `model` (a MerModel) and return the counts.

    Returns:
        {part: (trainable, total)} in `PARTS` order (parts with no parameters omitted).
    """
    frozen = cfg.model.freeze
    unfrozen = {
        "lora": True,
        "mose": True,
        "heads": True,
        "language_model": not frozen.language_model,
        "audio_tower": not frozen.audio_tower,
        "audio_projector": not frozen.audio_projector,
        "vision_tower": not frozen.vision_tower,
        "vision_projector": not frozen.vision_projector,
    }
    held = cfg.dnr.frozen_prefixes()  # heads kept frozen: DnR's Divide heads in dnr.stage=refine
    counts: dict[str, list[int]] = OrderedDict((p, [0, 0]) for p in PARTS)
    for name, param in model.named_parameters():
        part = part_of(name)
        train = unfrozen[part] and not (held and name.startswith(held))
        param.requires_grad_(train)
        counts[part][1] += param.numel()
        if train:
            counts[part][0] += param.numel()
    return {p: (t, n) for p, (t, n) in counts.items() if n}


def format_trainable_table(counts: dict[str, tuple[int, int]]) -> str:
    """A plain-text table: part, trainable, total, share."""
    lines = [f"{'part':<18}{'trainable':>14}{'total':>14}{'share':>9}"]
    tt = tn = 0
    for part, (t, n) in counts.items():
        lines.append(f"{part:<18}{t:>14,}{n:>14,}{(t / n if n else 0):>9.2%}")
        tt, tn = tt + t, tn + n
    lines.append(f"{'all':<18}{tt:>14,}{tn:>14,}{(tt / tn if tn else 0):>9.2%}")
    return "\n".join(lines)
