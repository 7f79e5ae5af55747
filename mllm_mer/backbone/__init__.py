"""Backbone loading, the tiny offline builder and per-token modality codes."""

from mllm_mer.backbone.loader import Backbone, load_backbone
from mllm_mer.backbone.modality import SpecialTokenIds, token_modality

__all__ = ["Backbone", "SpecialTokenIds", "load_backbone", "token_modality"]
