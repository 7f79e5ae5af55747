"""Shared fixtures: the tiny thinker and a small synthetic set, built once per test session.

Tiers: `pytest` runs unit + smoke (tiny model, CPU, offline); `pytest -m smoke` selects the whole smoke tier
(every test under tests/smoke/ is marked), `pytest -m "not smoke"` the unit tier; `pytest -m gpu` / `-m slow`
opt in to the real-checkpoint, benchmark and large runs. Session fixtures are shared: tests never write into
them (copy into `tmp_path` first). `tiny_dir` / `backbone` are the Qwen2.5-Omni twin; tests that take
`tiny_backbone_dir` / `any_backbone` run on both families (Qwen2.5-Omni and Qwen3-Omni twins).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mllm_mer.backbone.tiny import ensure_tiny_thinker
from mllm_mer.data.synthetic import SyntheticConfig, ensure_synthetic_set

REPO = Path(__file__).resolve().parent.parent
BACKBONE_ARCHES = ("qwen2_5_omni", "qwen3_omni")
"""Backbone families the tests run on (`tiny_backbone_dir` / `any_backbone` are parametrized over them)."""
torch.set_num_threads(1)  # tiny models on shared CPUs: one thread is fastest and stable
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/smoke/ as `smoke` (the marker selects the whole smoke tier)."""
    smoke = REPO / "tests" / "smoke"
    for item in items:
        if smoke in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.smoke)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2.5-Omni thinker checkpoint directory (built with the package's builder)."""
    return ensure_tiny_thinker(tmp_path_factory.mktemp("models") / "tiny-qwen2_5-omni")


@pytest.fixture(scope="session")
def tiny_dir_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-Omni (MoE) thinker checkpoint directory (the second backbone family)."""
    return ensure_tiny_thinker(tmp_path_factory.mktemp("models") / "tiny-qwen3-omni", arch="qwen3_omni")


@pytest.fixture(scope="session", params=BACKBONE_ARCHES)
def tiny_backbone_dir(request: pytest.FixtureRequest) -> Path:
    """The tiny twin of each backbone family: a test using it runs once per family (ids = arch)."""
    return request.getfixturevalue("tiny_dir" if request.param == "qwen2_5_omni" else "tiny_dir_qwen3")


@pytest.fixture(scope="session")
def any_backbone(tiny_backbone_dir: Path):
    """The loaded tiny backbone of each family (shared: tests must not change it)."""
    from mllm_mer.backbone import load_backbone

    return load_backbone(tiny_backbone_dir)


@pytest.fixture(scope="session")
def syn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic conflict set: 24 train, 12 dev, 12 test clips."""
    cfg = SyntheticConfig(seed=1, train_size=24, dev_size=12, test_size=12)
    return ensure_synthetic_set(tmp_path_factory.mktemp("data") / "synthetic", cfg)


@pytest.fixture(scope="session")
def backbone(tiny_dir: Path):
    from mllm_mer.backbone import load_backbone

    return load_backbone(tiny_dir)
