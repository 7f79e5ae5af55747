"""The one place that decides what trains, and the start-up table of parameter counts per part.

Rules: every backbone weight is frozen unless its part is unfrozen in `model.freeze`; the weights of the
active methods' adapters (each method's `param_marker`, e.g. peft's `.lora_`, MoSE's `.mose_`) and every head
(`fusion_*`) always train, except the prefixes a method keeps frozen (`Method.frozen_prefixes`, e.g. DnR's
Divide heads in `dnr.stage: refine`). `apply_trainable` sets `requires_grad` on every parameter of the model,
so nothing else in the package needs to.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mllm_mer import model as mer_model
from mllm_mer.backbone.families import BACKBONE_PARTS, backbone_part
from mllm_mer.config import RunConfig
from mllm_mer.methods import Method

HEADS = "heads"


def parts(methods: Sequence[Method] | None = None) -> tuple[str, ...]:
    """Table order: the methods that own backbone parameters (default: every method of
    `mllm_mer.model.METHODS`), then heads, then the backbone's parts."""
    methods = mer_model.METHODS if methods is None else methods
    return (*(m.name for m in methods if m.param_marker), HEADS, *BACKBONE_PARTS)


def part_of(name: str, methods: Sequence[Method] | None = None) -> str:
    """Which part a parameter belongs to, from its full name in MerModel (`methods`: those that may own it,
    default every method of `mllm_mer.model.METHODS`)."""
    for m in mer_model.METHODS if methods is None else methods:
        if m.param_marker and m.param_marker in name:
            return m.name
    if name.startswith("fusion_"):
        return HEADS
    part = backbone_part(name)  # towers, projectors, language model: per family (mllm_mer.backbone.families)
    if part is not None:
        return part
    raise ValueError(f"parameter {name!r} belongs to no known part (no method's param_marker, not a head, not "
                     "a backbone part of mllm_mer.backbone.families)")


def apply_trainable(model: nn.Module, cfg: RunConfig) -> dict[str, tuple[int, int]]:
    """Set `requires_grad` on every parameter of `model` (a MerModel) and return the counts.

    Returns:
        {part: (trainable, total)} in `parts()` order (parts with no parameters omitted).
    """
    methods = getattr(model, "methods", None) or mer_model.active_methods(cfg)
    frozen = cfg.model.freeze
    unfrozen = {m.name: True for m in methods} | {HEADS: True}
    unfrozen |= {p: not getattr(frozen, p) for p in BACKBONE_PARTS}
    held = tuple(p for m in methods for p in m.frozen_prefixes(cfg))
    counts: dict[str, list[int]] = {p: [0, 0] for p in parts(methods)}
    for name, param in model.named_parameters():
        part = part_of(name, methods)
        train = unfrozen.get(part, False) and not (held and name.startswith(held))
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
