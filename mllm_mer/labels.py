"""Turn generated text into a discrete emotion label (or an open-vocabulary label list).

Two conventions for single labels, chosen by `mode`:

* ``"strict"`` (our default) reads the answer the way a careful human would: case, Unicode and
  punctuation are normalised, an explicit answer field ("Emotion: X", "the emotion is X",
  "Answer: X") wins, otherwise the last mention of a label (or a synonym) wins; negated mentions
  ("not happy") are ignored; an answer outside the label set is ``UNKNOWN_LABEL`` and counts as wrong.
* ``"emotion_llama"``: the Emotion-LLaMA convention as the field states it: the last label of the set
  mentioned in the text wins (case-insensitive whole words, no synonyms); none mentioned -> "neutral".
* ``"emotion_llama_exact"`` reproduces the published Emotion-LLaMA scorer byte for byte so numbers are
  comparable to the paper's; see `parse_label_emotion_llama_exact` (it is stricter: only the last
  space-separated token counts).

`parse_openset_answer` splits the answer of the open-vocabulary (``ov``) prompt into emotion words
(a label file's `openset` cell is split by `mllm_mer.data.readers.split_openset_cell` instead).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

LABEL_MODES: tuple[str, ...] = ("strict", "emotion_llama", "emotion_llama_exact")
"""Valid `mode` values for `parse_label`."""

UNKNOWN_LABEL = "unknown"
"""Returned by strict parsing when no in-set answer is found; never a member of a label set."""

EMOTION_LLAMA_FALLBACK = "neutral"
"""What the Emotion-LLaMA scorer substitutes for any answer it cannot match."""

SYNONYM_GROUPS: tuple[frozenset[str], ...] = tuple(
    frozenset(group.split())
    for group in (
        "angry anger angrily mad furious fury rage enraged irritated irritation annoyed annoyance irate outraged",
        "happy happiness happily joy joyful joyous glad pleased cheerful delighted delight elated",
        "sad sadness sadly unhappy unhappiness sorrow sorrowful grief grieving depressed heartbroken gloomy "
        "disappointed disappointment",
        "worried worry worrying worriedly anxious anxiety anxiously nervous nervousness nervously concerned "
        "apprehensive uneasy uneasiness",
        "surprise surprised surprising astonished astonishment amazed amazement shocked startled",
        "neutral neutrality calm calmly calmness indifferent",
        "fear fearful afraid scared frightened terrified terror",
        "disgust disgusted disgusting revulsion repulsed",
        "contempt contemptuous scorn disdain",
        "doubt doubtful skeptical sceptical suspicious",
        "excited excitement exhilarated",
        "frustrated frustration",
    )
)
"""Words that name the same emotion. A group maps to whichever member is in the caller's label set;
groups without an in-set member still mark a word as an emotion (an out-of-set answer)."""

OTHER_EMOTION_WORDS: frozenset[str] = frozenset(
    "bored boredom confused confusion embarrassed embarrassment ashamed shame guilty guilt proud pride love "
    "jealous jealousy relieved relief tired hopeful helpless lonely mixed unclear uncertain ambiguous hurt".split()
)
"""Emotion-like answers with no synonym group; as an explicit answer they parse to `UNKNOWN_LABEL`."""

_NEGATORS = frozenset(
    {"not", "no", "never", "nor", "neither", "without", "hardly", "barely", "lacks", "lacking", "absence"}
)
_SCOPE_BREAKERS = frozenset(
    {"but", "though", "although", "yet", "rather", "instead", "however", "while", "whereas", "except"}
)
_NEGATION_WINDOW = 3
"""A negator up to this many tokens before a mention negates it, unless a scope breaker or
punctuation comes in between ("not angry but happy" keeps "happy")."""

# "emotion: X", "the emotion of the woman in the clip is X", "emotional state is X", "answer: X", ...
_ANSWER_FIELD = re.compile(
    r"\b(?:final\s+answer|answer|prediction|predicted\s+emotion|emotion\s+label|emotion\s+category"
    r"|emotional\s+state|emotion|label)"
    r"(?:\s+(?:of|for|shown\s+by|expressed\s+by)\s+[\w ]{1,40}?)?"
    r"\s*(?::|=|-|\bis\b|\bwas\b|\bwould\s+be\b|\bseems\s+to\s+be\b|\bappears\s+to\s+be\b)"
    r"[\s:=\"'*`\[(]*"
    r"(?:(?:most\s+likely|likely|probably|clearly|mainly|mostly|best\s+described\s+as|that\s+of)\s+)?"
    r"(?P<answer>\w+(?:\s+\w+)?)"
)
_TOKEN = re.compile(r"\w+|[^\w\s]")
_OPENSET_PREFIX = re.compile(
    r"^(?:the\s+)?(?:final\s+)?(?:emotions?|emotional\s+states?|emotion\s+labels?|labels?|output|answer)"
    r"\s*(?:are|is)?\s*:\s*"
)
_OPENSET_SPLIT = re.compile(r"[,;\n]+")
_OPENSET_LEADING = re.compile(r"^(?:(?:and|or|also|maybe|possibly|some)\s+)+")
_OPENSET_BULLET = re.compile(r"^\s*(?:[-*•]+|\d+[.)])\s*")
_OPENSET_NONE = frozenset({"", "none", "null", "n a", "nothing", "no emotion", "unknown"})


def _normalize(text: str) -> str:
    """NFKC, case-folded, typographic apostrophes unified and "n't" expanded to " not"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    text = re.sub(r"\bcan't\b", "can not", text)
    text = re.sub(r"\bwon't\b", "will not", text)
    return re.sub(r"n't\b", " not", text)


@lru_cache(maxsize=64)
def _lookup(labels: tuple[str, ...]) -> tuple[dict[tuple[str, ...], str], frozenset[str], int]:
    """Phrase (token tuple) -> label, the set of out-of-set emotion words, and the longest phrase.

    A label's own name always maps to it; synonyms map to the one in-set member of their group.
    """
    table: dict[tuple[str, ...], str] = {}
    for label in labels:
        table[tuple(_TOKEN.findall(_normalize(label)))] = label
    out_of_set: set[str] = set(OTHER_EMOTION_WORDS)
    for group in SYNONYM_GROUPS:
        members = [label for label in labels if _normalize(label) in group]
        if len(members) == 1:
            for word in group:
                table.setdefault((word,), members[0])
        elif not members:
            out_of_set.update(group)
    out_of_set.difference_update(word for phrase in table for word in phrase)
    return table, frozenset(out_of_set), max(len(phrase) for phrase in table)


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    if isinstance(labels, str) or not labels:
        raise ValueError(f"labels must be a non-empty sequence of label names, got {labels!r}")
    canon = tuple(labels)
    normalized = [_normalize(label).strip() for label in canon]
    if any(not label for label in normalized):
        raise ValueError(f"labels contain an empty name: {canon!r}")
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"labels must be unique after case/Unicode normalisation, got {canon!r}")
    if UNKNOWN_LABEL in normalized:
        raise ValueError(f"{UNKNOWN_LABEL!r} is reserved for unparseable answers; remove it from labels")
    return canon


def _mentions(tokens: list[str], table: dict[tuple[str, ...], str], longest: int) -> list[tuple[int, str]]:
    """(start index, label) of every non-negated label/synonym mention, longest phrase first."""
    found: list[tuple[int, str]] = []
    i = 0
    while i < len(tokens):
        for size in range(min(longest, len(tokens) - i), 0, -1):
            label = table.get(tuple(tokens[i : i + size]))
            if label is not None:
                if not _negated(tokens, i):
                    found.append((i, label))
                i += size
                break
        else:
            i += 1
    return found


def _negated(tokens: list[str], start: int) -> bool:
    """True when a negator precedes `tokens[start]` within the window and the same clause."""
    for j in range(start - 1, max(start - 1 - _NEGATION_WINDOW, -1), -1):
        token = tokens[j]
        if token in _SCOPE_BREAKERS or not token[0].isalnum():
            return False
        if token in _NEGATORS:
            # "not only happy but also ..." affirms rather than negates.
            return not (j + 1 < len(tokens) and tokens[j + 1] in {"only", "just", "merely"})
    return False


def _answer_field(text: str, labels: tuple[str, ...]) -> str | None:
    """Label named by the last explicit answer field that names an emotion, else None.

    Returns `UNKNOWN_LABEL` when that field names an emotion outside `labels`. Fields whose value is
    not an emotion word ("the emotion is not clear", "emotion is expressed ...") are ignored.
    """
    table, out_of_set, _ = _lookup(labels)
    answer: str | None = None
    for match in _ANSWER_FIELD.finditer(text):
        words = tuple(_TOKEN.findall(match.group("answer")))
        if words[:2] in table:
            answer = table[words[:2]]
        elif words[:1] in table:
            answer = table[words[:1]]
        elif words[0] in out_of_set:
            answer = UNKNOWN_LABEL
    return answer


def parse_label_strict(text: str, labels: Sequence[str]) -> str:
    """Our default parser; see `parse_label` for the rules.

    Args:
        text: generated answer.
        labels: the dataset's label set.
    Returns:
        a member of `labels`, or `UNKNOWN_LABEL`.
    """
    canon = _check_labels(labels)
    normalized = _normalize(text)
    field = _answer_field(normalized, canon)
    if field is not None:
        return field
    table, _, longest = _lookup(canon)
    mentions = _mentions(_TOKEN.findall(normalized), table, longest)
    return mentions[-1][1] if mentions else UNKNOWN_LABEL


def parse_label_emotion_llama(text: str, labels: Sequence[str]) -> str:
    """The Emotion-LLaMA convention: the last label of the set mentioned wins; none -> "neutral".

    Mentions are case-insensitive whole words (label phrases may span several words); synonyms and
    negations are not interpreted ("not happy" votes happy), as in the convention.
    """
    canon = _check_labels(labels)
    best: tuple[int, str] | None = None
    lowered = text.lower()
    for label in canon:
        for m in re.finditer(rf"(?<!\w){re.escape(label.lower())}(?!\w)", lowered):
            if best is None or m.start() > best[0]:
                best = (m.start(), label)
    return best[1] if best else EMOTION_LLAMA_FALLBACK


def parse_label_emotion_llama_exact(text: str, labels: Sequence[str]) -> str:
    """Reproduce Emotion-LLaMA's published classification scorer exactly.

    Source: ZebangCheng/Emotion-LLaMA ``eval_emotion.py`` (commit e3396fb757, the script behind the
    MER2023 / MER2024 numbers). The model's ``generate`` strips the decoded text
    (``output_texts.split('[/INST]')[-1].strip()`` in ``minigpt4/models/minigpt_base.py``); then::

        answers[j] = answers[j].split(" ")[-1]
        if answers[j] not in ['neutral', 'angry', 'happy', 'sad', 'worried', 'surprise']:
            answers[j] = 'neutral'

    So only the last space-separated token counts, matched exactly: no lower-casing, no punctuation
    stripping, no synonyms and no word search ("Happy", "happy." and "happy, I think" all become
    "neutral"). Emotion-LLaMA was trained to answer with the bare label (or "... emotional state
    is: <label>"), where this works. It is stricter than "the last label mentioned wins".
    A later refactor of that repo (``minigpt4/evaluation/evaluator.py``, ``LabelNormalizer``:
    NFKC + casefold, whole-word phrase match, several distinct labels -> invalid, never rewritten
    to a valid class) is not what the paper's numbers used; use ``"strict"`` for a robust parser.

    Args:
        text: generated answer.
        labels: the dataset's label set (Emotion-LLaMA hard-codes the six MER2023 labels).
    Returns:
        the last token if it is exactly a member of `labels`, else ``"neutral"``.
    """
    canon = _check_labels(labels)
    last = text.strip().split(" ")[-1]
    return last if last in canon else EMOTION_LLAMA_FALLBACK


def parse_label(text: str, labels: Sequence[str], mode: str = "strict") -> str:
    """Map a generated answer to one label of `labels`.

    ``mode="strict"``:
      1. Unicode NFKC, case-folding, "n't" -> " not"; punctuation separates tokens.
      2. An explicit answer field ("Emotion: X", "The emotion of the speaker is X", "emotional state
         is X", "Answer: X", "Label = X") decides when X is an emotion word; the last such field wins.
         X is mapped through `SYNONYM_GROUPS` (anger/angrily/mad -> angry, joy -> happy, anxious ->
         worried, astonished -> surprise, calm -> neutral, ...). X naming an emotion outside
         `labels` (e.g. "fearful" for MER2023) gives `UNKNOWN_LABEL`.
      3. Otherwise the last non-negated mention of a label or synonym wins.
      4. Negation: a mention preceded, within 3 tokens of the same clause, by not/no/never/nor/
         neither/without/hardly/barely (contractions included) is ignored, so "not happy, just
         tired" has no happy vote. Punctuation and but/though/rather/instead close the scope ("not
         angry but sad" -> sad); "not only happy" is not a negation. A negated label is never turned
         into its opposite.
      5. Nothing found -> `UNKNOWN_LABEL`, which is scored as wrong.

    ``mode="emotion_llama"``: see `parse_label_emotion_llama` (last label of the set mentioned, else
    ``"neutral"``). ``mode="emotion_llama_exact"``: see `parse_label_emotion_llama_exact` (last
    space-separated token, exact match, else ``"neutral"``).

    Args:
        text: generated answer.
        labels: the dataset's label set, e.g. `mllm_mer.data.schema.MER2023_LABELS`.
        mode: one of `LABEL_MODES`.
    Returns:
        a member of `labels`, `UNKNOWN_LABEL` (strict only) or ``"neutral"`` (emotion_llama fallback).
    Raises:
        ValueError: unknown `mode`, or an empty / duplicated label set, or one containing "unknown".
    """
    if mode == "strict":
        return parse_label_strict(text, labels)
    if mode == "emotion_llama":
        return parse_label_emotion_llama(text, labels)
    if mode == "emotion_llama_exact":
        return parse_label_emotion_llama_exact(text, labels)
    raise ValueError(f"label mode {mode!r} unknown; valid: {list(LABEL_MODES)}")


def parse_openset_answer(text: str) -> list[str]:
    """Split an open-vocabulary answer into emotion words.

    Items are separated by commas, semicolons or newlines (MERTools' ov answers look like
    "[happy, relaxed]"). Each item is NFKC-normalised and lower-cased, loses a leading
    "Emotions:" / "Labels:" / "Output:" / "Answer:" prefix, list bullets, brackets, quotes and other
    punctuation, and a leading "and"/"or"; empty items and "none"/"unknown" are dropped; duplicates
    are removed keeping the first occurrence. (A label file's list-string cell such as
    "['happy', 'excited']" is split by `mllm_mer.data.readers.split_openset_cell`, MERTools' rule.)

    Args:
        text: generated answer to the ``ov`` prompt.
    Returns:
        emotion words in order of first appearance, possibly empty.
    """
    words: list[str] = []
    for line in _normalize(text).splitlines():
        line = _OPENSET_PREFIX.sub("", _OPENSET_BULLET.sub("", line.strip()))
        for item in _OPENSET_SPLIT.split(line):
            item = _OPENSET_PREFIX.sub("", _OPENSET_BULLET.sub("", item.strip()))
            tokens = (token.strip("-") for token in re.sub(r"[^\w\s-]|_", " ", item).split())
            item = " ".join(token for token in tokens if token)
            item = _OPENSET_LEADING.sub("", item)
            if item not in _OPENSET_NONE and item not in words:
                words.append(item)
    return words
