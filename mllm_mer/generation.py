"""Batched generation of emotion explanations / labels, label parsing and per-path class probabilities.

`load_for_inference` rebuilds a trained model from its run directory (resolved `config.yaml`, peft
adapter, heads) or loads a base backbone for zero-shot use. `generate_rows` renders each sample's
prompt from `prompts/`, generates with left padding (greedy by default), parses the label and, when the
run has heads, adds the fused head's class probabilities. Every row records the prompt name and hash.
With `ar.enabled`, both `generate_rows` and `predict_rows` run each batch inside
`mllm_mer.attention.realloc.attention_reallocation` (attention reallocation, inference only).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mllm_mer.attention.realloc import attention_reallocation
from mllm_mer.backbone import Backbone, load_backbone
from mllm_mer.config import RunConfig, config_from_dict, config_to_dict
from mllm_mer.data.collate import MerCollator
from mllm_mer.data.dataset import load_media
from mllm_mer.data.schema import Sample
from mllm_mer.fusion.dcr.ada import Arbiter, add_arbiter_path, load_run_arbiter
from mllm_mer.fusion.dcr.collate import UnimodalPathCollator
from mllm_mer.labels import parse_label, parse_openset_answer
from mllm_mer.model import MerModel, build_mer_model
from mllm_mer.prompts import PromptTemplate, load_prompt
from mllm_mer.training import decode_cache_dir, decode_options


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings (recorded next to the predictions)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    label_mode: str = "strict"
    batch_size: int = 8


@dataclass
class InferenceModel:
    """A backbone plus (for trained runs) the MerModel with adapter and heads."""

    backbone: Backbone
    cfg: RunConfig
    mer: MerModel | None
    arbiter: Arbiter | None = None
    """DCR's fitted ADA arbiter (the run's `arbiter.json`, `scripts/fit_arbiter.py`), if any."""

    @property
    def generator(self) -> torch.nn.Module:
        """The module whose `generate` to call (the peft-wrapped thinker for trained runs)."""
        return self.mer.backbone if self.mer is not None else self.backbone.model


def load_run_config(run_dir: str | Path, overrides: dict | None = None) -> RunConfig:
    """The resolved config a run saved (`config.yaml`), with optional nested-dict overrides applied."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run directory (no config.yaml)")
    data = yaml.safe_load(path.read_text())
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return config_from_dict(data, str(path))


def load_for_inference(
    run_dir: str | Path | None = None, model_path: str | None = None, cfg: RunConfig | None = None
) -> InferenceModel:
    """Load a trained run (`run_dir`) or a base model (`model_path`, zero-shot) for generation."""
    if (run_dir is None) == (model_path is None):
        raise ValueError("give exactly one of run_dir (a trained run) or model_path (zero-shot base model)")
    if run_dir is not None:
        cfg = cfg or load_run_config(run_dir)
        backbone = load_backbone(cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation,
                                 cfg.model.quantization)  # a QLoRA run's adapter belongs to the 4-bit base
        mer = build_mer_model(backbone, cfg, run_dir=run_dir)
        mer.eval()
        arbiter = load_run_arbiter(run_dir, cfg.data.labels, cfg.dcr.enabled)
        return InferenceModel(backbone, cfg, mer, arbiter)
    cfg = cfg or config_from_dict({"model": {"path": model_path}, "data": {"train": "-"}})
    backbone = load_backbone(model_path, cfg.model.dtype, cfg.model.attn_implementation)
    return InferenceModel(backbone, cfg, None)


def build_inference_loader(
    model: InferenceModel,
    samples: Sequence[Sample],
    prompt: PromptTemplate,
    batch_size: int,
    *,
    use_video: bool = True,
    use_audio: bool = True,
) -> DataLoader:
    """Inference batches (generation prompt, left padding) of `samples`, in order.

    Args:
        model: supplies the processor, the data settings (`model.cfg.data`) and, for a trained DCR run,
            the unimodal sub-batches (`UnimodalPathCollator`).
        prompt: the task template.
        use_video / use_audio: False removes that modality from every prompt (`MerCollator`'s flags; the
            media are still decoded). With DCR the unimodal sub-batches keep their own fixed inputs.
    """
    cfg = model.cfg
    options = decode_options(cfg, model.backbone.processor)
    _, dataset, _ = load_media(samples, options, decode_cache_dir(cfg))
    collator = MerCollator(
        processor=model.backbone.processor, token_ids=model.backbone.token_ids, prompt=prompt,
        system_prompt=load_prompt("system", kind="free").text, labels=cfg.data.labels, train=False,
        use_video=use_video, use_audio=use_audio,
    )
    if cfg.dcr.enabled and model.mer is not None:  # DCR: batches also carry the unimodal sub-batches
        collator = UnimodalPathCollator(collator)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collator)


def reallocation_scope(model: InferenceModel, batch: dict) -> AbstractContextManager:
    """Attention reallocation for one batch when `ar.enabled`, else a no-op context.

    Args:
        model: the loaded model; `model.cfg.ar` holds the AR settings.
        batch: collator output with `token_modality` (B, T) long of the (left-padded) prompts.
    """
    if not model.cfg.ar.enabled:
        return nullcontext()
    return attention_reallocation(model.generator, batch["token_modality"], model.cfg.ar)


@torch.no_grad()
def generate_rows(
    model: InferenceModel, samples: Sequence[Sample], prompt_name: str, options: GenerationOptions,
    progress: bool = True,
) -> Iterator[dict]:
    """Yield one prediction row per sample, in order (see module docstring for the fields)."""
    prompt = load_prompt(prompt_name)
    labels = list(model.cfg.data.labels)
    loader = build_inference_loader(model, samples, prompt, options.batch_size)
    tok = model.backbone.processor.tokenizer
    gen_kwargs = {"max_new_tokens": options.max_new_tokens, "do_sample": options.do_sample,
                  "pad_token_id": model.backbone.token_ids.pad, "eos_token_id": model.backbone.token_ids.eos}
    if options.do_sample:
        gen_kwargs.update(temperature=options.temperature, top_p=options.top_p)
    for batch in tqdm(loader, disable=not progress, desc="generate"):
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)
                  and k not in ("labels", "class_id", "token_modality", "prompt_mask")}
        probs = None
        # MoSE layers read the prompt's token modalities (generated tokens count as text); no-op without MoSE
        routing = model.mer.routing(batch["token_modality"]) if model.mer is not None else nullcontext()
        with reallocation_scope(model, batch), routing:
            out = model.generator.generate(**inputs, use_audio_in_video=batch["use_audio_in_video"], **gen_kwargs)
            if model.mer is not None:
                logits = model.mer(batch, compute_lm_loss=False).cls_logits
                probs = {path: torch.softmax(lg, dim=-1) for path, lg in logits.items()}
        arms = None
        if probs is not None and model.arbiter is not None:  # DCR: the path the arbiter picks, as "arbiter"
            probs, arms = add_arbiter_path(model.arbiter, probs)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
        for i, (sid, text) in enumerate(zip(batch["sample_ids"], texts, strict=True)):
            row = {"id": sid, "prompt": prompt.name, "prompt_sha256": prompt.sha256, "text": text.strip(),
                   "label": parse_label(text, labels, mode=options.label_mode)}
            if prompt.name == "ov":
                row["labels_ov"] = parse_openset_answer(text)
            if probs is not None:
                row["probs"] = {p: dict(zip(labels, v[i].tolist(), strict=True)) for p, v in probs.items()}
            if arms is not None:
                row["arm"] = arms[i]
            yield row


@torch.no_grad()
def predict_rows(
    model: InferenceModel, samples: Sequence[Sample], batch_size: int = 16, prompt_name: str | None = None,
    progress: bool = False, *, use_video: bool = True, use_audio: bool = True,
) -> Iterator[dict]:
    """Classification-head predictions without generation: one row per sample, in order.

    `use_video=False` / `use_audio=False` remove that modality from every prompt (not zeroed: its tokens
    are absent, as for a unimodal path), e.g. for unimodal recognition in `scripts/bias_report.py`; the
    fused-path batch changes, DCR's unimodal sub-batches do not.

    Rows: `id`, `label` (argmax of the fused head), `probs` ({path: {label: p}}; with DCR also "text",
    "audio", "video" and, when the run has a fitted `arbiter.json`, "arbiter", with the chosen `arm`) and,
    when the run has DnR, `dnr_ablation` ({component: {"kl", "delta_p"}},
    `mllm_mer.fusion.dnr.component_ablation`). With
    `ar.enabled` the forward runs under attention reallocation (the last prompt position is the targeted
    query).
    """
    if model.mer is None:
        raise ValueError("predict_rows needs a trained run with heads (load_for_inference(run_dir=...))")
    labels = list(model.cfg.data.labels)
    prompt = load_prompt(prompt_name or model.cfg.data.prompt)
    loader = build_inference_loader(
        model, samples, prompt, batch_size, use_video=use_video, use_audio=use_audio
    )
    for batch in tqdm(loader, disable=not progress, desc="predict"):
        with reallocation_scope(model, batch):
            out = model.mer(batch, compute_lm_loss=False)
        logits = out.cls_logits
        explained = model.mer.explain(out)  # DnR component ablation per sample; None without DnR
        probs = {path: torch.softmax(lg, dim=-1) for path, lg in logits.items()}
        fused = probs["fused"].argmax(dim=-1).tolist()
        arms = None
        if model.arbiter is not None:  # DCR: the path the arbiter picks, as the "arbiter" path
            probs, arms = add_arbiter_path(model.arbiter, probs)
        for i, sid in enumerate(batch["sample_ids"]):
            row = {"id": sid, "label": labels[fused[i]],
                   "probs": {p: dict(zip(labels, v[i].tolist(), strict=True)) for p, v in probs.items()}}
            if explained is not None:
                row["dnr_ablation"] = explained[i]
            if arms is not None:
                row["arm"] = arms[i]
            yield row


def generation_record(model: InferenceModel, prompt_name: str, options: GenerationOptions) -> dict:
    """What produced a predictions file (written beside it)."""
    import mllm_mer

    prompt = load_prompt(prompt_name)
    return {"version": mllm_mer.__version__, "backbone": model.backbone.path, "prompt": prompt.name,
            "prompt_sha256": prompt.sha256, "generation": asdict(options), "labels": list(model.cfg.data.labels),
            "ar": config_to_dict(model.cfg.ar)}
