"""Value checks shared by every config section (imports nothing heavy: `mllm_mer.config` stays torch-free).

Each section dataclass lists its numeric ranges once and reports every violation as one line naming the
dotted key, the value and the allowed range, e.g. `train.lr=-1.0 is out of range [0, inf]`.
"""

from __future__ import annotations

Range = tuple[float | None, float | None]
"""(low, high), both inclusive; None = unbounded on that side."""


def range_problems(section: str, obj: object, ranges: dict[str, Range]) -> list[str]:
    """One line per field of `obj` whose numeric value lies outside its range in `ranges`.

    Args:
        section: the dotted prefix of the fields, e.g. "train" (the message names "train.lr").
        obj: the config dataclass instance.
        ranges: {field name: (low, high)}; fields holding None or a non-number are skipped.
    """
    errors = []
    for name, (lo, hi) in ranges.items():
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            errors.append(f"{section}.{name}={value!r} is out of range {rng}")
    return errors
