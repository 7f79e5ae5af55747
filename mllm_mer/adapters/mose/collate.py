"""Sub-batches for MoSE's decision-balance regularizer: the training batch rendered without audio / without video.

`MaskedModalityCollator` wraps the training `MerCollator`: the batch is the wrapped collator's output,
unchanged, and `batch["mose_masked"]` adds {"audio": the same samples with the audio removed from the prompt,
"video": with the video removed} (removed by the collator's `use_audio` / `use_video` flags, never zeroed),
each with the answer and its LM labels, and no modality dropout, so the answer's log-probability can be
compared with and without each modality (`mllm_mer.adapters.mose.model.decision_balance_loss`). Evaluation
and inference collators (`train=False`) are returned unchanged: the regularizer is a training loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from mllm_mer.data.collate import MerCollator
from mllm_mer.data.media import DecodedMedia
from mllm_mer.data.schema import Sample

MASKED_INPUTS: dict[str, tuple[bool, bool]] = {"audio": (True, False), "video": (False, True)}
"""Removed modality -> (use_video, use_audio) of its sub-batch collator."""


@dataclass
class MaskedModalityCollator:
    """Callable collator: `list[(Sample, DecodedMedia)] -> dict`, the batch plus `batch["mose_masked"]`.

    Attributes:
        base: the training collator (answers and LM labels).
    """

    base: MerCollator
    masked_collators: dict[str, MerCollator] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.masked_collators = {
            removed: dataclasses.replace(self.base, modality_dropout=0.0, use_video=use_video, use_audio=use_audio)
            for removed, (use_video, use_audio) in MASKED_INPUTS.items()
        }

    def __call__(self, items: Sequence[tuple[Sample, DecodedMedia]]) -> dict:
        batch = self.base(items)
        batch["mose_masked"] = {removed: collate(items) for removed, collate in self.masked_collators.items()}
        return batch
