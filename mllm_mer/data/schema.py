"""The one sample schema every reader produces, and the shared vocabularies.

`Modality` values are the per-token codes in `token_modality` (0 text, 1 audio, 2 video).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path


class Modality(IntEnum):
    """Per-token modality code; `token_modality` tensors hold these values."""

    TEXT = 0
    AUDIO = 1
    VIDEO = 2

    @property
    def key(self) -> str:
        """Lower-case name used in configs, JSON and logs ("text", "audio", "video")."""
        return self.name.lower()


MER2023_LABELS: tuple[str, ...] = ("neutral", "angry", "happy", "sad", "worried", "surprise")
"""The six MER2023 discrete labels, in the order used for class ids."""

SUBSETS: tuple[str, ...] = ("consistent", "video_aligned", "audio_aligned")
"""CA-MER conflict subsets (also used by the synthetic conflict set)."""

CUE_KEYS: tuple[str, ...] = ("video", "audio", "text")
"""Keys of `Sample.cues`: the emotion each modality shows (synthetic set only)."""


@dataclass(frozen=True)
class Sample:
    """One MER sample.

    Attributes:
        id: unique id within its dataset.
        video: absolute path of the video file (None for audio-only samples).
        audio: absolute path of a separate audio file, or None to use the video's own track.
        subtitle: transcript / subtitle text ("" when absent).
        label: ground-truth emotion (a member of the dataset's label set), or "" when unlabelled.
        explanation: reference explanation (EMER style), "" when absent.
        subset: conflict subset ("consistent", "video_aligned", "audio_aligned") or None.
        cues: per-modality cue labels {"video", "audio", "text"} when known (synthetic data only).
    """

    id: str
    video: Path | None
    audio: Path | None = None
    subtitle: str = ""
    label: str = ""
    explanation: str = ""
    subset: str | None = None
    cues: dict[str, str] = field(default_factory=dict)
