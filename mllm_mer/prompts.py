"""Prompt templates: plain-text files in `prompts/`, loaded by name, checked, hashed.

A template file holds the user instruction, optionally followed by a line `---answer---` and the answer
template (the LM training target). Fields are `{name}` placeholders (str.format syntax; `{{`/`}}` for
literal braces). Instruction fields: `subtitle`, `labels`. Answer fields: `explanation`, `label`.
Every output that used a template records its name and sha256 (of the file's bytes).
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
"""The repository's `prompts/` folder (override with `prompts_dir=` where a function takes it)."""

ANSWER_SEPARATOR = "---answer---"
INSTRUCTION_FIELDS = frozenset({"subtitle", "labels"})
ANSWER_FIELDS = frozenset({"explanation", "label"})
FREE_FIELDS = frozenset({"explanation", "reference"})
"""Fields of free-form templates (system, judge prompts) loaded with `kind="free"`."""


def _fields(text: str, where: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as exc:
        raise ValueError(f"{where}: bad placeholder syntax ({exc}); write literal braces as {{{{ and }}}}") from None


@dataclass(frozen=True)
class PromptTemplate:
    """A loaded template: `instruction` and `answer` texts, their fields, and the file's sha256."""

    name: str
    instruction: str
    answer: str
    sha256: str
    path: Path

    @property
    def text(self) -> str:
        """The instruction text (the whole file for templates without an answer part)."""
        return self.instruction

    def render(self, **values: str) -> str:
        """The instruction with every field filled; raises ValueError naming a missing field."""
        return _fill(self.instruction, values, f"prompt '{self.name}'")

    def render_answer(self, **values: str) -> str:
        """The answer (training target) with every field filled, stripped."""
        return _fill(self.answer, values, f"prompt '{self.name}' answer").strip()


def _fill(text: str, values: dict[str, str], where: str) -> str:
    missing = _fields(text, where) - set(values)
    if missing:
        raise ValueError(f"{where} needs field(s) {sorted(missing)}; got {sorted(values)}")
    return text.format(**values)


def available_prompts(prompts_dir: str | Path | None = None) -> list[str]:
    return sorted(p.stem for p in Path(prompts_dir or PROMPTS_DIR).glob("*.txt"))


def load_prompt(name: str, prompts_dir: str | Path | None = None, kind: str = "task") -> PromptTemplate:
    """Load `prompts/<name>.txt` and check its fields.

    Args:
        name: template name (file stem).
        prompts_dir: folder to read from (default: the repository's `prompts/`).
        kind: "task" (instruction/answer fields checked) or "free" (system and judge prompts).
    Raises:
        FileNotFoundError: no such template (the message lists the available ones).
        ValueError: unknown fields or bad placeholder syntax.
    """
    folder = Path(prompts_dir or PROMPTS_DIR)
    path = folder / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"prompt '{name}' not found in {folder}; available: {available_prompts(folder)}")
    raw = path.read_bytes()
    text = raw.decode("utf-8")
    instruction, sep, answer = text.partition(ANSWER_SEPARATOR + "\n")
    if not sep:
        instruction, answer = text, "{label}"
    instruction = instruction.rstrip("\n")
    where = str(path)
    if kind == "task":
        bad = (_fields(instruction, where) - INSTRUCTION_FIELDS) | (_fields(answer, where) - ANSWER_FIELDS)
        allowed = sorted(INSTRUCTION_FIELDS | ANSWER_FIELDS)
    elif kind == "free":
        bad = _fields(text, where) - FREE_FIELDS
        allowed = sorted(FREE_FIELDS)
    else:
        raise ValueError(f"kind={kind!r} unknown; valid: ['free', 'task']")
    if bad:
        raise ValueError(f"{where}: unknown field(s) {sorted(bad)}; allowed: {allowed}")
    return PromptTemplate(name, instruction, answer, hashlib.sha256(raw).hexdigest(), path)
