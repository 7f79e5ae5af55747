"""What a run prints: our own progress bars, metric lines and warnings that ask the user to act; everything
else only on demand.

Scripts wrap their work in `run_output(verbose)`, the ONE place that decides what other libraries may print,
and every setting it changes is restored on exit (the library never changes another library's settings
outside it):

- quiet (default): the `mllm_mer` loggers print warnings; the root logger, `transformers` / `datasets`
  progress bars and log levels stay as they were, except that `transformers`' own progress bars (e.g.
  "Writing model shards" of the tiny builder) are off inside the block; the third-party warnings in
  `KNOWN_NOISE` are ignored inside a `warnings.catch_warnings()` block and the log records in `LOG_NOISE`
  dropped by a filter on their logger (each entry says why it is noise).
- verbose (`--verbose`, `train.verbose=true`): no warning filter, the root logger and `transformers` at INFO,
  `mllm_mer` at INFO: accelerate's save lines, the loader's timing lines and every library warning return.

`progress` (a tqdm bar on the main process only), `say` (one line on the main process, printed above any
active bar) and `datasets_bars_off` (the `datasets` bars off inside one call, restored after) are what the
library's long phases use. Noise fixed at its cause is not listed here: decoded frames are copied once into
writable arrays (`mllm_mer.data.dataset.MerDataset`), and the README's launch passes
`configs/accelerate/single.yaml` (no "values not passed" banner from `accelerate launch`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

PACKAGE_LOGGER = "mllm_mer"


@dataclass(frozen=True)
class Noise:
    """A third-party warning that asks nothing of our users (ignored in quiet runs only)."""

    category: type[Warning]
    message: str
    """Regex matched against the start of the warning text (`warnings.filterwarnings`)."""
    why: str


KNOWN_NOISE: tuple[Noise, ...] = (
    Noise(FutureWarning, r"`is_gradient_checkpointing` is deprecated",
          "peft 0.21 reads `model.is_gradient_checkpointing` in PeftModel.__init__ (peft_model.py), a property "
          "transformers 5.23 deprecated; nothing for the user to change"),
)
"""Warnings ignored inside a quiet `run_output` block, each with the reason it is noise."""


@dataclass(frozen=True)
class LogNoise:
    """A third-party log record that asks nothing of our users (dropped in quiet runs only)."""

    logger: str
    message: str
    """Start of the record's message."""
    why: str


LOG_NOISE: tuple[LogNoise, ...] = (
    LogNoise("DeepSpeed", "Setting accelerator to CPU",
             "deepspeed (when installed) is imported by accelerate's unwrap_model (a DeepSpeedEngine check) and "
             "guesses its accelerator; on a CPU run CPU is right (DS_ACCELERATOR=cpu says so up front)"),
)
"""Log records dropped inside a quiet `run_output` block (a filter on the named logger, removed on exit)."""


class _DropNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def main_process() -> bool:
    """True on rank 0 of an `accelerate launch` / `torchrun` job, or in a single process (reads `RANK`, which
    both set; no distributed state is touched)."""
    return os.environ.get("RANK", "0") == "0"


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str, unit: str = "it",
             leave: bool = True, enabled: bool = True) -> tqdm:
    """A progress bar over `iterable` on the main process only (a no-op bar elsewhere, or with `enabled=False`).

    Args:
        iterable: what to iterate (None: update the bar by hand, e.g. `bar.update(1)`).
        total: number of items when `iterable` has no length.
        desc: the phase, shown left of the bar (e.g. "decode media").
        unit: what one item is (e.g. "clip").
        leave: keep the finished bar on screen (False: it disappears, e.g. dev evaluation inside training).
        enabled: False disables the bar (e.g. a caller's `progress=False`).
    """
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                disable=not (enabled and main_process()))


def say(message: str) -> None:
    """Print one line on the main process, above any active progress bar (stdout)."""
    if main_process():
        tqdm.write(message, file=sys.stdout)


@contextmanager
def datasets_bars_off() -> Iterator[None]:
    """The `datasets` progress bars off inside the block (our own bar reports the phase); their previous
    state is restored after, so code running later still sees its own setting."""
    import datasets

    if datasets.are_progress_bars_disabled() or os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") is not None:
        yield  # already off, or the environment decides (the variable wins over code)
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


@contextmanager
def _transformers_output(verbose: bool) -> Iterator[None]:
    """transformers at INFO (verbose) or its progress bars off (quiet) inside the block; restored after."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    if verbose:
        tlog.set_verbosity_info()
    elif bars:
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars and not tlog.is_progress_bar_enabled():
            tlog.enable_progress_bar()


@contextmanager
def _logger_level(logger: logging.Logger, level: int, handler: logging.Handler | None = None,
                  propagate: bool | None = None) -> Iterator[None]:
    """`logger` at `level` (optionally with `handler` and `propagate`) inside the block; restored after."""
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(level)
    if handler is not None:
        logger.addHandler(handler)
    if propagate is not None:
        logger.propagate = propagate
    try:
        yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


@contextmanager
def _logger_filter(logger: logging.Logger, drop: logging.Filter) -> Iterator[None]:
    """`drop` filters `logger`'s records inside the block; removed after."""
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextmanager
def run_output(verbose: bool = False, main: bool | None = None) -> Iterator[None]:
    """What a script's run prints (see the module docstring); every change is undone on exit.

    Args:
        verbose: everything (all library logs at INFO, no warning filter) instead of the quiet default.
        main: this process is the main one (None: `main_process()`); other ranks print warnings only.
    """
    main = main_process() if main is None else main
    with ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())  # restores warnings.filters and showwarning on exit
        if not verbose:
            for noise in KNOWN_NOISE:
                warnings.filterwarnings("ignore", message=noise.message, category=noise.category)
        stack.enter_context(_transformers_output(verbose and main))
        if not verbose:
            for name in dict.fromkeys(n.logger for n in LOG_NOISE):
                stack.enter_context(_logger_filter(logging.getLogger(name), _DropNoise(
                    tuple(n.message for n in LOG_NOISE if n.logger == name))))
        ours = logging.StreamHandler(sys.stderr)
        ours.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        level = logging.INFO if (verbose and main) else logging.WARNING
        if verbose and main:  # every library's INFO (accelerate's checkpoint lines, ...) through the root
            root = logging.getLogger()
            stack.enter_context(_logger_level(root, logging.INFO, ours))
            stack.enter_context(_logger_level(logging.getLogger(PACKAGE_LOGGER), level))
        else:
            stack.enter_context(_logger_level(logging.getLogger(PACKAGE_LOGGER), level, ours, propagate=False))
        yield


def library_state() -> dict[str, Any]:
    """The output settings `run_output` may touch, for tests that check nothing leaks after a run:
    warning filters, the root / `mllm_mer` / accelerate loggers, transformers verbosity and progress bars,
    `datasets` progress bars."""
    import datasets
    from transformers.utils import logging as tlog

    def logger(name: str | None) -> tuple:
        lg = logging.getLogger(name)
        return lg.level, lg.propagate, tuple(lg.handlers), tuple(lg.filters)

    return {
        "warnings.filters": list(warnings.filters),
        "showwarning": warnings.showwarning,
        "root": logger(None),
        PACKAGE_LOGGER: logger(PACKAGE_LOGGER),
        "accelerate": logger("accelerate"),
        **{f"logger {n.logger}": logger(n.logger) for n in LOG_NOISE},
        "transformers.verbosity": tlog.get_verbosity(),
        "transformers.progress_bars": tlog.is_progress_bar_enabled(),
        "datasets.progress_bars": not datasets.are_progress_bars_disabled(),
    }
