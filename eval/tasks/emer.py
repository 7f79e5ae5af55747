"""Benchmarks `emer-ov` (open-vocabulary words) and `emer-judge` (generated explanations).

- ``emer-ov``: `name,openset` CSVs (`read_openset_csv`), scored with `emotion_wheel_score`.
  Predictions may be our JSONL: `labels_ov`, else `text` split with
  `mllm_mer.labels.parse_openset_answer`; or a CSV with an `openset` column.
- ``emer-judge``: an EMER CSV, v1 (`names,emotions,subtitles,reasons`: the reference is `reasons`) or
  v2 (`name,chinese,english`: the reference is the `EvalOptions.emer_language` column), read without
  media with the readers' row rules (`named_csv_rows`); rows with an empty reference are skipped with a
  warning. Predictions need `text`. Scored by `judge_predictions` with an OpenAI-compatible judge, a
  local transformers judge, or the offline `EmbeddingSimilarity` PROXY (OUT.json then says
  ``"proxy": true``; never report it as an EMER score).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from eval.emotion_wheel import emotion_wheel_score, read_openset_csv
from eval.judge import EmbeddingSimilarity, LocalJudge, OpenAIJudge, Scorer, judge_predictions
from eval.tasks.common import JUDGES, EvalOptions, listed_ids, match_ids, result_inputs
from eval.tasks.predictions import read_predictions
from mllm_mer.data.readers import named_csv_rows
from mllm_mer.labels import parse_openset_answer


def evaluate_emer_ov(opts: EvalOptions) -> dict[str, Any]:
    """Emotion-wheel score of open-vocabulary predictions against a `name,openset` CSV.

    Returns:
        `{"task", "n", "level1": {"fscore", "precision", "recall", "per_wheel": {wheel: {...}}},
        "level2": {...}, "inputs", "warnings"}`.
    """
    warnings: list[str] = []
    if not opts.references.is_file():
        raise FileNotFoundError(f"references file not found: {opts.references}")
    gt = read_openset_csv(opts.references)
    if not gt:
        raise ValueError(f"{opts.references}: holds no reference rows")
    preds = read_predictions(opts.predictions)
    missing = match_ids(preds, list(gt), opts, warnings)
    words: dict[str, list[str]] = {}
    for sid in gt:
        if sid in missing:
            words[sid] = []
            continue
        row = preds[sid]
        if row.labels_ov is not None:
            words[sid] = list(row.labels_ov)
        elif row.text is not None:
            words[sid] = parse_openset_answer(row.text)
        else:
            raise ValueError(f"{row.where}: the row has no 'labels_ov' / 'openset' and no 'text'")
    empty_gt = [sid for sid, w in gt.items() if not w]
    if empty_gt:
        warnings.append(
            f"{len(empty_gt)} reference(s) have an empty openset and are not scored: {listed_ids(empty_gt)}"
        )
    scores = emotion_wheel_score(gt, words)
    return {
        "task": "emer-ov",
        "n": len(gt),
        **scores,
        "inputs": result_inputs(opts, [opts.references]),
        "warnings": warnings,
    }


def read_emer_references(path: Path, language: str, warnings: list[str]) -> dict[str, str]:
    """id -> reference text from an EMER v1 (`reasons`) or v2 (`english` / `chinese`) CSV, media not needed.

    Args:
        path: the EMER CSV.
        language: v2 column to use, one of `EMER_LANGUAGES`.
        warnings: receives one line when rows with an empty reference are skipped.
    Raises:
        ValueError: a missing file, an unknown header (neither v1 nor v2), or a bad row.
    """
    if not path.is_file():
        raise FileNotFoundError(f"references file not found: {path}")
    with path.open(encoding="utf-8-sig", newline="") as fh:
        header = [h.strip() for h in next(csv.reader(fh), [])]
    if "reasons" in header:
        id_spellings, text_col = ("names", "name"), "reasons"
    elif language in header:
        id_spellings, text_col = ("name", "names"), language
    else:
        raise ValueError(
            f"{path}: not an EMER CSV; expected v1 'names,emotions,subtitles,reasons' or v2 "
            f"'name,chinese,english' (with column {language!r}); header is {header}"
        )
    refs, empty = {}, []
    for _, name, row in named_csv_rows(path, [id_spellings, text_col]):  # the readers' row rules
        if not row[text_col].strip():
            empty.append(name)
            continue
        refs[name] = row[text_col].strip()
    if empty:
        warnings.append(
            f"{path}: skipped {len(empty)} row(s) with an empty {text_col!r}: {listed_ids(empty)}"
        )
    if not refs:
        raise ValueError(f"{path}: no reference rows with a non-empty {text_col!r}")
    return refs


def build_scorer(opts: EvalOptions) -> Scorer:
    """The emer-judge backend named by `opts.judge` (or `opts.scorer` when given).

    Raises:
        ValueError: no judge chosen, a required option missing, or the embedding weights not installed.
    """
    if opts.scorer is not None:
        return opts.scorer
    if opts.judge is None:
        raise ValueError(f"emer-judge needs --judge, one of {list(JUDGES)}")
    if opts.judge == "openai":
        if not opts.judge_model:
            raise ValueError("--judge openai needs --judge-model (the model name the server expects)")
        return OpenAIJudge(opts.judge_url, opts.judge_model, cache_dir=opts.judge_cache)
    if opts.judge == "local":
        if not opts.judge_model:
            raise ValueError("--judge local needs --judge-model (a local causal-LM folder)")
        return LocalJudge(opts.judge_model, device=opts.judge_device, cache_dir=opts.judge_cache)
    if opts.judge_cache is not None:
        raise ValueError(
            "--judge-cache applies to the openai and local judges; the embedding proxy caches nothing"
        )
    try:
        return EmbeddingSimilarity(model_path=opts.judge_model, device=opts.judge_device)
    except ImportError as err:
        raise ValueError(f"--judge embedding: {err}") from None


def evaluate_emer_judge(opts: EvalOptions) -> dict[str, Any]:
    """LLM-judge (or embedding-proxy) scores of generated explanations against EMER references.

    Returns:
        `{"task", "n", "proxy", "mean_score", "n_scored", "n_failed", "n_total", "n_unreferenced",
        "scores", "failures", "judge", "inputs", "warnings"}` (the middle keys from `judge_predictions`).
    """
    warnings: list[str] = []
    refs = read_emer_references(opts.references, opts.emer_language, warnings)
    preds = read_predictions(opts.predictions)
    missing = match_ids(preds, list(refs), opts, warnings)
    texts: dict[str, str] = {}
    for sid in refs:
        if sid in missing:
            continue
        row = preds[sid]
        if row.text is None:
            raise ValueError(f"{row.where}: emer-judge needs the generated 'text', the row has none")
        texts[sid] = row.text
    scorer = build_scorer(opts)
    judged = judge_predictions(scorer, texts, refs)
    proxy = str(judged["judge"].get("protocol", "")).startswith("PROXY")
    if proxy:
        warnings.append("scores are an embedding-similarity PROXY, not the EMER LLM-judge protocol")
    n_backend = judged["n_failed"] - len(missing)
    if n_backend:
        warnings.append(f"the judge failed on {n_backend} sample(s); see 'failures'")
    return {
        "task": "emer-judge",
        "n": len(refs),
        "proxy": proxy,
        **judged,
        "inputs": result_inputs(opts, [opts.references]),
        "warnings": warnings,
    }
