"""What runs print (`mllm_mer.logs`): quiet by default, everything with verbose, and nothing left behind."""

from __future__ import annotations

import logging
import warnings

import datasets
import pytest
from transformers.utils import logging as tlog

from mllm_mer.data.dataset import build_media_dataset
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.logs import KNOWN_NOISE, LOG_NOISE, datasets_bars_off, library_state, progress, run_output
from tests.unit.test_data import OPTS


class Records(logging.Handler):
    """Collects the records that reach it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_run_output_restores_every_setting_it_touches(verbose):
    before = library_state()
    with run_output(verbose=verbose, main=True):
        inside = library_state()
    assert library_state() == before
    assert inside != before  # it did change something inside (so the comparison above can fail)


def test_quiet_ignores_only_the_listed_warnings(recwarn):
    noise = KNOWN_NOISE[0]
    with run_output(verbose=False, main=True):
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", noise.category, stacklevel=1)
        warnings.warn("data.foo is deprecated: use data.bar", FutureWarning, stacklevel=1)  # anything else still shows
    assert [str(w.message) for w in recwarn] == ["data.foo is deprecated: use data.bar"]
    with run_output(verbose=True, main=True):
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", noise.category, stacklevel=1)
    assert len(recwarn) == 2


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_loggers_quiet_and_verbose(verbose):
    ours, other, ds = Records(), Records(), Records()
    logging.getLogger("mllm_mer").addHandler(ours)
    logging.getLogger("accelerate.checkpointing").addHandler(other)
    logging.getLogger(LOG_NOISE[0].logger).addHandler(ds)
    try:
        with run_output(verbose=verbose, main=True):
            logging.getLogger("mllm_mer.training.x").info("ours: info")
            logging.getLogger("mllm_mer.training.x").warning("ours: warning")
            logging.getLogger("accelerate.checkpointing").info("accelerate: saved")
            logging.getLogger(LOG_NOISE[0].logger).warning(LOG_NOISE[0].message + ". If you have GPU ...")
            inside_transformers = tlog.get_verbosity()
    finally:
        logging.getLogger("mllm_mer").removeHandler(ours)
        logging.getLogger("accelerate.checkpointing").removeHandler(other)
        logging.getLogger(LOG_NOISE[0].logger).removeHandler(ds)
    if verbose:
        assert ours.messages == ["ours: info", "ours: warning"]
        assert other.messages == ["accelerate: saved"]  # the logger's own level decides; root is at INFO
        assert len(ds.messages) == 1 and inside_transformers == logging.INFO
    else:
        assert ours.messages == ["ours: warning"]
        assert other.messages == []  # accelerate's INFO lines (six per checkpoint save) stay out
        assert ds.messages == []
        assert inside_transformers == tlog.get_verbosity()


def test_decode_cache_build_leaves_datasets_bars_as_it_found_them(syn_dir, tmp_path):
    """Building the decode cache switches the `datasets` bars off for its own call only."""
    samples = read_jsonl(syn_dir / "dev.jsonl", MER2023_LABELS)[:2]
    assert not datasets.are_progress_bars_disabled()
    build_media_dataset(samples, OPTS, tmp_path / "a")
    assert not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a user who switched them off keeps them off
    try:
        with datasets_bars_off():
            assert datasets.are_progress_bars_disabled()
        build_media_dataset(samples, OPTS, tmp_path / "b")
        assert datasets.are_progress_bars_disabled()
    finally:
        datasets.enable_progress_bars()


def test_progress_bars_only_on_the_main_process(monkeypatch):
    assert not progress(range(3), desc="x").disable
    assert progress(range(3), desc="x", enabled=False).disable
    monkeypatch.setenv("RANK", "1")
    assert progress(range(3), desc="x").disable
