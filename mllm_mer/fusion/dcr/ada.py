"""The ADA arbiter (DCR Path II): a contextual bandit that keeps the fused prediction or drops to a modality.

Arms (`ARMS`): fused, text, audio, video. The paper ("To Fuse or to Drop?", 2026) is public as an abstract
only; the state, reward and policy below are ours.

State ("dual view": the fused view and the unimodal views of one sample), from the four paths' class
probabilities p_a (C each) alone; `dcr.arbiter.state="probs"`:

    x = [p_a for a in ARMS] + [H(p_a) / ln C] + [top1(p_a) - top2(p_a)]
        + [JS(p_a, p_b) / ln 2 for a < b] + [1]

(4C + 4 + 4 + 6 + 1 features; pooled hidden features are not used); `state="rich"` inserts
before the bias every path's max probability (with its entropy: the per-modality confidence of the audio
and video teachers) and the agreement of every pair (audio vs video, each vs fused, ...), in its smooth form
sum_c p_a,c p_b,c (the chance that the two paths name the same class; 1[argmax p_a = argmax p_b] for
one-hot paths, but it does not flip on near-ties): 4 + 6 more features. `state="reliable"` (the default)
adds to "rich" each unimodal path's predicted reliability r_p (`mllm_mer.fusion.dcr.paths.ReliabilityHead`:
the path's true-class probability as predicted from its own hidden states, a ridge fit on the training split
after training, from labels only; `mllm_mer.fusion.dcr.reliability`) and r_p * (1 - agree_audio_video), so
a linear policy can trust a path's reliability more when the
audio and video paths disagree: 3 + 3 more features. Reward of arm a for a sample with label y:

    r_a = 1[answer_a = y] - lambda_cal * cal(p_a, y),     cal = Brier / 2 = sum_c (p_a,c - 1[c = y])^2 / 2
                                                          or  -log max(p_a,y, 1e-6) / ln C   ("nll")

where answer_a is, with `reward="answer"` (our default), the label of the answer the model generates from
arm a's modalities (what the arbiter decides, with `answer="arm"`), and with `reward="head"` argmax p_a;
so the arbiter learns from the sample's label only, through the reward: nothing here reads per-modality cue
labels (real datasets have none). `fit_arbiter(probs, labels, config)` takes exactly those two inputs.

Policy: disjoint LinUCB. Per arm, A_a = ridge * I + sum x x^T and b_a = sum r x; theta_a = A_a^-1 b_a. With
`feedback="full"` (the default: the fitting set is labelled, so every arm's reward is known) every arm is
updated with every sample once (ridge regression per arm); with `feedback="bandit"` the arm played while
fitting is argmax_a theta_a . x + alpha * sqrt(x^T A_a^-1 x) (ties -> the first arm, fused) and only that arm
is updated with its reward, `epochs` passes. After fitting, `select` is greedy: argmax_a theta_a . x, with
`fuse_margin` added to the fused arm's score (ties to fused). Fitting is meant for held-out predictions
(dev): `scripts/fit_arbiter.py` refuses the run's training data, and when it scores the arbiter on the set
it was fitted on it cross-fits (`crossfit_select`: each of `dcr.arbiter.folds` folds is scored by an
arbiter fitted on the other folds). With `answer="arm"` (default), `mllm_mer.generation` answers a clip
routed to a unimodal arm again from that modality alone (`ARM_INPUTS`).
The policy is stored as JSON (`arbiter.json` in the run directory; never pickle).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm_mer.fusion.dcr.afd import js_divergence
from mllm_mer.fusion.dcr.config import PATHS, ArbiterConfig

ARMS: tuple[str, ...] = ("fused", "text", "audio", "video")
"""Arms of the arbiter, in index order (the fused path first: it wins ties)."""
STATES: tuple[str, ...] = ("probs", "rich", "reliable")
"""Arbiter states (`ArbiterConfig.state`), each a superset of the one before."""
ARBITER_FILE = "arbiter.json"
"""File name of a fitted arbiter inside a run directory."""
FORMAT = "mllm_mer.dcr.linucb/1"


def feature_names(labels: Sequence[str], state: str = "rich") -> list[str]:
    """Names of the state features, in order (for the JSON file and for reading a fitted policy).

    Args:
        labels: the class names.
        state: one of `STATES` (`ArbiterConfig.state`).
    """
    names = [f"p_{a}_{c}" for a in ARMS for c in labels]
    names += [f"entropy_{a}" for a in ARMS] + [f"margin_{a}" for a in ARMS]
    names += [f"js_{a}_{b}" for a, b in itertools.combinations(ARMS, 2)]
    if state in ("rich", "reliable"):
        names += [f"maxp_{a}" for a in ARMS]
        names += [f"agree_{a}_{b}" for a, b in itertools.combinations(ARMS, 2)]
    if state == "reliable":
        names += [f"reliability_{p}" for p in PATHS] + [f"reliability_{p}_x_av_disagree" for p in PATHS]
    return names + ["bias"]


def build_state(probs: Mapping[str, torch.Tensor], state: str = "rich",
                reliability: torch.Tensor | None = None) -> torch.Tensor:
    """The arbiter's state from the paths' class probabilities (and reliabilities; module docstring).

    Args:
        probs: {arm: (N, C) probabilities} for every arm in `ARMS` (extra keys are ignored).
        state: one of `STATES` (`ArbiterConfig.state`).
        reliability: (N, 3) predicted reliabilities of the unimodal paths in `PATHS` order (prediction rows'
            "reliability"); needed by state "reliable", ignored otherwise.
    Returns:
        (N, 4C + 15) float64 ("probs"), (N, 4C + 25) ("rich"), (N, 4C + 31) ("reliable").
    Raises:
        ValueError: an arm or the reliabilities are missing, or the shapes differ.
    """
    if state not in STATES:
        raise ValueError(f"unknown arbiter state {state!r}; valid: {list(STATES)}")
    missing = [a for a in ARMS if a not in probs]
    if missing:
        raise ValueError(f"the arbiter needs probabilities of every path {list(ARMS)}; missing {missing}")
    ps = [probs[a].detach().to(torch.float64).cpu() for a in ARMS]
    if len({tuple(p.shape) for p in ps}) != 1 or ps[0].dim() != 2:
        raise ValueError(f"path probabilities must all be (N, C), got {[tuple(p.shape) for p in ps]}")
    C = ps[0].shape[1]
    entropy = [-(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(C) for p in ps]
    top2 = [p.topk(min(2, C), dim=-1).values for p in ps]
    margin = [t[:, 0] - t[:, -1] for t in top2]
    js = [js_divergence(ps[i], ps[j]) / math.log(2.0) for i, j in itertools.combinations(range(len(ARMS)), 2)]
    columns = [*ps, torch.stack(entropy, 1), torch.stack(margin, 1), torch.stack(js, 1)]
    if state in ("rich", "reliable"):
        columns.append(torch.stack([t[:, 0] for t in top2], 1))  # max probability per path
        # soft argmax agreement: sum_c p_a,c p_b,c (the indicator flips on near-ties, e.g. with padding noise)
        agree = [(ps[i] * ps[j]).sum(-1) for i, j in itertools.combinations(range(len(ARMS)), 2)]
        columns.append(torch.stack(agree, 1))
    if state == "reliable":
        if reliability is None:
            raise ValueError(
                "dcr.arbiter.state=reliable needs the unimodal paths' predicted reliabilities (prediction rows' "
                "'reliability'): train with dcr.reliability=true (fitted after training), or choose "
                "dcr.arbiter.state=rich"
            )
        r = reliability.detach().to(torch.float64).cpu()
        if r.shape != (len(ps[0]), len(PATHS)):
            raise ValueError(f"reliability must be (N, {len(PATHS)}) = {(len(ps[0]), len(PATHS))}, got {tuple(r.shape)}")
        disagree = 1.0 - (ps[ARMS.index("audio")] * ps[ARMS.index("video")]).sum(-1, keepdim=True)
        columns.extend([r, r * disagree])
    columns.append(torch.ones(len(ps[0]), 1))
    return torch.cat(columns, dim=1)


def arm_rewards(
    probs: Mapping[str, torch.Tensor], labels: torch.Tensor, config: ArbiterConfig,
    answers: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Calibration-aware reward of every arm for every sample (module docstring).

    Args:
        probs: {arm: (N, C) probabilities}.
        labels: (N,) long class ids (the ground truth; the only supervision the arbiter gets).
        config: reward settings (`reward`, `calibration`, `calibration_weight`).
        answers: {arm: (N,) long class id of the answer generated from that arm's modalities, -1 when it
            names no label}; needed by `config.reward="answer"` (the correctness term is then the answer's).
    Returns:
        (N, len(ARMS)) float64.
    Raises:
        ValueError: `reward="answer"` without every arm's answers.
    """
    labels = labels.long().cpu()
    if config.reward == "answer" and (answers is None or any(a not in answers for a in ARMS)):
        raise ValueError("dcr.arbiter.reward=answer needs the answer of every arm on the fitting samples "
                         f"({list(ARMS)}); give them or set dcr.arbiter.reward=head")
    out = []
    for arm in ARMS:
        p = probs[arm].detach().to(torch.float64).cpu()
        C = p.shape[1]
        onehot = torch.nn.functional.one_hot(labels, C).to(torch.float64)
        predicted = answers[arm].long().cpu() if config.reward == "answer" else p.argmax(-1)
        correct = (predicted == labels).to(torch.float64)
        if config.calibration == "brier":
            cal = ((p - onehot) ** 2).sum(-1) / 2.0
        else:
            cal = -p.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-6).log() / math.log(C)
        out.append(correct - config.calibration_weight * cal)
    return torch.stack(out, dim=1)


class LinUCB:
    """Disjoint-arm LinUCB (Li et al., 2010) in float64 numpy.

    Args:
        n_arms: K.
        dim: d, the state size.
        ridge: lambda, A_a starts at lambda * I.
        alpha: exploration weight of the confidence bonus.
    """

    def __init__(self, n_arms: int, dim: int, ridge: float = 1.0, alpha: float = 0.5) -> None:
        self.ridge, self.alpha = float(ridge), float(alpha)
        self.A = np.stack([ridge * np.eye(dim) for _ in range(n_arms)])  # (K, d, d)
        self.b = np.zeros((n_arms, dim))  # (K, d)

    def theta(self) -> np.ndarray:
        """(K, d) ridge estimates theta_a = A_a^-1 b_a."""
        return np.stack([np.linalg.solve(A, b) for A, b in zip(self.A, self.b, strict=True)])

    def expected(self, x: np.ndarray) -> np.ndarray:
        """(N, d) states -> (N, K) estimated rewards theta_a . x."""
        return np.atleast_2d(x) @ self.theta().T

    def ucb(self, x: np.ndarray) -> np.ndarray:
        """(N, d) states -> (N, K) upper confidence bounds theta_a . x + alpha * sqrt(x^T A_a^-1 x)."""
        x = np.atleast_2d(x)
        bonus = np.stack([np.einsum("nd,nd->n", x, np.linalg.solve(A, x.T).T) for A in self.A], axis=1)
        return self.expected(x) + self.alpha * np.sqrt(np.maximum(bonus, 0.0))

    def update(self, arm: int, x: np.ndarray, reward: float) -> None:
        """A_arm += x x^T; b_arm += reward * x."""
        self.A[arm] += np.outer(x, x)
        self.b[arm] += reward * x


@dataclass
class Arbiter:
    """A fitted arbiter: the LinUCB statistics plus what they mean.

    Attributes:
        labels: the class names, in the order of the probabilities' columns.
        policy: the LinUCB statistics.
        config: the settings it was fit with.
        fit_info: provenance (data file, its sha256, sample count, mean reward, ...).
    """

    labels: tuple[str, ...]
    policy: LinUCB
    config: ArbiterConfig
    fit_info: dict[str, Any]

    def select(self, probs: Mapping[str, torch.Tensor], reliability: torch.Tensor | None = None) -> list[str]:
        """Greedy arm per sample: argmax_a theta_a . x, the fused arm's score raised by
        `config.fuse_margin` (ties to fused).

        Args:
            probs: {arm: (N, C) probabilities} in `labels` order.
            reliability: (N, 3) path reliabilities (`build_state`; state "reliable" only).
        Returns:
            N arm names.
        """
        C = next(iter(probs.values())).shape[-1]
        if C != len(self.labels):
            raise ValueError(f"the arbiter was fit on {len(self.labels)} classes, the paths give {C}")
        scores = self.policy.expected(build_state(probs, self.config.state, reliability).numpy())  # (N, K)
        scores[:, ARMS.index("fused")] += self.config.fuse_margin
        return [ARMS[i] for i in scores.argmax(axis=1)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "arms": list(ARMS),
            "labels": list(self.labels),
            "features": feature_names(self.labels, self.config.state),
            "config": asdict(self.config),
            "A": self.policy.A.tolist(),
            "b": self.policy.b.tolist(),
            "fit": self.fit_info,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "arbiter") -> Arbiter:
        """Rebuild from `to_dict` output.

        Raises:
            ValueError: another format, other arms, or statistics whose shapes do not match the labels.
        """
        if data.get("format") != FORMAT or list(data.get("arms", [])) != list(ARMS):
            raise ValueError(f"{where}: not a {FORMAT} arbiter over arms {list(ARMS)}")
        labels = tuple(data["labels"])
        # files written before `state` / `folds` existed used the "probs" state
        config = ArbiterConfig(**{"state": "probs", "reward": "head", **data["config"]})  # older files
        dim = len(feature_names(labels, config.state))
        A, b = np.asarray(data["A"], dtype=np.float64), np.asarray(data["b"], dtype=np.float64)
        if A.shape != (len(ARMS), dim, dim) or b.shape != (len(ARMS), dim):
            raise ValueError(
                f"{where}: A {A.shape} / b {b.shape} do not fit {len(ARMS)} arms x {dim} features"
            )
        policy = LinUCB(len(ARMS), dim, config.ridge, config.alpha)
        policy.A, policy.b = A, b
        return cls(labels=labels, policy=policy, config=config, fit_info=dict(data.get("fit", {})))


def fit_arbiter(probs: Mapping[str, torch.Tensor], labels: torch.Tensor, config: ArbiterConfig,
                answers: Mapping[str, torch.Tensor] | None = None, reliability: torch.Tensor | None = None) -> Arbiter:
    """Fit the LinUCB arbiter on held-out predictions: path probabilities, the model's own answers per arm
    and labels, nothing else.

    Args:
        probs: {arm: (N, C) probabilities} for every arm in `ARMS`, columns in label order.
        labels: (N,) long ground-truth class ids.
        config: policy and reward settings.
        answers: {arm: (N,) long class ids of the answer from that arm's modalities (-1: none)}; needed
            by `config.reward="answer"` (`arm_rewards`).
        reliability: (N, 3) path reliabilities, for `config.state="reliable"` (`build_state`).
    Returns:
        The fitted `Arbiter` (`labels` holds placeholders "0".."C-1"; the caller sets the names).
    """
    x = build_state(probs, config.state, reliability).numpy()  # (N, d)
    rewards = arm_rewards(probs, labels, config, answers).numpy()  # (N, K)
    if len(x) != len(rewards):
        raise ValueError(f"{len(x)} predictions but {len(rewards)} labels")
    policy = LinUCB(len(ARMS), x.shape[1], config.ridge, config.alpha)
    rng = np.random.default_rng(config.seed)
    played: list[int] = []
    if config.feedback == "full":  # every arm learns every sample's reward, once: ridge regression per arm
        for arm in range(len(ARMS)):
            policy.A[arm] += x.T @ x
            policy.b[arm] += x.T @ rewards[:, arm]
    else:
        for _ in range(config.epochs):
            for i in rng.permutation(len(x)):
                arm = int(policy.ucb(x[i]).argmax())
                played.append(arm)
                policy.update(arm, x[i], float(rewards[i, arm]))
    chosen = policy.expected(x).argmax(axis=1)
    info = {
        "n": len(x),
        "mean_reward": {a: float(rewards[:, k].mean()) for k, a in enumerate(ARMS)},
        "mean_reward_selected": float(rewards[np.arange(len(x)), chosen].mean()),
        "mean_reward_oracle": float(rewards.max(axis=1).mean()),
    }
    if played:
        info["played"] = {a: played.count(k) for k, a in enumerate(ARMS)}
    C = next(iter(probs.values())).shape[1]
    return Arbiter(labels=tuple(str(c) for c in range(C)), policy=policy, config=config, fit_info=info)


def fold_ids(n: int, folds: int, seed: int = 0) -> np.ndarray:
    """Seeded fold of each of `n` samples: a random permutation dealt round-robin into `folds` folds.

    Returns:
        (n,) int array with values in [0, min(folds, n)).
    """
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n) % max(1, min(folds, n))
    return out


def crossfit_select(
    probs: Mapping[str, torch.Tensor], labels: torch.Tensor, config: ArbiterConfig,
    answers: Mapping[str, torch.Tensor] | None = None, reliability: torch.Tensor | None = None,
    folds: np.ndarray | None = None,
) -> tuple[list[str], np.ndarray]:
    """Cross-fitted arm choices: each sample is scored by an arbiter fitted on the other folds only.

    Use it whenever the arbiter is judged on the set it is fitted on (a sample's own label never reaches
    the arbiter that scores it).

    Args:
        probs: {arm: (N, C) probabilities} for every arm in `ARMS`.
        labels: (N,) long ground-truth class ids.
        config: the arbiter settings (`folds`, `seed` and the fit settings).
        answers: per-arm answers (`fit_arbiter`), for `config.reward="answer"`.
        reliability: (N, 3) path reliabilities, for `config.state="reliable"`.
        folds: (N,) fold id per sample; None = `fold_ids(N, config.folds, config.seed)`.
    Returns:
        (N arm names, (N,) fold id per sample).
    Raises:
        ValueError: fewer than 2 samples, or `folds` of another length or with a single fold.
    """
    n = len(labels)
    if n < 2:
        raise ValueError(f"cross-fitting needs at least 2 samples, got {n}")
    if folds is None:
        folds = fold_ids(n, config.folds, config.seed)
    folds = np.asarray(folds)
    if folds.shape != (n,) or len(np.unique(folds)) < 2:
        raise ValueError(f"folds must give each of the {n} samples a fold id, with at least 2 folds")
    arms: list[str] = [""] * n
    for k in np.unique(folds):
        held = torch.as_tensor(folds == k)
        fit = {a: p[~held] for a, p in probs.items() if a in ARMS}
        fit_answers = None if answers is None else {a: v[~held] for a, v in answers.items()}
        fit_rel, held_rel = (None, None) if reliability is None else (reliability[~held], reliability[held])
        arbiter = fit_arbiter(fit, labels[~held], config, fit_answers, fit_rel)
        chosen = arbiter.select({a: p[held] for a, p in probs.items() if a in ARMS}, held_rel)
        for i, arm in zip(np.flatnonzero(folds == k), chosen, strict=True):
            arms[int(i)] = arm
    return arms, folds


def crossfit_accuracy(
    probs: Mapping[str, torch.Tensor], labels: torch.Tensor, config: ArbiterConfig,
    answers: Mapping[str, torch.Tensor] | None = None, reliability: torch.Tensor | None = None,
    folds: np.ndarray | None = None,
) -> tuple[list[str], dict[str, float]]:
    """`crossfit_select`'s arm choices and how often they are right.

    Returns:
        (N arm names, {"accuracy": share whose chosen arm's head names the label, and, with `answers`,
        "answer_accuracy": share whose answer from the chosen arm's modalities does}).
    """
    arms, _ = crossfit_select(probs, labels, config, answers, reliability, folds)
    y = labels.long().cpu()
    heads = torch.stack([probs[a][i] for i, a in enumerate(arms)]).argmax(-1).cpu()
    scores = {"accuracy": float((heads == y).double().mean())}
    if answers is not None:
        routed = torch.stack([answers[a][i] for i, a in enumerate(arms)]).long().cpu()
        scores["answer_accuracy"] = float((routed == y).double().mean())
    return arms, scores


SEARCH_GRID: dict[str, tuple] = {"state": ("rich", "reliable"), "feedback": ("full", "bandit"),
                                 "calibration_weight": (0.0, 0.5), "fuse_margin": (0.0, 0.1, 0.25)}
"""`ArbiterConfig` values `search_arbiter` tries by default (ours): 24 settings, the conflict ablation's grid."""


def search_arbiter(
    probs: Mapping[str, torch.Tensor], labels: torch.Tensor, base: ArbiterConfig,
    answers: Mapping[str, torch.Tensor] | None = None, reliability: torch.Tensor | None = None,
    grid: Mapping[str, Sequence[Any]] = SEARCH_GRID, folds: np.ndarray | None = None,
) -> tuple[ArbiterConfig, list[dict[str, Any]]]:
    """Choose the arbiter's settings on labelled held-out data by cross-fitted accuracy (our protocol).

    Every combination of `grid` (`ArbiterConfig` field -> values, the other fields from `base`) is scored by
    `crossfit_accuracy` on the same folds: the share of samples whose chosen arm's answer (`answers`; without
    them, the chosen arm's head) names the label, each sample judged by an arbiter fitted on the other folds.
    The best setting wins; ties keep the earlier one in grid order (the grid lists the plainer values first).
    Without `reliability`, the "reliable" state is left out of the grid.

    Args:
        probs, labels, answers, reliability: as `fit_arbiter` (answers: needed by `base.reward="answer"`).
        base: the settings the grid's fields are replaced in.
        grid: {field: candidate values}.
        folds: (N,) fold id per sample; None = `fold_ids(N, base.folds, base.seed)`.
    Returns:
        (the chosen settings, one record per setting: {"values", "accuracy" (head), "answer_accuracy" (with
        `answers`)}, as `crossfit_accuracy` scores it).
    Raises:
        ValueError: a grid field that `ArbiterConfig` does not have, or an empty grid.
    """
    unknown = sorted(set(grid) - {f.name for f in dataclasses.fields(ArbiterConfig)})
    if unknown:
        raise ValueError(f"search grid fields {unknown} are not dcr.arbiter fields")
    grid = {k: tuple(v) for k, v in grid.items()}
    if reliability is None and "state" in grid:  # the state cannot read reliabilities the rows do not have
        grid["state"] = tuple(v for v in grid["state"] if v != "reliable")
    if not grid or any(not v for v in grid.values()):
        raise ValueError(f"the search grid has no setting to try: {grid}")
    if folds is None:
        folds = fold_ids(len(labels), base.folds, base.seed)
    key = "answer_accuracy" if answers is not None else "accuracy"
    records: list[dict[str, Any]] = []
    best: tuple[float, ArbiterConfig] | None = None
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo, strict=True))
        config = dataclasses.replace(base, **values)
        _, scores = crossfit_accuracy(probs, labels, config, answers, reliability, folds)
        records.append({"values": values, **scores})
        if best is None or scores[key] > best[0]:
            best = (scores[key], config)
    return best[1], records


def save_arbiter(arbiter: Arbiter, path: str | Path) -> Path:
    """Write the arbiter as JSON (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(arbiter.to_dict(), indent=1))
    os.replace(tmp, path)
    return path


def load_arbiter(path: str | Path, labels: Sequence[str] | None = None) -> Arbiter:
    """Read an arbiter JSON file.

    Args:
        path: the `arbiter.json`.
        labels: if given, the label set it must have been fit on (same order).
    Raises:
        ValueError: a malformed file, or labels that differ from `labels`.
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    arbiter = Arbiter.from_dict(data, str(path))
    if labels is not None and tuple(labels) != arbiter.labels:
        raise ValueError(f"{path} was fit on labels {list(arbiter.labels)}, the run uses {list(labels)}")
    return arbiter


def add_arbiter_path(
    arbiter: Arbiter, probs: Mapping[str, torch.Tensor], reliability: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Add the "arbiter" path: per sample, the probabilities of the arm the arbiter picks.

    Args:
        arbiter: a fitted arbiter.
        probs: {path: (B, C) probabilities} with every arm in `ARMS`.
        reliability: (B, 3) path reliabilities (state "reliable").
    Returns:
        ({**probs, "arbiter": (B, C)}, the B chosen arm names).
    """
    arms = arbiter.select(probs, reliability)
    stacked = torch.stack([probs[a] for a in ARMS], dim=1)  # (B, K, C)
    index = torch.tensor([ARMS.index(a) for a in arms], device=stacked.device)
    chosen = stacked[torch.arange(len(arms), device=stacked.device), index]  # (B, C)
    return {**probs, "arbiter": chosen}, arms


def load_run_arbiter(run_dir: str | Path, labels: Sequence[str], dcr_enabled: bool) -> Arbiter | None:
    """The run's `arbiter.json` if present (None otherwise).

    Raises:
        ValueError: the file exists but the run has no unimodal paths, or it was fit on other labels.
    """
    path = Path(run_dir) / ARBITER_FILE
    if not path.is_file():
        return None
    if not dcr_enabled:
        raise ValueError(f"{path} exists but the run was trained without dcr.enabled (no unimodal paths)")
    return load_arbiter(path, labels)


def arbiter_inputs(
    rows: Sequence[Mapping[str, Any]], labels_by_id: Mapping[str, str], label_names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Turn prediction rows into `fit_arbiter`'s inputs: per-path probabilities and the label, nothing else.

    Args:
        rows: `predict_rows` output (`id`, `probs` {path: {label: p}}); other fields are not read.
        labels_by_id: sample id -> ground-truth label.
        label_names: the label set (column order).
    Returns:
        ({arm: (N, C) float64}, (N,) long class ids).
    Raises:
        ValueError: a row without probabilities of every arm, or a label outside `label_names`.
    """
    index = {name: i for i, name in enumerate(label_names)}
    probs: dict[str, list[list[float]]] = {a: [] for a in ARMS}
    ys = []
    for row in rows:
        dist = row.get("probs") or {}
        missing = [a for a in ARMS if a not in dist]
        if missing:
            raise ValueError(f"prediction {row.get('id')!r} lacks probabilities of paths {missing}")
        label = labels_by_id[row["id"]]
        if label not in index:
            raise ValueError(f"sample {row['id']!r}: label {label!r} is not in {list(label_names)}")
        for a in ARMS:
            probs[a].append([float(dist[a][name]) for name in label_names])
        ys.append(index[label])
    return {a: torch.tensor(v, dtype=torch.float64) for a, v in probs.items()}, torch.tensor(
        ys, dtype=torch.long
    )


def reliability_inputs(rows: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
    """The rows' predicted path reliabilities as (N, 3) float64 in `PATHS` order (the `reliability` input of
    `fit_arbiter`), or None when no row has them (a run trained without reliability heads).

    Raises:
        ValueError: only some rows have them, or a row lacks a path.
    """
    have = [r.get("reliability") is not None for r in rows]
    if not any(have):
        return None
    if not all(have):
        raise ValueError(f"{have.count(False)} of {len(rows)} prediction rows lack 'reliability' (mixed runs?)")
    try:
        return torch.tensor([[float(r["reliability"][p]) for p in PATHS] for r in rows], dtype=torch.float64)
    except KeyError as exc:
        raise ValueError(f"a prediction row's 'reliability' lacks path {exc}; expected {list(PATHS)}") from None


def answer_inputs(answers: Mapping[str, Sequence[str]], label_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """{arm: answer labels} -> {arm: (N,) long class ids}, -1 for an answer outside `label_names` (e.g.
    "unknown": never right), the `answers` input of `fit_arbiter`."""
    index = {name: i for i, name in enumerate(label_names)}
    return {a: torch.tensor([index.get(x, -1) for x in v], dtype=torch.long) for a, v in answers.items()}


def check_held_out(
    data_path: str | Path, data_ids: Sequence[str], train_path: str | Path, train_ids: Sequence[str]
) -> None:
    """Refuse fitting data that is the run's training data, by path or by shared sample ids.

    Raises:
        ValueError: `data_path` is the training file (same path or same file), or ids overlap.
    """
    data_path, train_path = Path(data_path), Path(train_path)
    same = data_path.resolve() == train_path.resolve() or (
        data_path.exists() and train_path.exists() and os.path.samefile(data_path, train_path)
    )
    if same:
        raise ValueError(
            f"{data_path} is the run's training data (data.train): the arbiter must be fit on held-out "
            "predictions (the dev split, or a fold the run never trained on), never on in-sample ones"
        )
    overlap = sorted(set(data_ids) & set(train_ids))
    if overlap:
        raise ValueError(
            f"{data_path}: {len(overlap)} of {len(data_ids)} sample ids are in the run's training data "
            f"{train_path} (data.train), e.g. {overlap[:5]}; the arbiter must be fit on held-out predictions "
            "(the dev split, or a fold the run never trained on)"
        )
