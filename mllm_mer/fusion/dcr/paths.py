"""The DCR unimodal paths inside MerModel: their LoRA adapters, heads, forward and losses.

Each unimodal path (text, audio, video) runs its sub-batch (`mllm_mer.fusion.dcr.collate`) through the same
frozen backbone with its own peft LoRA adapter `dcr_<path>` (peft multi-adapter: `add_adapter`, and a scoped
switch of the active adapter that leaves every `requires_grad` flag as `mllm_mer.trainable` set it; the fused
path keeps "default") and its own head `fusion_<path>` on MerModel. With MoSE (no peft model) or without
LoRA the paths share the backbone's adapter (MoSE's experts are already routed per modality) and differ in
their inputs and heads; that is logged once.

Head (`UnimodalHead`, ours): per token t, z_t = W_tok LN(h_t) + W_ctx LN(h_last) + b, where h_last is the last
prompt position (it has attended to the whole prompt). The path's logits are the mean of z_t over the
path's modality tokens, so the per-token logits that AFD turns into per-step evidence are exactly the ones
whose average the path is trained on. A sample without tokens of the modality falls back to the
context term.

Losses (unweighted in `MerOutput.aux_losses`, weighted by `dcr.path_loss_weight` / `dcr.afd_weight`):
`dcr_<path>`: cross-entropy of the path on labelled samples that have its modality; `dcr_afd`:
`mllm_mer.fusion.dcr.afd.afd_loss` from the detached audio/video teachers to the text student.
Student feed (ours): fused logits += g * log_softmax(text logits).detach(), g a learned scalar from 0
(`fusion_dcr_feed`), so the fused head decides how far to trust the calibrated student.

Reliability (ours, `dcr.reliability`): each path also has a `ReliabilityHead` (`fusion_<path>_reliability`)
that predicts, from the path's detached hidden states, how much probability the path's head gives the true
class, p_path(y) (the "true class probability" target of ConfidNet, Corbière et al., NeurIPS 2019, used per
modality by Multimodal Dynamics, Han et al., CVPR 2022). It is a ridge regression fitted in closed form after
the gradient steps, on the training split (`mllm_mer.fusion.dcr.reliability.fit_reliability`), not a loss:
trained by gradient steps alongside the paths it stayed at the mean target on the conflict testbed (the few
clips with a low p_path(y) are a small share of the batches). The target needs the label only (never which
modality carries the genuine cue): on training clips where a modality's display does not show the label, the
path's own p_path(y) is low, so the fit learns what such displays look like. The ADA arbiter reads the
reliabilities with `dcr.arbiter.state="reliable"`.
With `dcr.schedule=staged`, AFD and the feed are multiplied by 0 (kept in the graph for DDP) while
`batch["train_step"]` (set by the training loop) is below `dcr.stage1_steps`.
When predicting, DCR's inference scope (`reusing_path_runs`) lets each sub-batch run once per batch: per-sample
AR's first pass over the audio and video paths is then also the heads' forward's.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import peft
import torch
import torch.nn.functional as F
from torch import nn

from mllm_mer.attention.realloc import reallocation_paused
from mllm_mer.data.collate import MODEL_INPUT_KEYS
from mllm_mer.data.schema import Modality
from mllm_mer.encoders import backbone_inputs
from mllm_mer.fusion.dcr.afd import afd_loss, aggregate_evidence
from mllm_mer.fusion.dcr.config import PATHS, DCRConfig

log = logging.getLogger(__name__)

PATH_MODALITY: dict[str, Modality] = {"text": Modality.TEXT, "audio": Modality.AUDIO, "video": Modality.VIDEO}
TEACHERS: tuple[str, ...] = ("audio", "video")
STUDENT = "text"
ADAPTER_PREFIX = "dcr_"
"""peft adapter name of a path: "dcr_text", "dcr_audio", "dcr_video" (saved in adapter/<name>/)."""


def adapter_name(path: str) -> str:
    return ADAPTER_PREFIX + path


class UnimodalHead(nn.Module):
    """Token-level classifier of one unimodal path (module docstring).

    Args:
        hidden_size: D of the backbone.
        num_classes: C.
    """

    def __init__(self, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(hidden_size)
        self.token_proj = nn.Linear(hidden_size, num_classes, bias=False)
        self.context_norm = nn.LayerNorm(hidden_size)
        self.context_proj = nn.Linear(hidden_size, num_classes)

    def forward(
        self, hidden: torch.Tensor, token_mask: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Path logits and per-token logits.

        Args:
            hidden: (B, T, D) last hidden states of the path's sub-batch.
            token_mask: (B, T) bool, True on the path's modality tokens (inside the prompt).
            prompt_mask: (B, T) bool, True on prompt tokens (the last True is the context position).
        Returns:
            logits: (B, C) float32, the mean of the token logits over `token_mask`.
            token_logits: (B, T, C) float32 (meaningful where `token_mask`).
        """
        B, T, _ = hidden.shape
        x = hidden.float()
        positions = torch.arange(T, device=x.device).expand(B, T)
        last = torch.where(prompt_mask, positions, torch.full_like(positions, -1)).amax(dim=1).clamp_min(0)
        context = self.context_proj(self.context_norm(x[torch.arange(B, device=x.device), last]))  # (B, C)
        token_logits = self.token_proj(self.token_norm(x)) + context[:, None, :]  # (B, T, C)
        w = token_mask.float()
        mean = torch.einsum("bt,btc->bc", w, token_logits) / w.sum(1, keepdim=True).clamp_min(1.0)
        logits = torch.where(token_mask.any(1, keepdim=True), mean, context)
        return logits, token_logits


class StudentFeed(nn.Module):
    """g * log_softmax(student logits), g a learned scalar starting at 0 (the fused head starts unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1))  # (1,), not 0-d: ZeRO-3 cannot partition 0-d tensors

    def forward(self, student_logits: torch.Tensor) -> torch.Tensor:
        """(B, C) student logits (detached here) -> (B, C) float32 addition to the fused logits."""
        return self.gate * torch.log_softmax(student_logits.detach().float(), dim=-1)


class ReliabilityHead(nn.Module):
    """Predicted reliability of one unimodal path (module docstring): r = clamp(((f - mean) / scale) . w + b, 0, 1)
    on f = [mean of h over the path's modality tokens; h at the last prompt position] of the detached last
    hidden states. Buffers only (saved with the heads, never trained by gradient): `fit_reliability` sets
    them; until then w = 0, b = 0.5 (r = 0.5) and `fitted` = 0.

    Args:
        hidden_size: D of the backbone.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        size = 2 * hidden_size
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("scale", torch.ones(size))
        self.register_buffer("weight", torch.zeros(size))
        self.register_buffer("bias", torch.tensor(0.5))
        self.register_buffer("fitted", torch.tensor(0.0))

    @property
    def is_fitted(self) -> bool:
        """Whether `load_fit` has set the regression (a saved run keeps the flag in its heads)."""
        return bool(self.fitted.item() > 0)

    @staticmethod
    def features(hidden: torch.Tensor, token_mask: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """The regression's input per sample.

        Args:
            hidden: (B, T, D) last hidden states of the path's sub-batch (detached here).
            token_mask: (B, T) bool, the path's modality tokens; a sample without any uses zeros for the mean.
            prompt_mask: (B, T) bool, prompt tokens (the last True is the context position).
        Returns:
            (B, 2 D) float32: [mean over the modality tokens; hidden state at the context position].
        """
        B, T, _ = hidden.shape
        x = hidden.detach().float()
        positions = torch.arange(T, device=x.device).expand(B, T)
        last = torch.where(prompt_mask, positions, torch.full_like(positions, -1)).amax(dim=1).clamp_min(0)
        w = token_mask.float()
        mean = torch.einsum("bt,btd->bd", w, x) / w.sum(1, keepdim=True).clamp_min(1.0)
        return torch.cat([mean, x[torch.arange(B, device=x.device), last]], dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Reliability in [0, 1] per sample from (B, 2 D) `features`; returns (B,) float32."""
        z = ((features.float() - self.mean) / self.scale) @ self.weight + self.bias
        return z.clamp(0.0, 1.0)

    @torch.no_grad()
    def load_fit(self, mean: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: float) -> None:
        """Set the fitted regression (each (2 D,) tensor; `scale` > 0) and mark the head fitted."""
        for name, value in (("mean", mean), ("scale", scale), ("weight", weight)):
            getattr(self, name).copy_(value.to(self.mean))
        self.bias.fill_(float(bias))
        self.fitted.fill_(1.0)


def reliability_name(path: str) -> str:
    """MerModel attribute of a path's reliability head: "fusion_<path>_reliability"."""
    return f"fusion_{path}_reliability"


# ------------------------------------------------------------------------------------------- adapters
def _switch_adapter(model: peft.PeftModel, name: str) -> None:
    """peft's `set_adapter`, with every `requires_grad` flag restored afterwards (peft toggles them)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(name)
    for p, flag in flags:
        p.requires_grad_(flag)


@contextmanager
def active_adapter(model: nn.Module, name: str | None) -> Iterator[None]:
    """Make peft adapter `name` the active one inside the block (no-op for None or a non-peft model)."""
    if name is None or not isinstance(model, peft.PeftModel) or model.active_adapter == name:
        yield
        return
    previous = model.active_adapter
    _switch_adapter(model, name)
    try:
        yield
    finally:
        _switch_adapter(model, previous)


def checkpoint_context_fn(
    model: nn.Module,
) -> Callable[[], tuple[AbstractContextManager, AbstractContextManager]]:
    """A `context_fn` for torch's non-reentrant checkpoint: recompute under the adapter active at forward."""

    def context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
        name = model.active_adapter if isinstance(model, peft.PeftModel) else None
        return nullcontext(), active_adapter(model, name)

    return context_fn


def attach_path_adapters(model: nn.Module) -> list[str]:
    """Add one fresh LoRA adapter per unimodal path (`dcr_<path>`), copying the "default" adapter's settings.

    B starts at zero, so every path starts as the frozen backbone. The active adapter stays "default".

    Args:
        model: the peft-wrapped thinker (anything else: nothing is added, a warning is logged).
    Returns:
        The adapter names added.
    """
    if not isinstance(model, peft.PeftModel):
        log.warning(
            "dcr: the backbone has no peft LoRA adapter (adapter=mose or adapter=none); the unimodal paths "
            "share the backbone's adapter and differ only in their inputs and heads"
        )
        return []
    names = [adapter_name(path) for path in PATHS]
    for name in names:
        model.add_adapter(name, copy.deepcopy(model.peft_config["default"]))
    return names


# -------------------------------------------------------------------------------------------- forward
@dataclass
class PathsOutput:
    """What the unimodal paths add to one MerModel forward.

    Attributes:
        logits: {"text", "audio", "video"} -> (B, C) float32.
        present: path -> (B,) bool, the sample has tokens of the path's modality.
        losses: unweighted {"dcr_text", "dcr_audio", "dcr_video", "dcr_afd"} (empty without labels).
        feed: (B, C) float32 addition to the fused logits (zeros when `dcr.feed_student` is off).
        reliability: path -> (B,) float32 predicted reliability in [0, 1] (`ReliabilityHead`); empty without
            fitted reliability heads.
        reliability_features: path -> (B, 2 D) float32 inputs of the reliability heads (`fit_reliability`
            reads them); empty without reliability heads.
    """

    logits: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    feed: torch.Tensor | None = None
    reliability: dict[str, torch.Tensor] = field(default_factory=dict)
    reliability_features: dict[str, torch.Tensor] = field(default_factory=dict)

    def reliability_matrix(self) -> torch.Tensor | None:
        """(B, len(PATHS)) float32 reliabilities in `PATHS` order, or None unless every path's head is fitted."""
        if any(p not in self.reliability for p in PATHS):
            return None
        return torch.stack([self.reliability[p] for p in PATHS], dim=1)


def stage_two(cfg: DCRConfig, train_step: int | None) -> bool:
    """Whether AFD and the student feed are on at optimizer step `train_step` (None: evaluation/inference)."""
    return cfg.schedule == "joint" or train_step is None or train_step >= cfg.stage1_steps


@dataclass(frozen=True)
class _PathRun:
    """One path's pass over its sub-batch: logits (B, C), token logits (B, T, C), modality-token mask (B, T),
    reliability features (B, 2 D) and prediction (B,) (None without a reliability head / an unfitted one)."""

    logits: torch.Tensor
    token_logits: torch.Tensor
    mask: torch.Tensor
    features: torch.Tensor | None
    reliability: torch.Tensor | None


_MEMOS: dict[int, dict[int, tuple[dict, _PathRun]]] = {}
"""Per MerModel (by id) inside `reusing_path_runs`: {id(sub-batch): (that sub-batch, its `_PathRun`)}."""


@contextmanager
def reusing_path_runs(mer: nn.Module) -> Iterator[None]:
    """Inside the block, `run_unimodal_paths` with autograd off runs each sub-batch through the backbone once:
    a later call on the same sub-batch object reuses the first call's outputs (e.g. `MerModel.forward` after
    per-sample AR's first pass over the audio and video paths of the same batch: the paths run with AR
    paused, so both calls would compute the same tensors). Calls with autograd on (training) always run.
    Nested blocks share the outermost one's memo; it is dropped on exit, also through an exception.

    Args:
        mer: the MerModel whose paths run inside the block.
    """
    key = id(mer)
    if key in _MEMOS:
        yield
        return
    _MEMOS[key] = {}
    try:
        yield
    finally:
        del _MEMOS[key]


def _run_path(mer: nn.Module, sub: dict, path: str) -> _PathRun:
    """One unimodal path on its sub-batch: the backbone with the path's adapter (AR paused), its head and, when
    the run has one, its reliability head."""
    inputs = backbone_inputs(mer.backbone, sub, MODEL_INPUT_KEYS)  # cache / ZeRO-3: inputs_embeds
    with (active_adapter(mer.backbone, adapter_name(path)), mer.backbone_scope(sub["token_modality"]),
          reallocation_paused(mer.backbone)):  # AR (inference) acts on the fused prompt only
        out = mer.backbone(
            **inputs,
            use_audio_in_video=bool(sub.get("use_audio_in_video", False)),
            output_hidden_states=True,
            use_cache=False,
        )
    token_mask = (sub["token_modality"] == int(PATH_MODALITY[path])) & sub["prompt_mask"]
    head: UnimodalHead = getattr(mer, f"fusion_{path}")
    logits, token_logits = head(out.hidden_states[-1], token_mask, sub["prompt_mask"])
    features = reliability = None
    reliability_head: ReliabilityHead | None = getattr(mer, reliability_name(path), None)
    if reliability_head is not None:
        features = reliability_head.features(out.hidden_states[-1], token_mask, sub["prompt_mask"])
        if reliability_head.is_fitted:
            reliability = reliability_head(features)
    return _PathRun(logits, token_logits, token_mask, features, reliability)


def run_unimodal_paths(mer: nn.Module, batch: dict, only: Sequence[str] | None = None) -> PathsOutput:
    """Run every unimodal path of `batch["paths"]` and compute the DCR losses.

    Args:
        mer: the MerModel (uses `backbone`, `backbone_scope`, `fusion_<path>`, `fusion_dcr_feed`, `cfg.dcr`).
        batch: a collated batch with `paths` (see `mllm_mer.fusion.dcr.collate`), optional `class_id` (B,)
            and `train_step` (int, set by the training loop).
        only: run just these paths (inference, e.g. per-sample AR needs audio and video): the output holds
            them alone, with no losses and, without the text path, no student feed. None = every path.
    Returns:
        The `PathsOutput`.
    Raises:
        ValueError: the batch has no `paths` (the loader was not built with the DCR collator), or `only`
            names an unknown path.
    """
    cfg: DCRConfig = mer.cfg.dcr
    if "paths" not in batch:
        raise ValueError(
            "dcr.enabled=true but the batch has no 'paths': build the loader's collator with "
            "mllm_mer.fusion.dcr.collate.UnimodalPathCollator (mllm_mer.data.loading.build_collator does)"
        )
    run = PATHS if only is None else tuple(only)
    if not set(run) <= set(PATHS) or not run:
        raise ValueError(f"only={list(run)}: choose among the paths {list(PATHS)}")
    logits: dict[str, torch.Tensor] = {}
    token_logits: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    reliability: dict[str, torch.Tensor] = {}
    features: dict[str, torch.Tensor] = {}
    memo = _MEMOS.get(id(mer)) if not torch.is_grad_enabled() else None
    for path in run:
        sub = batch["paths"][path]
        if list(sub["sample_ids"]) != list(batch["sample_ids"]):
            raise ValueError(f"the '{path}' sub-batch holds other samples than the fused batch")
        done = memo.get(id(sub)) if memo is not None else None
        if done is not None and done[0] is sub:
            path_run = done[1]
        else:
            path_run = _run_path(mer, sub, path)
            if memo is not None:  # the sub-batch is kept with its run, so its id cannot be reused meanwhile
                memo[id(sub)] = (sub, path_run)
        logits[path], token_logits[path], masks[path] = path_run.logits, path_run.token_logits, path_run.mask
        if path_run.features is not None:
            features[path] = path_run.features
        if path_run.reliability is not None:
            reliability[path] = path_run.reliability
    present = {p: m.any(1) for p, m in masks.items()}
    scale = 1.0 if stage_two(cfg, batch.get("train_step")) else 0.0
    feed = None
    if cfg.feed_student and STUDENT in logits:
        feed = scale * mer.fusion_dcr_feed(logits[STUDENT])
    result = PathsOutput(logits=logits, present=present, feed=feed, reliability=reliability,
                         reliability_features=features)
    class_id = batch.get("class_id")
    if only is not None or class_id is None or not (class_id >= 0).any():
        return result
    for path in PATHS:
        keep = present[path] & (class_id >= 0)
        # a path without usable samples still joins the graph (x 0), so DDP sees every parameter used
        result.losses[f"dcr_{path}"] = (
            F.cross_entropy(logits[path][keep], class_id[keep]) if keep.any() else 0.0 * logits[path].sum()
        )
    teachers = [aggregate_evidence(token_logits[t].detach(), masks[t]) for t in TEACHERS]
    result.losses["dcr_afd"] = scale * afd_loss(
        logits[STUDENT], teachers, cfg.afd_temperature, cfg.afd_agreement_power,
        agreement_floor=cfg.afd_agreement_floor, conflict_target=cfg.afd_conflict_target,
    )
    return result


def path_reliability(out: Any) -> torch.Tensor | None:
    """(B, 3) predicted reliabilities of the unimodal paths of a `MerOutput` (`PATHS` order), or None (no DCR,
    or no fitted reliability heads)."""
    paths = out.parts.get("dcr")
    return paths.reliability_matrix() if isinstance(paths, PathsOutput) else None
