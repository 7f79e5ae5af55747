"""Unimodal sub-batches for the DCR paths: the same samples rendered with one modality in the prompt.

`UnimodalPathCollator` wraps a `MerCollator`: the fused batch is the wrapped collator's output, unchanged,
and `batch["paths"]` adds one sub-batch per unimodal path, rendered by copies of the wrapped collator whose
`use_video` / `use_audio` flags remove the other modalities from the prompt (they are not zeroed):

    "text":  subtitle + instruction only        (use_video=False, use_audio=False)
    "audio": the audio track + the text         (use_video=False, use_audio=True)
    "video": the video frames (no audio) + text (use_video=True,  use_audio=False)

Sub-batches are prompt-only (left-padded, no answer, no LM labels, no modality dropout), so training and
inference render them identically; they carry `class_id`, `token_modality`, `prompt_mask` and `sample_ids`
like any batch. A sample lacking a modality has no tokens of it in that path's sub-batch; the model masks it
out of that path's loss (and out of AFD) from `token_modality`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from mllm_mer.data.collate import MerCollator
from mllm_mer.data.media import DecodedMedia
from mllm_mer.data.schema import Sample

PATH_INPUTS: dict[str, tuple[bool, bool]] = {
    "text": (False, False),
    "audio": (False, True),
    "video": (True, False),
}
"""Path -> (use_video, use_audio) of its sub-batch collator."""


@dataclass
class UnimodalPathCollator:
    """Callable collator: `list[(Sample, DecodedMedia)] -> dict`, the fused batch plus `batch["paths"]`.

    Attributes:
        base: the fused-path collator (training or inference), a `MerCollator` or another method's wrapper
            of one (its `base` chain ends in the `MerCollator` the paths are rendered from).
    """

    base: MerCollator
    path_collators: dict[str, MerCollator] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        inner = self.base
        while not isinstance(inner, MerCollator):  # another method's wrapper (e.g. MoSE's masked sub-batches)
            inner = inner.base
        self.path_collators = {
            path: dataclasses.replace(
                inner, train=False, modality_dropout=0.0, use_video=use_video, use_audio=use_audio
            )
            for path, (use_video, use_audio) in PATH_INPUTS.items()
        }

    def __call__(self, items: Sequence[tuple[Sample, DecodedMedia]]) -> dict:
        batch = self.base(items)
        batch["paths"] = {path: collate(items) for path, collate in self.path_collators.items()}
        return batch
