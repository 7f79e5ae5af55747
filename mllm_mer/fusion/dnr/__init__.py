"""DnR (Divide and Refine, WACV 2026) as a plug-in of the fused head.

`config.py` (DnRConfig, the `dnr.*` settings, torch-free), `model.py` (parts, objectives, recombination,
component ablation) and `method.py` (the `DNR` method that `mllm_mer.model.build_mer_model` lists). Only
the config is imported here, so that `mllm_mer.config` stays torch-free.
"""

from mllm_mer.fusion.dnr.config import DIVIDE_PREFIX, LOSS_NAMES, DnRConfig

__all__ = ["DIVIDE_PREFIX", "LOSS_NAMES", "DnRConfig"]
