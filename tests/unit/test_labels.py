"""Label parsing from generated text: strict mode, the Emotion-LLaMA convention and open-set lists."""

from __future__ import annotations

import pytest

from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.labels import LABEL_MODES, UNKNOWN_LABEL, parse_label, parse_openset_answer

IEMOCAP_LIKE = ("angry", "happy", "sad", "neutral", "frustrated", "excited", "fearful", "surprised")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # bare labels, case and punctuation
        ("happy", "happy"),
        ("HAPPY!", "happy"),
        ("  Sad.\n", "sad"),
        ("\u201cWorried\u201d", "worried"),
        # synonyms
        ("He speaks angrily.", "angry"),
        ("She is mad at him", "angry"),
        ("Her joy is obvious", "happy"),
        ("a joyful tone", "happy"),
        ("He looks unhappy", "sad"),
        ("The man is anxious about the exam", "worried"),
        ("nervous laughter", "worried"),
        ("She is astonished by the news", "surprise"),
        ("a surprising turn", "surprise"),
        ("He stays calm throughout", "neutral"),
        # explicit answer fields win over earlier or later mentions
        ("He smiles happily at first. Emotion: sad", "sad"),
        ("Emotion: angry. Although he might be happy inside.", "angry"),
        ("The emotion of the person in the video is anger.", "angry"),
        ("Therefore, it is inferred that his emotional state is: WORRIED", "worried"),
        ("Answer: **surprise**", "surprise"),
        ("The emotion is most likely happiness.", "happy"),
        ("Emotion: happy ... Final answer: neutral", "neutral"),
        # a field whose value is not an emotion word is ignored
        ("The emotion is expressed through a smile, so she is happy", "happy"),
        # multiple mentions without a field: the last one wins
        ("At first she seems happy, but then she becomes sad", "sad"),
        ("sad, angry, surprised", "surprise"),
        # negation
        ("He is not happy.", UNKNOWN_LABEL),
        ("She isn't angry, she is worried", "worried"),
        ("He is not angry but sad", "sad"),
        ("never happy; calm", "neutral"),
        ("Not only happy but also a little surprised? No, mostly happy", "happy"),
        ("The emotion is not happy", UNKNOWN_LABEL),
        ("no longer sad", UNKNOWN_LABEL),
        # out of set / nothing found
        ("Emotion: fearful", UNKNOWN_LABEL),
        ("The emotional state is disgust, although he smiled happily", UNKNOWN_LABEL),
        ("I cannot tell.", UNKNOWN_LABEL),
        ("", UNKNOWN_LABEL),
        # words that merely contain a label are not mentions
        ("The sadder part of the madness", UNKNOWN_LABEL),
    ],
)
def test_strict(text: str, expected: str) -> None:
    assert parse_label(text, MER2023_LABELS) == expected
    assert parse_label(text, MER2023_LABELS, mode="strict") == expected


def test_strict_synonyms_follow_the_label_set() -> None:
    assert parse_label("She is surprised", IEMOCAP_LIKE) == "surprised"
    assert parse_label("Emotion: surprise", IEMOCAP_LIKE) == "surprised"
    assert parse_label("He is afraid", IEMOCAP_LIKE) == "fearful"
    assert parse_label("Emotion: excited", IEMOCAP_LIKE) == "excited"
    assert parse_label("Emotion: excited", MER2023_LABELS) == UNKNOWN_LABEL
    assert parse_label("Emotion: worried", IEMOCAP_LIKE) == UNKNOWN_LABEL


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("happy", "happy"),
        ("The emotional state is: sad", "sad"),
        ("  worried \n", "worried"),
        ("happy.", "neutral"),  # exact token match: punctuation is not stripped
        ("Happy", "neutral"),  # nor is case folded
        ("He is sad, I think", "neutral"),  # only the last space-separated token counts
        ("sad happy", "happy"),
        ("joy", "neutral"),  # no synonyms
        ("fear", "neutral"),
        ("he is not happy", "happy"),  # no negation handling
        ("I feel\nsurprise", "neutral"),  # split on " " only, as the original code
        ("", "neutral"),
    ],
)
def test_emotion_llama_exact(text: str, expected: str) -> None:
    assert parse_label(text, MER2023_LABELS, mode="emotion_llama_exact") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("happy", "happy"),
        ("Happy.", "happy"),  # case-insensitive whole words
        ("He is sad, I think", "sad"),
        ("sad at first, then happy", "happy"),  # the last label mentioned wins
        ("he is not happy", "happy"),  # no negation handling in the convention
        ("joy", "neutral"),  # no synonyms; none mentioned -> neutral
        ("unhappy", "neutral"),  # whole words only
        ("The emotional state is: worried\n", "worried"),
        ("", "neutral"),
    ],
)
def test_emotion_llama(text: str, expected: str) -> None:
    assert parse_label(text, MER2023_LABELS, mode="emotion_llama") == expected


def test_modes_and_bad_input() -> None:
    assert LABEL_MODES == ("strict", "emotion_llama", "emotion_llama_exact")
    with pytest.raises(ValueError, match=r"label mode 'loose' unknown; valid: \['strict', 'emotion_llama'"):
        parse_label("happy", MER2023_LABELS, mode="loose")
    with pytest.raises(ValueError, match="non-empty"):
        parse_label("happy", ())
    with pytest.raises(ValueError, match="non-empty"):
        parse_label("happy", "happy")
    with pytest.raises(ValueError, match="unique"):
        parse_label("happy", ("happy", "Happy"))
    with pytest.raises(ValueError, match="reserved"):
        parse_label("happy", ("happy", "unknown"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("happy, sad, angry", ["happy", "sad", "angry"]),
        ("Emotions: Happy; Excited\nrelieved.", ["happy", "excited", "relieved"]),
        ("[happy, relaxed, happy]", ["happy", "relaxed"]),
        ("The emotions are: 'nervous', \"anxious\"", ["nervous", "anxious"]),
        ("Output: []", []),
        ("none", []),
        ("", []),
        ("- joy\n- slight anxiety.\n2) and surprise", ["joy", "slight anxiety", "surprise"]),
        ("calm,, ,  Calm ,CALM", ["calm"]),
        ("self-conscious, well-being", ["self-conscious", "well-being"]),
    ],
)
def test_parse_openset_answer(text: str, expected: list[str]) -> None:
    assert parse_openset_answer(text) == expected
