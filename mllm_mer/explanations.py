"""Explanation quality on the synthetic conflict set: which cues and intensities an explanation names.

A deterministic stand-in for EMER's clue overlap, possible because the synthetic clips have designed
cues. The synthetic explanations (`mllm_mer.data.synthetic`) read

    The face is a <intensity> display and the voice a <intensity> one.
    The face shows <description> (<video cue>). The voice is <description> (<audio cue>). ...

`cue_mentions` reads a (generated or reference) explanation back, per display ("face" for the video,
"voice" for the audio; whole words, so "facial" and "vocal" do not count):

- its intensity is the first intensity word after the first mention of its keyword, in that sentence
  and before the other display's keyword;
- its cue is the last non-negated label mention (`mllm_mer.labels` rules: label words and synonyms, so
  "(happy)" and "joyful" both name happy) of the first sentence that mentions its keyword and names an
  emotion of the label set.

The same rules read the earlier layout ("The face shows <description> (<cue>), a <intensity>
display."). The label of the whole text is `parse_label` (strict), so "Emotion: <label>" or "the
emotion is <label>" decides.

`full_displays` tells, from the reference explanations, which clips show a modality at full ("strong")
intensity (the clips on which unimodal answers are scored against that modality's own cue).

`explanation_quality` scores generated explanations against the samples: the designed cues
(`Sample.cues["video"]`, `["audio"]`) for the cue emotions and the reference explanation's own intensity
words for the intensities; overall and per conflict subset.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mllm_mer.data.schema import SUBSETS, Sample
from mllm_mer.labels import UNKNOWN_LABEL, parse_label

INTENSITY_WORDS: tuple[str, ...] = ("faint", "clear", "strong")
"""Intensity words of the synthetic explanations, weakest first (as `mllm_mer.data.synthetic`)."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_CUE_WORD = {"video": re.compile(r"\bface\b", re.IGNORECASE), "audio": re.compile(r"\bvoice\b", re.IGNORECASE)}


@dataclass(frozen=True)
class CueMentions:
    """What one explanation says about the face, the voice and the label.

    Attributes:
        video / audio: the emotion its face / voice sentence names (None: no such sentence, or it names
            no emotion of the label set).
        video_intensity / audio_intensity: the intensity word of that sentence (None: none).
        label: the text's label (`parse_label`, strict): a member of the labels or `UNKNOWN_LABEL`.
    """

    video: str | None
    audio: str | None
    video_intensity: str | None
    audio_intensity: str | None
    label: str


def _sentences(text: str, modality: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if _CUE_WORD[modality].search(s)]


def _named(sentences: list[str], labels: Sequence[str]) -> str | None:
    for sentence in sentences:
        # "(happy)" -> " happy ": a bare mention, not read as an answer field of the whole text
        label = parse_label(sentence.replace("(", " ").replace(")", " "), labels)
        if label != UNKNOWN_LABEL:
            return label
    return None


def _intensity(sentences: list[str], modality: str, words: Sequence[str]) -> str | None:
    if not sentences:
        return None
    sentence = sentences[0]
    start = _CUE_WORD[modality].search(sentence).end()
    other = _CUE_WORD["audio" if modality == "video" else "video"].search(sentence, start)
    span = sentence[start: other.start() if other else len(sentence)]
    found = [m.group(0).lower() for m in re.finditer(r"\w+", span) if m.group(0).lower() in words]
    return found[0] if found else None


def cue_mentions(
    text: str, labels: Sequence[str], intensity_words: Sequence[str] = INTENSITY_WORDS
) -> CueMentions:
    """Read the face / voice cues, their intensity words and the label from one explanation.

    Args:
        text: an explanation (generated, or a synthetic reference).
        labels: the label set.
        intensity_words: the words that count as intensities (lower case).
    Returns:
        `CueMentions` (see module docstring for the rules).
    """
    face, voice = _sentences(text, "video"), _sentences(text, "audio")
    return CueMentions(
        video=_named(face, labels),
        audio=_named(voice, labels),
        video_intensity=_intensity(face, "video", intensity_words),
        audio_intensity=_intensity(voice, "audio", intensity_words),
        label=parse_label(text, labels),
    )


def _rate(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def _scores(mentions: list[CueMentions], samples: list[Sample], references: list[CueMentions]) -> dict:
    out: dict = {"n": len(samples)}
    out["parse_rate"] = _rate([m.label != UNKNOWN_LABEL for m in mentions])
    out["label_accuracy"] = _rate([m.label == s.label for m, s in zip(mentions, samples, strict=True) if s.label])
    for modality in ("video", "audio"):
        cue_hits, int_hits = [], []
        for m, s, r in zip(mentions, samples, references, strict=True):
            cue = s.cues.get(modality)
            if cue:
                cue_hits.append(getattr(m, modality) == cue)
            wanted = getattr(r, f"{modality}_intensity")
            if wanted is not None:
                int_hits.append(getattr(m, f"{modality}_intensity") == wanted)
        out[f"{modality}_cue_accuracy"] = _rate(cue_hits)
        out[f"{modality}_cue_n"] = len(cue_hits)
        out[f"{modality}_intensity_accuracy"] = _rate(int_hits)
        out[f"{modality}_intensity_n"] = len(int_hits)
    return out


def explanation_quality(
    texts: Sequence[str],
    samples: Sequence[Sample],
    labels: Sequence[str],
    intensity_words: Sequence[str] = INTENSITY_WORDS,
) -> dict:
    """Did each explanation name the right video cue, audio cue, intensity words, and a label that parses?

    Args:
        texts: one generated explanation per sample, in order.
        samples: the samples; `cues["video"]` / `cues["audio"]` are the truth for the cue emotions
            (samples without one are left out of that score), the intensity words of the reference
            `explanation` the truth for the intensities (left out when the reference has none).
        labels: the label set.
        intensity_words: as for `cue_mentions`.
    Returns:
        {"n", "parse_rate", "label_accuracy", "video_cue_accuracy", "audio_cue_accuracy",
        "video_intensity_accuracy", "audio_intensity_accuracy", "<modality>_cue_n",
        "<modality>_intensity_n", "per_subset": {subset: the same keys}, "mentions": [asdict(CueMentions)
        per text]}; a rate is None when no sample qualifies. `parse_rate`: share of texts whose label is not
        `UNKNOWN_LABEL`; `label_accuracy`: share equal to the sample's label (unknown counts as wrong).
    Raises:
        ValueError: `texts` and `samples` differ in length, or are empty.
    """
    if len(texts) != len(samples):
        raise ValueError(f"texts has {len(texts)} items but samples has {len(samples)}; they must match")
    if not texts:
        raise ValueError("explanation_quality needs at least one explanation, got 0")
    samples = list(samples)
    mentions = [cue_mentions(t, labels, intensity_words) for t in texts]
    references = [cue_mentions(s.explanation, labels, intensity_words) for s in samples]
    out = _scores(mentions, samples, references)
    out["per_subset"] = {}
    for subset in [s for s in SUBSETS if any(x.subset == s for x in samples)]:
        idx = [i for i, x in enumerate(samples) if x.subset == subset]
        out["per_subset"][subset] = _scores(
            [mentions[i] for i in idx], [samples[i] for i in idx], [references[i] for i in idx]
        )
    out["mentions"] = [asdict(m) for m in mentions]
    return out


def full_displays(
    samples: Sequence[Sample], modality: str, labels: Sequence[str], word: str = INTENSITY_WORDS[-1]
) -> list[bool]:
    """Per sample, whether its reference explanation calls the `modality` display `word` ("strong").

    Args:
        samples: samples with synthetic reference explanations.
        modality: "video" (the face sentence) or "audio" (the voice sentence).
        labels: the label set.
        word: the intensity word of a full display.
    Raises:
        ValueError: unknown `modality`.
    """
    if modality not in _CUE_WORD:
        raise ValueError(f"modality={modality!r} unknown; valid: {sorted(_CUE_WORD)}")
    key = f"{modality}_intensity"
    return [getattr(cue_mentions(s.explanation, labels), key) == word for s in samples]
