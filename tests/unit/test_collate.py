"""The one batch assembly of both collators (`assemble_batch`), on hand-made ids; the audio-in-video rule."""

from __future__ import annotations

import pytest
import torch

from mllm_mer.backbone.modality import SpecialTokenIds
from mllm_mer.data.collate import IGNORE_INDEX, assemble_batch, audio_in_video
from mllm_mer.data.schema import Sample

IDS = SpecialTokenIds(
    audio=50, video=60, image=61, audio_bos=51, audio_eos=52, vision_bos=62, vision_eos=63, pad=0, eos=9
)
SAMPLES = [Sample("a", None, label="happy"), Sample("b", None, label="sad"), Sample("c", None, label="")]
LABELS = ("sad", "happy")
PROMPTS = [torch.tensor([1, 62, 60, 60, 63, 2]), torch.tensor([1, 51, 50, 52, 2]), torch.tensor([1, 2, 3])]
ANSWERS = [torch.tensor([7, 9]), torch.tensor([8, 8, 9]), torch.tensor([9])]


def test_training_batch_is_right_padded_with_labels_on_the_answer():
    b = assemble_batch(SAMPLES, PROMPTS, ANSWERS, label_set=LABELS, token_ids=IDS, use_audio_in_video=False)
    assert b["input_ids"].tolist() == [
        [1, 62, 60, 60, 63, 2, 7, 9],
        [1, 51, 50, 52, 2, 8, 8, 9],
        [1, 2, 3, 9, 0, 0, 0, 0],
    ]
    assert b["attention_mask"].tolist() == [[1] * 8, [1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]
    assert b["attention_mask"].dtype == torch.long
    _ = IGNORE_INDEX
    assert b["labels"].tolist() == [
        [_, _, _, _, _, _, 7, 9],
        [_, _, _, _, _, 8, 8, 9],
        [_, _, _, 9, _, _, _, _],
    ]
    assert b["prompt_mask"].tolist() == [
        [True] * 6 + [False] * 2,
        [True] * 5 + [False] * 3,
        [True] * 3 + [False] * 5,
    ]
    assert b["token_modality"].tolist() == [
        [0, 0, 2, 2, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0, 0],
        [0] * 8,
    ]
    assert b["class_id"].tolist() == [1, 0, -100]
    assert b["sample_ids"] == ["a", "b", "c"] and b["use_audio_in_video"] is False


def test_prompt_only_batch_is_left_padded_without_labels():
    b = assemble_batch(SAMPLES, PROMPTS, None, label_set=LABELS, token_ids=IDS, use_audio_in_video=True)
    assert b["input_ids"].tolist() == [
        [1, 62, 60, 60, 63, 2],
        [0, 1, 51, 50, 52, 2],
        [0, 0, 0, 1, 2, 3],
    ]
    assert b["attention_mask"].tolist() == [[1] * 6, [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert b["labels"] is None
    assert torch.equal(b["prompt_mask"], b["attention_mask"].bool())
    assert b["token_modality"][1].tolist() == [0, 0, 0, 1, 0, 0]
    assert b["use_audio_in_video"] is True


def test_audio_in_video_is_one_layout_per_batch():
    assert audio_in_video([(True, True), (False, True), (True, True)]) is True
    assert audio_in_video([(True, False), (False, True)]) is False
    assert audio_in_video([(False, True), (False, False)]) is False
    with pytest.raises(ValueError, match="mixes videos with and without their audio"):
        audio_in_video([(True, True), (True, False)])
