"""LLaMA-Factory sharegpt and ms-swift chat files: one MER sample per conversation record.

- LLaMA-Factory sharegpt (`read_sharegpt`): a JSON list (or `.jsonl`) of records with `messages`
  (`role`/`content`) or `conversations` (`from`/`value`, `human`/`gpt`), `<video>` / `<audio>` tags in
  the text and `videos` / `audios` lists.
- ms-swift (`read_swift_jsonl`): JSONL records with `messages` (`role`/`content`) and `videos` / `audios`.

For both, tag counts must equal the list lengths, a sample has at most one video and one audio (no
audio = use the video's own track), media paths are relative to `media_root` (default: the annotation
file's folder). The label comes from the record field `label_field` when given, otherwise it is the
label-set word mentioned last (whole word, case-insensitive) in the last assistant message
(`label_from_answer`); an answer naming no label is an error, a record without an assistant message is
unlabelled. The explanation is that answer, or "" when the answer is just the label. The id comes from
`id_field` (default `id`), else the first media file's stem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mllm_mer.data.jsonl import iter_json_lines
from mllm_mer.data.readers.common import UniqueIds, check_label, media_file
from mllm_mer.data.schema import MER2023_LABELS, Sample

_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def _load_records(path: Path) -> list[tuple[str, Any]]:
    """Records of a JSON list (`.json`) or JSON-lines file (other suffixes), each with its location."""
    if not path.is_file():
        raise ValueError(f"{path}: annotation file not found")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return [(f"{path}, record {i}", rec) for i, rec in enumerate(data, start=1)]
    records = []
    for line_no, rec, error in iter_json_lines(path, encoding="utf-8-sig"):
        if error is not None:
            raise ValueError(f"{path}, line {line_no}: invalid JSON ({error.msg})")
        records.append((f"{path}, line {line_no}", rec))
    return records


def _messages(rec: dict[str, Any], where: str, *, allow_conversations: bool) -> list[tuple[str, str]]:
    """(role, text) pairs of a record; roles normalised to user / assistant / system / other."""
    if isinstance(rec.get("messages"), list):
        raw, role_key, text_key = rec["messages"], "role", "content"
    elif allow_conversations and isinstance(rec.get("conversations"), list):
        raw, role_key, text_key = rec["conversations"], "from", "value"
    else:
        keys = "'messages' or 'conversations'" if allow_conversations else "'messages'"
        raise ValueError(f"{where}: expected a list under {keys}")
    out = []
    for j, msg in enumerate(raw, start=1):
        if (
            not isinstance(msg, dict)
            or not isinstance(msg.get(role_key), str)
            or not isinstance(msg.get(text_key), str)
        ):
            raise ValueError(
                f"{where}: message {j} must be an object with string {role_key!r} and {text_key!r}"
            )
        out.append((_ROLE_ALIASES.get(msg[role_key], "other"), msg[text_key]))
    if not out:
        raise ValueError(f"{where}: no messages")
    return out


def _media_list(rec: dict[str, Any], key: str, where: str) -> list[str]:
    """The `videos` / `audios` list of a record ([] when absent)."""
    value = rec.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {key!r} must be a list of path strings, got {value!r}")
    return value


def label_from_answer(answer: str, labels: Sequence[str]) -> str | None:
    """The label-set word mentioned last in `answer` (whole word, case-insensitive), or None.

    Args:
        answer: assistant text, e.g. "The voice is calm but the face looks happy. Emotion: happy".
        labels: the label set.
    Returns:
        The label (as spelled in `labels`), or None when no label word occurs.
    """
    best: tuple[int, int, str] | None = None
    for label in labels:
        for match in re.finditer(rf"(?<![\w-]){re.escape(label)}(?![\w-])", answer, flags=re.IGNORECASE):
            key = (match.start(), match.end(), label)
            if best is None or key[:2] > best[:2]:
                best = key
    return None if best is None else best[2]


def _chat_sample(
    rec: Any,
    where: str,
    *,
    media_root: Path,
    labels: Sequence[str],
    label_field: str | None,
    id_field: str,
    allow_conversations: bool,
) -> Sample:
    """Map one chat record to a Sample (see module docstring for the rules)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    messages = _messages(rec, where, allow_conversations=allow_conversations)
    videos, audios = _media_list(rec, "videos", where), _media_list(rec, "audios", where)
    for tag, items in (("<video>", videos), ("<audio>", audios)):
        n_tags = sum(text.count(tag) for _, text in messages)
        if n_tags != len(items):
            raise ValueError(f"{where}: {n_tags} {tag} tag(s) in the messages but {len(items)} path(s)")
    if len(videos) > 1 or len(audios) > 1:
        raise ValueError(
            f"{where}: {len(videos)} videos and {len(audios)} audios; a sample has at most one of each"
        )
    if not videos and not audios:
        raise ValueError(f"{where}: no video and no audio; a MER sample needs media")
    video = media_file(media_root, videos[0], what=f"{where} (video)") if videos else None
    audio = media_file(media_root, audios[0], what=f"{where} (audio)") if audios else None

    answers = [text for role, text in messages if role == "assistant"]
    answer = answers[-1].strip() if answers else ""
    if label_field is not None:
        if label_field not in rec or not isinstance(rec[label_field], str):
            raise ValueError(f"{where}: label field {label_field!r} missing or not a string")
        label = check_label(rec[label_field], labels, what=where)
    elif answer:
        found = label_from_answer(answer, labels)
        if found is None:
            raise ValueError(
                f"{where}: the assistant answer names no label from {list(labels)}: {answer[:80]!r}"
            )
        label = found
    else:
        label = ""
    explanation = "" if answer.strip(" .!\n\t").lower() == label.lower() else answer

    if id_field in rec:
        if not isinstance(rec[id_field], str | int) or not str(rec[id_field]).strip():
            raise ValueError(f"{where}: id field {id_field!r} must be a non-empty string or integer")
        sample_id = str(rec[id_field]).strip()
    else:
        media = video if video is not None else audio
        assert media is not None  # checked above: at least one of them
        sample_id = media.stem
    return Sample(id=sample_id, video=video, audio=audio, label=label, explanation=explanation)


def _read_chat(
    path: str | Path,
    *,
    media_root: str | Path | None,
    labels: Sequence[str],
    label_field: str | None,
    id_field: str,
    allow_conversations: bool,
) -> list[Sample]:
    """Shared body of `read_sharegpt` and `read_swift_jsonl`."""
    path = Path(path)
    root = Path(media_root) if media_root is not None else path.parent
    ids, samples = UniqueIds(), []
    for where, rec in _load_records(path):
        sample = _chat_sample(
            rec,
            where,
            media_root=root,
            labels=labels,
            label_field=label_field,
            id_field=id_field,
            allow_conversations=allow_conversations,
        )
        ids.add(sample.id, where)
        samples.append(sample)
    return samples


def read_sharegpt(
    path: str | Path,
    *,
    media_root: str | Path | None = None,
    labels: Sequence[str] = MER2023_LABELS,
    label_field: str | None = None,
    id_field: str = "id",
) -> list[Sample]:
    """Read a LLaMA-Factory sharegpt dataset (`.json` list or `.jsonl`).

    Args:
        path: the dataset file.
        media_root: folder the `videos` / `audios` paths are relative to (default: the file's folder);
            paths must stay inside it.
        labels: label set.
        label_field: record key holding the label; None parses it from the last assistant answer.
        id_field: record key holding the sample id (fallback: the first media file's stem).
    Returns:
        Samples in file order.
    Raises:
        ValueError: on a bad record (see the module docstring).
    """
    return _read_chat(
        path,
        media_root=media_root,
        labels=labels,
        label_field=label_field,
        id_field=id_field,
        allow_conversations=True,
    )


def read_swift_jsonl(
    path: str | Path,
    *,
    media_root: str | Path | None = None,
    labels: Sequence[str] = MER2023_LABELS,
    label_field: str | None = None,
    id_field: str = "id",
) -> list[Sample]:
    """Read an ms-swift messages JSONL dataset (`messages` with role/content, `videos` / `audios`).

    Args:
        path: the JSONL file (a `.json` list is accepted too).
        media_root: folder the media paths are relative to (default: the file's folder).
        labels: label set.
        label_field: record key holding the label; None parses it from the last assistant answer.
        id_field: record key holding the sample id (fallback: the first media file's stem).
    Returns:
        Samples in file order.
    Raises:
        ValueError: on a bad record (see the module docstring).
    """
    return _read_chat(
        path,
        media_root=media_root,
        labels=labels,
        label_field=label_field,
        id_field=id_field,
        allow_conversations=False,
    )
