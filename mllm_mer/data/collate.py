"""Collate decoded samples into a model batch through the real Qwen2.5-Omni processor.

For each sample the chat prompt is rendered from a template in `prompts/` (system prompt, then the user
turn with the media and the instruction), the processor expands the media placeholders (a video with
its own audio becomes `<|vision_bos|><|audio_bos|> <|VIDEO|>xN <|AUDIO|>xM <|audio_eos|><|vision_eos|>`)
and the batch gets, besides the processor outputs:

    labels          (B, T) long, -100 everywhere except the answer tokens (LM loss on the answer only)
    class_id        (B,) long, index of the sample's label in the label set (-100 when unlabelled)
    token_modality  (B, T) long, 0 text / 1 audio / 2 video (see `mllm_mer.backbone.modality`)
    prompt_mask     (B, T) bool, True on prompt tokens (the part the classification heads may pool)

Training batches are right-padded and carry the answer; inference batches are left-padded, end with the
generation prompt and have `labels` None. The token part of a batch (padding, `labels`, `prompt_mask`,
`token_modality`, `class_id`, `sample_ids`) is built in one place, `assemble_batch`, from per-sample prompt and
answer ids: `MerCollator` takes them from the processor's output, the frozen-encoder cache's collator
(`mllm_mer.cache.CachedCollator`) from its stored layouts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mllm_mer.backbone.modality import SpecialTokenIds, token_modality
from mllm_mer.data.media import DecodedMedia
from mllm_mer.data.schema import Sample
from mllm_mer.prompts import PromptTemplate

IGNORE_INDEX = -100
ANSWER_END = "<|im_end|>"
"""Appended to every training answer (the assistant turn's end, which the model learns to emit)."""

MODEL_INPUT_KEYS: tuple[str, ...] = (
    "input_ids", "attention_mask", "input_features", "feature_attention_mask", "pixel_values_videos",
    "video_grid_thw", "video_second_per_grid", "pixel_values", "image_grid_thw",
)
"""The batch keys the thinker's forward / generate take (processor outputs); everything else a batch carries
(`labels`, `class_id`, `token_modality`, `prompt_mask`, `sample_ids`, DCR `paths`, cached features) is ours."""


def model_inputs(batch: dict) -> dict:
    """The thinker's keyword arguments from a collated (uncached) batch: `MODEL_INPUT_KEYS` that are set."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if batch.get(k) is not None}


def audio_in_video(presence: Sequence[tuple[bool, bool]]) -> bool:
    """Whether the batch's videos are rendered with their own audio track (`use_audio_in_video`).

    Args:
        presence: per sample (has_video, has_audio) in this batch's prompts.
    Raises:
        ValueError: some videos keep their audio and others do not (one layout per batch).
    """
    with_audio = {has_audio for has_video, has_audio in presence if has_video}
    if len(with_audio) > 1:
        raise ValueError(
            "a batch mixes videos with and without their audio track; the backbone's position ids need "
            "one layout per batch (give every sample audio, or set use_audio=False for the batch)"
        )
    return with_audio == {True}


def assemble_batch(
    samples: Sequence[Sample],
    prompt_ids: Sequence[torch.Tensor],
    answer_ids: Sequence[torch.Tensor] | None,
    *,
    label_set: Sequence[str],
    token_ids: SpecialTokenIds,
    use_audio_in_video: bool,
) -> dict[str, Any]:
    """The token part of a batch from per-sample ids: the one batch assembly of every collator.

    Training batches (`answer_ids` given) are `prompt + answer` per row, right-padded, with LM `labels` on the
    answer tokens; prompt-only batches (`answer_ids` None) are left-padded (generation continues at the end)
    and have `labels` None. Padding uses `token_ids.pad` (the tokenizer's pad token, else `<|im_end|>`).

    Args:
        samples: the batch's samples (for `class_id` and `sample_ids`), B of them.
        prompt_ids: per sample (P_i,) long: the rendered prompt through the generation prompt, media
            placeholders expanded.
        answer_ids: per sample (A_i,) long: the tokenized answer ending with `<|im_end|>`; None = prompt only.
        label_set: the label names (`class_id` is the index of a sample's label; -100 when not in it).
        token_ids: the backbone's special-token ids (padding, `token_modality`).
        use_audio_in_video: the batch's videos carry their audio (`audio_in_video`), passed through.
    Returns:
        input_ids (B, T) long, attention_mask (B, T) long, labels (B, T) long or None, token_modality (B, T)
        long, prompt_mask (B, T) bool (True on prompt tokens), class_id (B,) long, use_audio_in_video bool,
        sample_ids list[str]; T = the longest row.
    """
    prompt_len = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    if answer_ids is None:
        rows, lengths = [p.to(torch.long) for p in prompt_ids], prompt_len
    else:
        rows = [torch.cat([p, a]).to(torch.long) for p, a in zip(prompt_ids, answer_ids, strict=True)]
        lengths = prompt_len + torch.tensor([len(a) for a in answer_ids], dtype=torch.long)
    input_ids = torch.nn.utils.rnn.pad_sequence(
        rows, batch_first=True, padding_value=token_ids.pad, padding_side="left" if answer_ids is None else "right"
    )
    pos = torch.arange(input_ids.shape[1])[None, :]  # (1, T)
    if answer_ids is None:
        attention = pos >= (input_ids.shape[1] - lengths)[:, None]
        prompt_mask = attention
        labels = None
    else:
        attention = pos < lengths[:, None]
        prompt_mask = pos < prompt_len[:, None]
        labels = input_ids.masked_fill(~attention | prompt_mask, IGNORE_INDEX)
    index = {name: i for i, name in enumerate(label_set)}
    return {
        "input_ids": input_ids,
        "attention_mask": attention.to(torch.long),
        "labels": labels,
        "class_id": torch.tensor([index.get(s.label, IGNORE_INDEX) for s in samples], dtype=torch.long),
        "token_modality": token_modality(input_ids, token_ids),
        "prompt_mask": prompt_mask,
        "use_audio_in_video": use_audio_in_video,
        "sample_ids": [s.id for s in samples],
    }


@dataclass
class MerCollator:
    """Callable collator: `list[(Sample, DecodedMedia)] -> dict` of tensors (see module docstring).

    Attributes:
        processor: a Qwen2.5-Omni processor.
        token_ids: the backbone's special-token ids.
        prompt: the task template (instruction + answer).
        system_prompt: the system message text.
        labels: the label set (class ids follow its order).
        train: True = append the answer and build LM labels (right padding); False = generation prompt
            only (left padding).
        use_video / use_audio: keep these modalities in the prompt (False removes them from the prompt,
            it does not zero them; used for unimodal paths).
    """

    processor: object
    token_ids: SpecialTokenIds
    prompt: PromptTemplate
    system_prompt: str
    labels: Sequence[str]
    train: bool = True
    use_video: bool = True
    use_audio: bool = True
    modality_dropout: float = 0.0
    """Probability that a batch keeps only one modality (audio-only or video-only, half each). The draw
    is a hash of the batch's sample ids, so it does not depend on worker processes or RNG state."""

    def _batch_modalities(self, items: Sequence[tuple[Sample, Any]]) -> tuple[bool, bool]:
        """(use_video, use_audio) of this batch's prompts (the flags, after the modality-dropout draw)."""
        if self.modality_dropout <= 0:
            return self.use_video, self.use_audio
        digest = hashlib.sha256("\x00".join(s.id for s, _ in items).encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        if u >= self.modality_dropout:
            return self.use_video, self.use_audio
        keep_audio = u < self.modality_dropout / 2
        return self.use_video and not keep_audio, self.use_audio and keep_audio

    @staticmethod
    def presence(
        items: Sequence[tuple[Sample, Any]], use_video: bool, use_audio: bool
    ) -> list[tuple[bool, bool]]:
        """Per sample (has_video, has_audio): the media its prompt holds (`media.frames` / `media.audio` set)."""
        return [(use_video and m.frames is not None, use_audio and m.audio is not None) for _, m in items]

    def messages(
        self, sample: Sample, media: Any, use_video: bool | None = None, use_audio: bool | None = None
    ) -> list[dict]:
        """Chat messages for one sample (the media items are placeholders filled by the processor).

        `media` is a `DecodedMedia` or anything with `frames` / `audio` (None = absent)."""
        use_video = self.use_video if use_video is None else use_video
        use_audio = self.use_audio if use_audio is None else use_audio
        content: list[dict] = []
        has_video = use_video and media.frames is not None
        if has_video:
            content.append({"type": "video"})
        if use_audio and media.audio is not None and not has_video:
            content.append({"type": "audio"})
        instruction = self.prompt.render(subtitle=sample.subtitle, labels=", ".join(self.labels))
        content.append({"type": "text", "text": instruction})
        return [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {"role": "user", "content": content},
        ]

    def prompt_text(self, sample: Sample, media: Any, use_video: bool, use_audio: bool) -> str:
        """The rendered chat prompt of one sample through the generation prompt (placeholders not expanded)."""
        return self.processor.apply_chat_template(
            self.messages(sample, media, use_video, use_audio), add_generation_prompt=True, tokenize=False
        )

    def answer(self, sample: Sample) -> str:
        """The training target for one sample, e.g. "<explanation>\\nEmotion: happy"."""
        return self.prompt.render_answer(explanation=sample.explanation, label=sample.label)

    def answer_ids(self, sample: Sample) -> torch.Tensor:
        """(A,) long: the tokenized training target followed by `<|im_end|>`."""
        ids = self.processor.tokenizer(self.answer(sample) + ANSWER_END, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def __call__(self, items: Sequence[tuple[Sample, DecodedMedia]]) -> dict:
        """One batch: the processor's outputs (features, `input_ids` of prompt + answer as one text), then
        `assemble_batch` on its per-sample prompt and answer ids (the answer's tokens are checked)."""
        use_video, use_audio = self._batch_modalities(items)
        presence = self.presence(items, use_video, use_audio)
        use_audio_in_video = audio_in_video(presence)
        texts: list[str] = []
        videos: list = []
        audios: list = []
        audio_slots: list[int | None] = []
        answers = [self.answer_ids(s) for s, _ in items] if self.train else None
        for (sample, media), (has_video, has_audio) in zip(items, presence, strict=True):
            text = self.prompt_text(sample, media, use_video, use_audio)
            if has_video:
                videos.append(media.frames)
                if has_audio:
                    audios.append(media.audio)
                    audio_slots.append(len(videos) - 1)
            elif has_audio:
                audios.append(media.audio)
                audio_slots.append(None)
            if answers is not None:  # the processor tokenizes prompt and answer as one text
                text += self.answer(sample) + ANSWER_END
            texts.append(text)
        kwargs: dict = {
            "text": texts,
            "return_tensors": "pt",
            "padding": True,
            "padding_side": "right" if self.train else "left",
        }
        if videos:
            kwargs["videos"] = videos
            kwargs["videos_kwargs"] = {
                "fps": float(items[0][1].fps),
                "size": dict(self.processor.video_processor.size),
                "cap_pixels_per_frame": True,
            }
        if audios:
            kwargs["audio"] = audios
            if use_audio_in_video:
                kwargs["load_audio_from_video"] = True
                kwargs["audio_from_video_indices"] = audio_slots
        batch = dict(self.processor(**kwargs))
        rows = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
        prompts = rows
        if answers is not None:
            prompts = []
            for (sample, _), row, answer in zip(items, rows, answers, strict=True):
                # internal invariant: the answer tokenizes the same inside the whole text as on its own
                if len(answer) > len(row) or not torch.equal(row[len(row) - len(answer):], answer):
                    raise RuntimeError(f"answer tokens of sample '{sample.id}' changed inside the prompt")
                prompts.append(row[: len(row) - len(answer)])
        batch.update(
            assemble_batch(
                [s for s, _ in items], prompts, answers, label_set=self.labels, token_ids=self.token_ids,
                use_audio_in_video=use_audio_in_video,
            )
        )
        return batch
