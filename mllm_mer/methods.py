"""The method plug-in contract: what every part that can be switched on (LoRA, MoSE, AR, DCR, DnR) offers.

A method is one object (e.g. `mllm_mer.adapters.mose.method.MOSE`) whose hooks the rest of the package calls
instead of naming methods: `mllm_mer.model.build_mer_model` holds the one list (`METHODS`), and the model's
forward, the trainable table, saving and loading a run, export, the collators, the frozen-encoder cache's
prompt variants and inference scoping all go through `active_methods(cfg)` and these hooks. Every hook has a
do-nothing default, so a method overrides only what it uses.

Order of the hooks in a model's life (`build_mer_model`):

    apply(backbone, cfg)        every active method, in list order: adapters wrap/inject into the thinker
    MerModel(...)               the fused head is created
    add_heads(mer, cfg)         every active method, in list order: its heads (names start with `fusion_`)
    load(mer, run_dir, cfg)     a finished run: its saved weights (heads.safetensors is loaded by the model)
    init_fresh(mer, cfg)        otherwise: start-of-training initialisation (e.g. DnR's `init_from`)

and in one forward (`MerModel.forward`): `backbone_scope` (entered around every backbone call, e.g. MoSE
routing), then `contribute(mer, state)` in list order (add path logits, fused-logit terms, losses). At
inference `inference_scope` is entered around generation and prediction (e.g. AR). A new method is one
module with a `Method` subclass and one line in `METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:
    from mllm_mer.config import RunConfig


@dataclass
class ForwardState:
    """What one `MerModel.forward` has computed so far; `Method.contribute` reads it and adds to it.

    Attributes:
        batch: the collated batch (see `mllm_mer.data.collate`).
        hidden_states: per layer (B, T, D) hidden states of the fused backbone call (index 0 = input embeddings,
            -1 = after the final norm).
        pooled: (B, S, D) modality-pooled prompt states fed to the fused head.
        logits: (B, C) float32 fused logits; methods may add to it (replace the tensor, never modify in place).
        path_logits: extra prediction paths, e.g. {"text", "audio", "video"} -> (B, C) (DCR).
        aux_losses: unweighted extra losses by name; their weights are the methods' `loss_weights`.
        gate_stats: detached statistics to log (MoSE gates).
        parts: per-method outputs by method name (e.g. "dcr" -> PathsOutput, "dnr" -> DnROutput).
        scope: what each method's `backbone_scope` yielded for the fused call, by method name.
    """

    batch: dict
    hidden_states: tuple[torch.Tensor, ...]
    pooled: torch.Tensor
    logits: torch.Tensor
    path_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    gate_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, Any] = field(default_factory=dict)
    scope: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class of a method; subclasses set the class attributes and override the hooks they use.

    Attributes:
        name: short name ("lora", "mose", "ar", "dcr", "dnr"): method tables, trainable parts, export.
        section: the `RunConfig` attribute holding its settings (None = no settings).
        param_marker: substring that marks its trainable parameters in `MerModel.named_parameters()`
            (e.g. ".lora_"); such parameters form the trainable part `name`. None = it adds no backbone
            parameters of its own (its heads, named `fusion_*`, belong to the part "heads").
        weights_file: the safetensors file (relative to the run directory) that `save` writes and `load`
            reads by default; None = nothing saved besides the heads.
        merges_into_base: its weights can be merged into the base model's weights on export (plain LoRA).
        inference_only: it acts only when generating / predicting (no weights, no loss): its settings are not
            part of a run's identity, so a resumed run may change them (`mllm_mer.training.identity`).
    """

    name: str = ""
    section: str | None = None
    param_marker: str | None = None
    weights_file: str | None = None
    merges_into_base: bool = False
    inference_only: bool = False

    # ------------------------------------------------------------------------------ settings
    def settings(self, cfg: RunConfig) -> Any:
        """Its config section (`cfg.<section>`), or None."""
        return getattr(cfg, self.section) if self.section else None

    def enabled(self, cfg: RunConfig) -> bool:
        """Whether `cfg` switches it on (default: its section's `enabled` flag)."""
        return bool(getattr(self.settings(cfg), "enabled", False))

    def loss_weights(self, cfg: RunConfig) -> dict[str, float]:
        """{aux loss name: weight in the total loss} (default: its section's `loss_weights`)."""
        return dict(getattr(self.settings(cfg), "loss_weights", {}))

    def frozen_prefixes(self, cfg: RunConfig) -> tuple[str, ...]:
        """Parameter-name prefixes (on MerModel) that stay frozen although their part trains."""
        return ()

    # ------------------------------------------------------------------------------ building
    def apply(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        """Adapt the thinker (inject or wrap adapters); returns the model to use from now on."""
        return model

    def add_heads(self, mer: nn.Module, cfg: RunConfig) -> None:
        """Add its head modules to the MerModel (attribute names starting with `fusion_`)."""

    def init_fresh(self, mer: nn.Module, cfg: RunConfig) -> None:
        """Start-of-training initialisation of a fresh model (skipped when a finished run is loaded)."""

    def checkpoint_context(self, model: nn.Module) -> Callable | None:
        """A `context_fn` for non-reentrant gradient checkpointing of the thinker's layers, or None."""
        return None

    # ------------------------------------------------------------------------------ forward
    def backbone_scope(self, mer: nn.Module, token_modality: torch.Tensor, collect: bool) -> AbstractContextManager:
        """Context around every call of the backbone (fused, unimodal paths, generation); its value is kept in
        `ForwardState.scope[name]` for the fused call.

        Args:
            mer: the MerModel.
            token_modality: (B, T) long modality codes of the call's tokens.
            collect: the caller wants statistics back (training forward).
        """
        return nullcontext()

    def contribute(self, mer: nn.Module, state: ForwardState) -> None:
        """Add its logits, paths, losses and statistics to `state` after the fused backbone call."""

    def inference_scope(
        self, model: nn.Module, batch: dict, cfg: RunConfig, mer: nn.Module | None = None
    ) -> AbstractContextManager:
        """Context around generation / prediction of one batch (e.g. AR on the thinker `model`); `mer` is the
        trained MerModel when there is one (e.g. for a first pass that decides per sample), else None."""
        return nullcontext()

    def explain(self, mer: nn.Module, parts: dict[str, Any]) -> dict[str, list] | None:
        """Per-sample explanations to add to prediction rows: {row key: one value per sample}, or None."""
        return None

    # ------------------------------------------------------------------------------ after training
    def after_training(self, model: nn.Module, mer: nn.Module, batches: Iterable[dict], accelerator: Any,
                       cfg: RunConfig) -> dict | None:
        """Fit what is fitted in closed form once the gradient steps are done (e.g. DCR's reliability heads),
        on the training batches; every rank calls it, before the final checkpoint and weights are written.

        Args:
            model: the prepared (possibly wrapped) model to call on a batch; mer: the MerModel it wraps.
            batches: the training loader; accelerator: the run's `Accelerator`.
        Returns:
            A JSON-able summary for `final_metrics.json` (under "after_training"), or None (nothing done).
        """
        return None

    # ------------------------------------------------------------------------------ data
    def wrap_collator(self, collator: Any, cfg: RunConfig) -> Any:
        """The collator a run with this method uses (e.g. adding unimodal sub-batches)."""
        return collator

    def input_variants(self, cfg: RunConfig) -> set[tuple[bool, bool]]:
        """(use_video, use_audio) prompt variants its batches carry besides the fused one (cache layouts)."""
        return set()

    # ------------------------------------------------------------------------------ saving
    def files(self, cfg: RunConfig) -> tuple[str, ...]:
        """Paths (relative to the run directory) of what `save` writes."""
        return (self.weights_file,) if self.weights_file else ()

    def state_dict(self, mer: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Its saved tensors, picked from the full (gathered) MerModel `state` (default: `param_marker` names,
        relative to the thinker)."""
        if self.param_marker is None:
            return {}
        return {k[len("backbone."):]: v.detach().cpu().contiguous() for k, v in state.items() if self.param_marker in k}

    def save(self, mer: nn.Module, state: dict[str, torch.Tensor], out_dir: Path, cfg: RunConfig) -> None:
        """Write its files into the run directory (default: `state_dict` into `weights_file`)."""
        tensors = self.state_dict(mer, state)
        if self.weights_file and tensors:
            save_file(tensors, str(out_dir / self.weights_file))

    def load(self, mer: nn.Module, run_dir: Path, cfg: RunConfig) -> None:
        """Load its saved weights from a finished run (default: `weights_file` into the thinker, strictly)."""
        if not self.weights_file:
            return
        path = run_dir / self.weights_file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the run was not trained with {self.name} on")
        tensors = load_file(str(path))
        own = {k[len("backbone."):] for k in mer.state_dict() if self.param_marker and self.param_marker in k}
        if set(tensors) != own:
            raise ValueError(f"{path} does not match the configured {self.name}: missing {sorted(own - set(tensors))[:5]}, "
                             f"unexpected {sorted(set(tensors) - own)[:5]}")
        mer.backbone.load_state_dict(tensors, strict=False)

    def merge(self, model: nn.Module) -> nn.Module:
        """The thinker with its weights merged into the base weights (only when `merges_into_base`)."""
        raise NotImplementedError(f"{self.name} cannot be merged into the base weights")

    def export_note(self, cfg: RunConfig) -> str | None:
        """What an export of a run with this method still needs mllm_mer for (None = nothing)."""
        return None
