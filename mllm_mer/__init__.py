"""mllm_mer: conflict-aware multimodal emotion recognition and reasoning with audio-visual LLMs."""

__version__ = "0.1.0"
