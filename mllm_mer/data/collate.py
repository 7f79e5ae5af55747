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
generation prompt and have `labels` None.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mllm_mer.backbone.modality import SpecialTokenIds, token_modality
from mllm_mer.data.media import DecodedMedia
from mllm_mer.data.schema import Sample
from mllm_mer.prompts import PromptTemplate

IGNORE_INDEX = -100

MODEL_INPUT_KEYS: tuple[str, ...] = (
    "input_ids", "attention_mask", "input_features", "feature_attention_mask", "pixel_values_videos",
    "video_grid_thw", "video_second_per_grid", "pixel_values", "image_grid_thw",
)
"""The batch keys the thinker's forward / generate take (processor outputs); everything else a batch carries
(`labels`, `class_id`, `token_modality`, `prompt_mask`, `sample_ids`, DCR `paths`, cached features) is ours."""


def model_inputs(batch: dict) -> dict:
    """The thinker's keyword arguments from a collated (uncached) batch: `MODEL_INPUT_KEYS` that are set."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if batch.get(k) is not None}


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

    def _batch_modalities(self, items: Sequence[tuple[Sample, DecodedMedia]]) -> tuple[bool, bool]:
        if self.modality_dropout <= 0:
            return self.use_video, self.use_audio
        digest = hashlib.sha256("\x00".join(s.id for s, _ in items).encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        if u >= self.modality_dropout:
            return self.use_video, self.use_audio
        keep_audio = u < self.modality_dropout / 2
        return self.use_video and not keep_audio, self.use_audio and keep_audio

    def messages(
        self, sample: Sample, media: DecodedMedia, use_video: bool | None = None, use_audio: bool | None = None
    ) -> list[dict]:
        """Chat messages for one sample (the media items are placeholders filled by the processor)."""
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

    def answer(self, sample: Sample) -> str:
        """The training target for one sample, e.g. "<explanation>\\nEmotion: happy"."""
        return self.prompt.render_answer(explanation=sample.explanation, label=sample.label)

    def __call__(self, items: Sequence[tuple[Sample, DecodedMedia]]) -> dict:
        tok = self.processor.tokenizer
        texts: list[str] = []
        videos: list = []
        audios: list = []
        audio_slots: list[int | None] = []
        answer_ids: list[list[int]] = []
        with_audio_in_video: set[bool] = set()
        use_video, use_audio = self._batch_modalities(items)
        for sample, media in items:
            text = self.processor.apply_chat_template(
                self.messages(sample, media, use_video, use_audio), add_generation_prompt=True, tokenize=False
            )
            has_video = use_video and media.frames is not None
            has_audio = use_audio and media.audio is not None
            if has_video:
                videos.append(media.frames)
                with_audio_in_video.add(has_audio)
                if has_audio:
                    audios.append(media.audio)
                    audio_slots.append(len(videos) - 1)
            elif has_audio:
                audios.append(media.audio)
                audio_slots.append(None)
            if self.train:
                answer = self.answer(sample) + "<|im_end|>"
                answer_ids.append(tok(answer, add_special_tokens=False)["input_ids"])
                text += answer
            texts.append(text)
        if len(with_audio_in_video) > 1:
            raise ValueError(
                "a batch mixes videos with and without their audio track; the backbone's position ids need "
                "one layout per batch (give every sample audio, or set use_audio=False for the batch)"
            )
        use_audio_in_video = with_audio_in_video == {True}
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
        input_ids = batch["input_ids"]
        attention = batch["attention_mask"].bool()
        prompt_mask = attention.clone()
        labels = None
        if self.train:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            lengths = attention.sum(dim=1)
            for i, ids in enumerate(answer_ids):
                end = int(lengths[i])
                start = end - len(ids)
                tail = input_ids[i, start:end].tolist()
                if tail != ids:  # internal invariant: the answer tokenizes the same inside the prompt
                    raise RuntimeError(f"answer tokens of sample '{items[i][0].id}' changed inside the prompt")
                labels[i, start:end] = input_ids[i, start:end]
                prompt_mask[i, start:] = False
        label_index = {name: i for i, name in enumerate(self.labels)}
        class_id = torch.tensor([label_index.get(s.label, IGNORE_INDEX) for s, _ in items], dtype=torch.long)
        batch.update(
            labels=labels,
            class_id=class_id,
            token_modality=token_modality(input_ids, self.token_ids),
            prompt_mask=prompt_mask,
            use_audio_in_video=use_audio_in_video,
            sample_ids=[s.id for s, _ in items],
        )
        return batch
