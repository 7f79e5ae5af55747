"""Linear probes on a frozen backbone's modality-pooled hidden states, layer by layer.

What a backbone *perceives* (is a cue linearly decodable from its features?) is separate from what it
*says* (its generated answer). This module measures the first:

- `pooled_hidden_states` runs the thinker (bare, peft-wrapped, or inside a `MerModel`) on inference
  batches and pools every hidden state (the embeddings, then the output of each language-model layer;
  the last one after the final norm) per modality over the prompt positions
  (`mllm_mer.fusion.heads.pool_by_modality`: mean over text / audio / video tokens, plus the last
  prompt token), giving (N, L + 1, 4, D) features.
- `probe_targets` gives the probed quantities per sample: the audio cue, the video cue, and on conflict
  clips which modality is genuine (the one whose cue equals the label: "video" on `video_aligned`,
  "audio" on `audio_aligned`; other clips are left out).
- `fit_probe` fits a standardised multinomial logistic regression (scikit-learn) on train features and
  scores it on test features; `probe_report` does that per target and per layer, on the pooled slots
  `DEFAULT_SLOTS` names for the target: a cue is read from its own modality's tokens only (in the
  Qwen-Omni layout a clip's video tokens come before its audio tokens, so under causal attention the
  video slot carries no audio; a probe over every slot could read the face's cue off the voice, which on
  the mostly consistent train clips says the same), the genuine modality from all slots. The layer and the
  regularisation strength reported as `test_accuracy` are chosen by cross-validation on the train
  clips only (the test clips are scored once, at that choice); `per_layer` lists every layer's test
  accuracy for the picture, not for choosing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from mllm_mer.data.collate import MODEL_INPUT_KEYS, model_inputs
from mllm_mer.data.schema import Sample
from mllm_mer.encoders import backbone_inputs
from mllm_mer.fusion.heads import POOLED_SLOTS, pool_by_modality
from mllm_mer.model import MerModel

PROBE_TARGETS: tuple[str, ...] = ("audio_cue", "video_cue", "genuine")
"""What `probe_report` probes: each modality's cue, and which modality is genuine on conflict clips."""
DEFAULT_SLOTS: dict[str, tuple[str, ...]] = {
    "audio_cue": ("audio",),
    "video_cue": ("video",),
    "genuine": POOLED_SLOTS,
}
"""Pooled slots (`POOLED_SLOTS` names) each target's probe reads."""
C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0)
"""Inverse regularisation strengths tried by cross-validation on the train clips."""


@dataclass(frozen=True)
class PooledFeatures:
    """Pooled hidden states of N samples.

    Attributes:
        ids: the N sample ids, in order.
        features: (N, L + 1, S, D) float32: index 0 = embeddings, l = after language-model layer l;
            S slots in `POOLED_SLOTS` order (text, audio, video mean, last prompt token).
    """

    ids: list[str]
    features: torch.Tensor


def _hidden_states(model: nn.Module, batch: Mapping) -> tuple[torch.Tensor, ...]:
    if isinstance(model, MerModel):
        inputs = backbone_inputs(model.backbone, dict(batch), MODEL_INPUT_KEYS)
        with model.backbone_scope(batch["token_modality"]):
            out = model.backbone(**inputs, use_audio_in_video=bool(batch.get("use_audio_in_video", False)),
                                 output_hidden_states=True, use_cache=False)
    else:
        inputs = model_inputs(dict(batch))
        out = model(**inputs, use_audio_in_video=bool(batch.get("use_audio_in_video", False)),
                    output_hidden_states=True, use_cache=False)
    return out.hidden_states


@torch.no_grad()
def pooled_hidden_states(model: nn.Module, batches: Iterable[Mapping]) -> PooledFeatures:
    """Modality-pooled hidden states of every layer for every sample of `batches`.

    Args:
        model: the thinker, a peft-wrapped thinker, or a `MerModel` (its adapters and routing active); put it
            in eval mode first.
        batches: collator outputs (e.g. `mllm_mer.generation.build_inference_loader`) with `token_modality`
            (B, T) long, `prompt_mask` (B, T) bool and `sample_ids`.
    Returns:
        `PooledFeatures` with features (N, L + 1, 4, D) float32 on the CPU.
    """
    ids: list[str] = []
    chunks: list[torch.Tensor] = []
    for batch in batches:
        hidden = _hidden_states(model, batch)  # L + 1 tensors of (B, T, D)
        modality, prompt = batch["token_modality"], batch["prompt_mask"].bool()
        pooled = [pool_by_modality(h, modality.to(h.device), prompt.to(h.device)).float().cpu() for h in hidden]
        chunks.append(torch.stack(pooled, dim=1))  # (B, L + 1, 4, D)
        ids.extend(batch["sample_ids"])
    return PooledFeatures(ids=ids, features=torch.cat(chunks, dim=0))


def genuine_modality(sample: Sample) -> str | None:
    """"video" on a video_aligned clip, "audio" on an audio_aligned clip, else None."""
    return {"video_aligned": "video", "audio_aligned": "audio"}.get(sample.subset or "")


def probe_targets(samples: Sequence[Sample]) -> dict[str, list[str | None]]:
    """Per target of `PROBE_TARGETS`, the value of every sample (None = not probed on that sample)."""
    return {
        "audio_cue": [s.cues.get("audio") or None for s in samples],
        "video_cue": [s.cues.get("video") or None for s in samples],
        "genuine": [genuine_modality(s) for s in samples],
    }


def _probe(c: float, seed: int):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))


def fit_probe(
    x_train: np.ndarray, y_train: Sequence[str], x_test: np.ndarray, y_test: Sequence[str], c: float = 0.1,
    seed: int = 0,
) -> dict:
    """Fit a standardised logistic-regression probe on train, score it on test.

    Args:
        x_train: (N_train, F) features; y_train: N_train class names (at least two distinct).
        x_test: (N_test, F) features; y_test: N_test class names.
        c: inverse regularisation strength.
        seed: solver seed.
    Returns:
        {"train_accuracy", "test_accuracy", "n_train", "n_test"}.
    Raises:
        ValueError: fewer than two classes in `y_train`, or mismatched lengths.
    """
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(f"features and targets differ in length: train {len(x_train)} vs {len(y_train)}, "
                         f"test {len(x_test)} vs {len(y_test)}")
    if len(set(y_train)) < 2:
        raise ValueError(f"a probe needs at least two classes among the train targets, got {sorted(set(y_train))}")
    clf = _probe(c, seed).fit(x_train, list(y_train))
    test = float(np.mean(clf.predict(x_test) == np.asarray(y_test))) if len(y_test) else None
    return {"train_accuracy": float(clf.score(x_train, list(y_train))), "test_accuracy": test,
            "n_train": len(y_train), "n_test": len(y_test)}


def _cv_accuracy(x: np.ndarray, y: list[str], c: float, folds: int, seed: int) -> float:
    k = min(folds, min(y.count(v) for v in set(y)))
    if k < 2:
        return float("nan")
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return float(cross_val_score(_probe(c, seed), x, y, cv=cv).mean())


def probe_report(
    train: PooledFeatures, train_samples: Sequence[Sample], test: PooledFeatures, test_samples: Sequence[Sample],
    targets: Sequence[str] = PROBE_TARGETS, folds: int = 5, seed: int = 0,
    slots: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """Per target and layer, probe accuracy on test clips of a probe fitted on train clips.

    Args:
        train / test: pooled features whose `ids` follow `train_samples` / `test_samples`.
        targets: a subset of `PROBE_TARGETS`.
        folds: cross-validation folds on train for choosing the layer and C (fewer when a class is rare).
        seed: fold and solver seed.
        slots: {target: pooled slot names the probe reads}; None = `DEFAULT_SLOTS`.
    Returns:
        {target: {"slots", "selected_layer", "selected_c", "cv_accuracy", "test_accuracy" (at the
        selection), "per_subset": {subset: test accuracy at the selection}, "per_layer": [test accuracy
        at C = selected_c, for layer 0 (embeddings) .. L], "n_train", "n_test", "majority_test_accuracy"
        (always predicting the train majority class)}}; a target with fewer than two train classes or no
        test sample maps to {"skipped": reason}.
    Raises:
        ValueError: ids of the features and the samples differ, or an unknown target or slot name.
    """
    for name, feats, samples in (("train", train, train_samples), ("test", test, test_samples)):
        if feats.ids != [s.id for s in samples]:
            raise ValueError(f"{name} features do not follow the {name} samples (ids differ)")
    unknown = [t for t in targets if t not in PROBE_TARGETS]
    if unknown:
        raise ValueError(f"unknown probe targets {unknown}; valid: {list(PROBE_TARGETS)}")
    slots = {**DEFAULT_SLOTS, **(slots or {})}
    bad = sorted({n for t in targets for n in slots[t] if n not in POOLED_SLOTS})
    if bad:
        raise ValueError(f"unknown pooled slots {bad}; valid: {list(POOLED_SLOTS)}")
    y_tr_all, y_te_all = probe_targets(train_samples), probe_targets(test_samples)
    report: dict = {}
    for target in targets:
        index = [POOLED_SLOTS.index(n) for n in slots[target]]
        x_tr_all = train.features[:, :, index].flatten(2).numpy()  # (N, L + 1, len(index) * D)
        x_te_all = test.features[:, :, index].flatten(2).numpy()
        i_tr = [i for i, v in enumerate(y_tr_all[target]) if v is not None]
        i_te = [i for i, v in enumerate(y_te_all[target]) if v is not None]
        y_tr = [y_tr_all[target][i] for i in i_tr]
        y_te = [y_te_all[target][i] for i in i_te]
        if len(set(y_tr)) < 2 or not y_te:
            report[target] = {"skipped": f"{len(set(y_tr))} train classes, {len(y_te)} test samples"}
            continue
        layers = x_tr_all.shape[1]
        cv = {(layer, c): _cv_accuracy(x_tr_all[i_tr, layer], y_tr, c, folds, seed)
              for layer in range(layers) for c in C_GRID}
        layer, c = max(cv, key=lambda k: (np.nan_to_num(cv[k], nan=-1.0), -k[0]))
        per_layer = [fit_probe(x_tr_all[i_tr, l_], y_tr, x_te_all[i_te, l_], y_te, c, seed)["test_accuracy"]
                     for l_ in range(layers)]
        hits = _probe(c, seed).fit(x_tr_all[i_tr, layer], y_tr).predict(x_te_all[i_te, layer]) == np.asarray(y_te)
        subsets = [test_samples[i].subset for i in i_te]
        per_subset = {name: float(np.mean([h for h, s in zip(hits, subsets, strict=True) if s == name]))
                      for name in dict.fromkeys(s for s in subsets if s is not None)}
        majority = max(set(y_tr), key=y_tr.count)
        report[target] = {
            "slots": list(slots[target]), "selected_layer": layer, "selected_c": c, "cv_accuracy": cv[layer, c],
            "test_accuracy": per_layer[layer], "per_subset": per_subset, "per_layer": per_layer,
            "n_train": len(y_tr), "n_test": len(y_te),
            "majority_test_accuracy": float(np.mean([v == majority for v in y_te])),
        }
    return report


__all__ = [
    "C_GRID", "DEFAULT_SLOTS", "POOLED_SLOTS", "PROBE_TARGETS", "PooledFeatures", "fit_probe", "genuine_modality",
    "pooled_hidden_states", "probe_report", "probe_targets",
]
