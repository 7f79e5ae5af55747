"""Backbone loading (Qwen2.5-Omni and Qwen3-Omni, see `families`), the tiny offline builders and per-token
modality codes."""

from mllm_mer.backbone.families import BackboneFamily, family_of
from mllm_mer.backbone.loader import Backbone, load_backbone
from mllm_mer.backbone.modality import SpecialTokenIds, token_modality

__all__ = ["Backbone", "BackboneFamily", "SpecialTokenIds", "family_of", "load_backbone", "token_modality"]
