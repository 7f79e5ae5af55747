"""Start-up of a training process: keep optional packages the run does not use out of the process.

peft imports bitsandbytes at import time whenever it is installed (the `qlora` extra), and bitsandbytes
registers its CPU kernels through `torch.compile`, which imports torch's dynamo and inductor: about 1-2 s of
CPU per process (per rank under DDP) before the run has read its config. A run with
`model.quantization: none` never calls bitsandbytes, so `scripts/finetune.py` reads the config first (the
config module is torch-free) and, for such a run, marks bitsandbytes as absent (`sys.modules[name] = None`,
Python's own way to block an import). peft and transformers then see it as not installed
(`importlib.util.find_spec` returns None for it), exactly as in an install without the `qlora` extra.

Only the scripts call this, before their first heavy import; the library never blocks anything by itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mllm_mer.config import load_config

UNUSED_WITHOUT_QUANTIZATION: tuple[str, ...] = ("bitsandbytes",)
"""Packages a run with `model.quantization: none` never imports on purpose."""


def skip_unused_imports(argv: Sequence[str], default_config: str | Path) -> list[str]:
    """Block the packages the run described by `argv` does not use (see the module docstring).

    Args:
        argv: the script's arguments (`--config PATH` and `key.path=value` overrides are read, every other
            flag is ignored).
        default_config: the script's config when `--config` is not given.
    Returns:
        The module names blocked (empty when the config asks for quantization, when a package is already
        imported, or when the config does not load: the script then reports that error itself).
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=str(default_config))
    args, rest = parser.parse_known_args(list(argv))
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    try:
        cfg = load_config(args.config, overrides)
    except Exception:  # noqa: BLE001 - the script loads the config again and reports the error properly
        return []
    if cfg.model.quantization != "none":
        return []
    blocked = [name for name in UNUSED_WITHOUT_QUANTIZATION if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # import -> ImportError; find_spec -> None
    return blocked
