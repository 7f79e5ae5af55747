"""Tests of `mllm_mer.explanations` on hand-made explanations and on the synthetic references."""

from __future__ import annotations

import pytest

from mllm_mer.data.schema import MER2023_LABELS, Sample
from mllm_mer.data.synthetic import SyntheticConfig, _explain, _plan_split, intensity_word
from mllm_mer.explanations import CueMentions, cue_mentions, explanation_quality, full_displays
from mllm_mer.labels import UNKNOWN_LABEL

REF_HAPPY = (
    "The face is a strong display and the voice a faint one. The face shows raised mouth corners in a broad "
    "smile and slightly narrowed, smiling eyes (happy). The voice is high, bright and bouncy (happy). The "
    "subtitle says \"Wait, you're here? I had no idea!\", which sounds surprise. Both displays agree. Overall "
    "the emotion is happy."
)
OLD_LAYOUT = (  # the first synthetic layout: intensity at the end of each display's sentence
    "The face shows downturned mouth corners (sad), a clear display. The voice is loud, forceful and fast "
    "(angry), a strong display. Overall the emotion is angry."
)


def _sample(sid: str, subset: str, video: str, audio: str, label: str, explanation: str = REF_HAPPY) -> Sample:
    return Sample(id=sid, video=None, label=label, explanation=explanation, subset=subset,
                  cues={"video": video, "audio": audio, "text": "neutral"})


def test_mentions_of_a_reference_explanation():
    m = cue_mentions(REF_HAPPY + "\nEmotion: happy", MER2023_LABELS)
    assert m == CueMentions(video="happy", audio="happy", video_intensity="strong", audio_intensity="faint",
                            label="happy")


def test_mentions_of_the_old_layout_and_of_garbled_headers():
    m = cue_mentions(OLD_LAYOUT, MER2023_LABELS)
    assert m == CueMentions(video="sad", audio="angry", video_intensity="clear", audio_intensity="strong",
                            label="angry")
    # The face's intensity stops at the voice's keyword: "the voice a faint one" is not the face's.
    m = cue_mentions("The face is a display and the voice a faint one. The face shows (sad).", MER2023_LABELS)
    assert (m.video_intensity, m.audio_intensity, m.video, m.audio) == (None, "faint", "sad", None)


def test_mentions_tolerate_synonyms_missing_sentences_and_negation():
    text = "The voice sounds joyful and clear. The face is not angry, just faint. Emotion: sad"
    m = cue_mentions(text, MER2023_LABELS)
    # "joyful" names happy; the negated "angry" names nothing; the answer field decides the label
    assert m == CueMentions(video=None, audio="happy", video_intensity="faint", audio_intensity="clear", label="sad")
    # "facial" / "vocal" are not the face / voice sentences; no label anywhere -> unknown
    m = cue_mentions("A facial display (angry). A vocal strong one (sad)", MER2023_LABELS)
    assert (m.video, m.audio, m.video_intensity, m.audio_intensity) == (None, None, None, None)
    assert cue_mentions("gibberish mouth brows", MER2023_LABELS).label == UNKNOWN_LABEL


def test_synthetic_references_read_back_exactly():
    cfg = SyntheticConfig(seed=3, train_size=240, dev_size=0, test_size=0, train_conflict_rate=0.5,
                          weak_display_rate=0.6)
    for clip in _plan_split(cfg, "train"):
        m = cue_mentions(_explain(clip), MER2023_LABELS)
        assert (m.video, m.audio, m.label) == (clip.video_cue, clip.audio_cue, clip.label)
        assert m.video_intensity == intensity_word(clip.video_intensity)
        assert m.audio_intensity == intensity_word(clip.audio_intensity)


def test_explanation_quality_by_hand():
    samples = [
        _sample("a", "consistent", "happy", "happy", "happy"),
        _sample("b", "consistent", "sad", "sad", "sad", explanation=""),  # no reference intensities
        _sample("c", "audio_aligned", "angry", "happy", "happy"),
    ]
    texts = [
        REF_HAPPY + "\nEmotion: happy",  # all right
        "The face shows drooping eyes (sad), a strong display. The voice is (angry). Emotion: sad",  # audio wrong
        "The face shows (angry), a clear display. The voice is (happy), a faint display. no answer",
    ]
    # c: reference REF_HAPPY says face strong / voice faint -> face intensity wrong, voice right;
    #    label of c: "happy" mentioned last in the voice sentence ("no answer" has no field) -> happy
    out = explanation_quality(texts, samples, MER2023_LABELS)
    assert out["n"] == 3
    assert out["parse_rate"] == pytest.approx(1.0)
    assert out["label_accuracy"] == pytest.approx(1.0)
    assert out["video_cue_accuracy"] == pytest.approx(1.0)
    assert out["audio_cue_accuracy"] == pytest.approx(2 / 3)
    assert (out["video_intensity_n"], out["audio_intensity_n"]) == (2, 2)
    assert out["video_intensity_accuracy"] == pytest.approx(1 / 2)
    assert out["audio_intensity_accuracy"] == pytest.approx(1.0)
    assert list(out["per_subset"]) == ["consistent", "audio_aligned"]
    assert out["per_subset"]["consistent"]["audio_cue_accuracy"] == pytest.approx(1 / 2)
    assert out["per_subset"]["audio_aligned"]["video_intensity_accuracy"] == pytest.approx(0.0)
    assert out["mentions"][1]["audio"] == "angry"


def test_unparseable_answers_lower_the_parse_rate():
    samples = [_sample(str(i), "consistent", "happy", "happy", "happy") for i in range(4)]
    out = explanation_quality(["Emotion: happy", "Emotion: sad", "(((", "Emotion: bored"], samples,
                              MER2023_LABELS)
    assert out["parse_rate"] == pytest.approx(2 / 4)  # "bored" is an out-of-set emotion: unknown
    assert out["label_accuracy"] == pytest.approx(1 / 4)
    assert out["video_cue_accuracy"] == pytest.approx(0.0)
    assert out["video_intensity_accuracy"] == pytest.approx(0.0)


def test_explanation_quality_rejects_bad_input():
    with pytest.raises(ValueError, match="texts has 1 items but samples has 0"):
        explanation_quality(["x"], [], MER2023_LABELS)
    with pytest.raises(ValueError, match="at least one"):
        explanation_quality([], [], MER2023_LABELS)


def test_full_displays_from_the_references():
    samples = [
        _sample("a", "consistent", "happy", "happy", "happy"),  # face strong, voice faint
        _sample("b", "consistent", "sad", "sad", "sad", explanation=""),
        _sample("c", "video_aligned", "sad", "angry", "sad", explanation=REF_HAPPY.replace("faint", "strong")),
    ]
    assert full_displays(samples, "video", MER2023_LABELS) == [True, False, True]
    assert full_displays(samples, "audio", MER2023_LABELS) == [False, False, True]
    assert full_displays(samples, "audio", MER2023_LABELS, word="faint") == [True, False, False]
    with pytest.raises(ValueError, match="modality='text' unknown"):
        full_displays(samples, "text", MER2023_LABELS)
