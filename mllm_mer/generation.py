"""Batched generation of emotion explanations / labels, label parsing and per-path class probabilities.

`load_for_inference` rebuilds a trained model from its run directory (resolved `config.yaml`, the methods'
weights, heads) or loads a base backbone for zero-shot use. `generate_rows` renders each sample's prompt from
`prompts/`, generates with left padding (greedy by default; settings in `cfg.generate`), parses the label and,
when the run has heads, adds the fused head's class probabilities. Every row records the prompt name and hash.

The primary prediction of every row (`label`) is the model's *answer*, as CA-MER scores it: greedy
generation parsed by `mllm_mer.labels.parse_label` (`label_source: "generated"`; a one-word prompt such as
`label` generates only as many tokens as the longest label word needs). The fused head's argmax
(`head_label`) and DCR's arbiter choice (`arbiter_label`) are extra columns, never swapped in. With a fitted
DCR arbiter and `dcr.arbiter.answer="arm"` (default), the answer follows ADA's decision instead: a clip the
arbiter routes to a unimodal arm is answered again from that modality alone (`ARM_INPUTS`; the other
modalities' tokens are absent), `answer_arm` says which, and the both-modality answer stays in
`fused_text` / `fused_label`.
Both `generate_rows` and `predict_rows` run each batch inside the active methods' inference scopes
(`MerModel.inference_scope`: e.g. AR's attention reallocation with `ar.enabled`, MoSE's routing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import mllm_mer
from mllm_mer.backbone import Backbone, load_backbone
from mllm_mer.config import GenerateConfig, RunConfig, config_from_dict, config_to_dict, load_run_config
from mllm_mer.data.collate import ANSWER_END, model_inputs
from mllm_mer.data.loading import build_inference_loader
from mllm_mer.data.schema import Sample
from mllm_mer.fusion.dcr.ada import ARBITER_FILE, Arbiter, add_arbiter_path, load_run_arbiter
from mllm_mer.fusion.dcr.paths import path_reliability
from mllm_mer.labels import parse_label, parse_openset_answer
from mllm_mer.model import MerModel, active_methods, build_mer_model
from mllm_mer.prompts import PromptTemplate, load_prompt
from mllm_mer.run_files import check_run_files

ARM_INPUTS: dict[str, tuple[bool, bool]] = {"fused": (True, True), "text": (False, False),
                                            "audio": (False, True), "video": (True, False)}
"""(use_video, use_audio) of the prompt that answers a clip routed to each arbiter arm (text: subtitle only)."""


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


def load_for_inference(
    run_dir: str | Path | None = None, model_path: str | None = None, cfg: RunConfig | None = None
) -> InferenceModel:
    """Load a trained run (`run_dir`) or a base model (`model_path`, zero-shot) for generation.

    Raises:
        RunFileError: a file of the run is missing or damaged (checked before the backbone loads).
    """
    if (run_dir is None) == (model_path is None):
        raise ValueError("give exactly one of run_dir (a trained run) or model_path (zero-shot base model)")
    if run_dir is not None:
        cfg = cfg or load_run_config(run_dir)
        check_run_files(run_dir, cfg, also=(ARBITER_FILE,))  # complete files, before anything loads
        backbone = load_backbone(cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation,
                                 cfg.model.quantization)  # a QLoRA run's adapter belongs to the 4-bit base
        mer = build_mer_model(backbone, cfg, run_dir=run_dir)
        mer.eval()
        arbiter = load_run_arbiter(run_dir, cfg.data.labels, cfg.dcr.enabled)
        return InferenceModel(backbone, cfg, mer, arbiter)
    cfg = cfg or config_from_dict({"model": {"path": model_path}})
    backbone = load_backbone(model_path, cfg.model.dtype, cfg.model.attn_implementation)
    return InferenceModel(backbone, cfg, None)


def inference_loader(
    model: InferenceModel, samples: Sequence[Sample], prompt: PromptTemplate, batch_size: int, *,
    use_video: bool = True, use_audio: bool = True, method_parts: bool = True,
) -> DataLoader:
    """`mllm_mer.data.loading.build_inference_loader` for a loaded model (the methods' collators only for a
    trained run; a bare backbone gets plain batches). `method_parts=False` leaves out the methods' extra
    sub-batches (DCR's paths) for batches that only generate and need none of them."""
    return build_inference_loader(model.cfg, model.backbone, samples, prompt, batch_size, use_video=use_video,
                                  use_audio=use_audio, methods=model.mer is not None and method_parts)


@contextmanager
def inference_scope(model: InferenceModel, batch: dict) -> Iterator[None]:
    """Scopes for generating / predicting one batch: every method `model.cfg` switches on
    (`Method.inference_scope` on `model.generator`, e.g. AR with `ar.enabled`, which may be switched on at
    inference only) and, for a trained run, `MerModel.backbone_scope` (e.g. MoSE binds the prompt's modalities;
    generated tokens count as text)."""
    with ExitStack() as stack:
        for m in active_methods(model.cfg):
            stack.enter_context(m.inference_scope(model.generator, batch, model.cfg, mer=model.mer))
        if model.mer is not None:
            stack.enter_context(model.mer.backbone_scope(batch["token_modality"]))
        yield


def answers_with_label_first(prompt: PromptTemplate) -> bool:
    """Whether the prompt's answer starts with the label (e.g. `label`): the answer is a few tokens long."""
    return prompt.answer.strip().startswith("{label}")


def label_answer_tokens(tokenizer, labels: Sequence[str]) -> int:
    """Tokens of the longest label word plus the turn's end: enough new tokens for a one-word answer."""
    return max(len(tokenizer(label + ANSWER_END, add_special_tokens=False)["input_ids"]) for label in labels)


def _gen_kwargs(model: InferenceModel, options: GenerateConfig) -> dict:
    kwargs = {"max_new_tokens": options.max_new_tokens, "do_sample": options.do_sample,
              "pad_token_id": model.backbone.token_ids.pad, "eos_token_id": model.backbone.token_ids.eos}
    if options.do_sample:
        kwargs.update(temperature=options.temperature, top_p=options.top_p)
    return kwargs


def _generate(model: InferenceModel, batch: dict, gen_kwargs: dict) -> list[str]:
    """Decode one prompt-only batch (call inside `inference_scope`); the new text of each row, stripped."""
    out = model.generator.generate(**model_inputs(batch), use_audio_in_video=batch["use_audio_in_video"],
                                   **gen_kwargs)
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    texts = model.backbone.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [t.strip() for t in texts]


def _head_columns(labels: list[str], probs: dict[str, torch.Tensor], arms: list[str] | None, i: int) -> dict:
    """A row's head columns: `head_label` (fused argmax), `probs` per path, `arbiter_label` / `arm` (DCR)."""
    row = {"head_label": labels[int(probs["fused"][i].argmax())],
           "probs": {p: dict(zip(labels, v[i].tolist(), strict=True)) for p, v in probs.items()}}
    if arms is not None:
        row["arbiter_label"] = labels[int(probs["arbiter"][i].argmax())]
        row["arm"] = arms[i]
    return row


@torch.no_grad()
def generate_rows(
    model: InferenceModel, samples: Sequence[Sample], options: GenerateConfig | None = None, progress: bool = True,
    *, use_video: bool = True, use_audio: bool = True,
) -> Iterator[dict]:
    """Yield one prediction row per sample, in order.

    Args:
        model: the loaded model.
        samples: the samples to answer.
        options: decoding settings (default: the run's `cfg.generate`).
        progress: show a progress bar.
        use_video / use_audio: False removes that modality from every prompt (its tokens are absent), e.g. for
            the unimodal answers of `scripts/bias_report.py`.
    Yields:
        {"id", "prompt", "prompt_sha256", "text", "label" (parsed from `text`), "label_source" ("generated"),
        "labels_ov" (prompt "ov"), and for runs with heads "head_label" (fused head's argmax) and "probs"
        ({path: {label: p}}); with a fitted DCR arbiter also "arbiter_label" and "arm", and with
        `dcr.arbiter.answer="arm"` the answer of the arm's modalities plus "answer_arm", "fused_text",
        "fused_label" (`reanswer_by_arm`)}.
    """
    options = options or model.cfg.generate
    rows = _generate_rows(model, samples, options, progress, use_video=use_video, use_audio=use_audio)
    if not answers_by_arm(model, use_video, use_audio):
        yield from rows
        return
    rows = list(rows)
    prompt = load_prompt(options.prompt)
    yield from reanswer_by_arm(model, samples, rows, prompt, options.batch_size, _gen_kwargs(model, options),
                               options.label_mode)


def _generate_rows(
    model: InferenceModel, samples: Sequence[Sample], options: GenerateConfig, progress: bool,
    *, use_video: bool, use_audio: bool,
) -> Iterator[dict]:
    """`generate_rows` without the arbiter's re-answering (every row answered from the given modalities)."""
    prompt = load_prompt(options.prompt)
    labels = list(model.cfg.data.labels)
    loader = inference_loader(model, samples, prompt, options.batch_size, use_video=use_video, use_audio=use_audio)
    gen_kwargs = _gen_kwargs(model, options)
    for batch in tqdm(loader, disable=not progress, desc="generate"):
        probs, out = None, None
        with inference_scope(model, batch):  # e.g. AR; MoSE routing (generated tokens count as text)
            texts = _generate(model, batch, gen_kwargs)
            if model.mer is not None:
                out = model.mer(batch, compute_lm_loss=False)
                probs = {path: torch.softmax(lg, dim=-1) for path, lg in out.cls_logits.items()}
        arms = None
        if out is not None and model.arbiter is not None:  # DCR: the path the arbiter picks, as "arbiter"
            probs, arms = add_arbiter_path(model.arbiter, probs, path_reliability(out))
        for i, (sid, text) in enumerate(zip(batch["sample_ids"], texts, strict=True)):
            row = {"id": sid, "prompt": prompt.name, "prompt_sha256": prompt.sha256, "text": text,
                   "label": parse_label(text, labels, mode=options.label_mode), "label_source": "generated"}
            if prompt.name == "ov":
                row["labels_ov"] = parse_openset_answer(text)
            if probs is not None:
                row.update(_head_columns(labels, probs, arms, i))
            yield row


@torch.no_grad()
def predict_rows(
    model: InferenceModel, samples: Sequence[Sample], batch_size: int = 16, prompt_name: str | None = None,
    progress: bool = False, *, use_video: bool = True, use_audio: bool = True,
) -> Iterator[dict]:
    """Predictions of a trained run: one row per sample, in order; `label` is the model's generated answer.

    The answer is decoded greedily with the given prompt (default `cfg.data.prompt`: the prompt the model was
    trained on) and parsed (`cfg.generate.label_mode`); for a prompt whose answer starts with the label only
    `label_answer_tokens` new tokens are generated, else `cfg.generate.max_new_tokens`.

    `use_video=False` / `use_audio=False` remove that modality from every prompt (not zeroed: its tokens
    are absent, as for a unimodal path), e.g. for unimodal recognition in `scripts/bias_report.py`; the
    fused-path batch changes, DCR's unimodal sub-batches do not.

    Rows: `id`, `label`, `label_source` ("generated"), `text` (the generated answer), `head_label` (argmax
    of the fused head), `probs` ({path: {label: p}}; with DCR also "text", "audio", "video" and, when the run
    has a fitted `arbiter.json`, "arbiter", with `arbiter_label` and the chosen `arm`) and the active methods'
    explanations (`MerModel.explain`, e.g. DnR's `dnr_ablation`). Everything runs inside the methods'
    inference scopes (e.g. AR with `ar.enabled`, which acts on the generating positions). With a fitted
    arbiter and `dcr.arbiter.answer="arm"`, `label` / `text` are the answer from the chosen arm's modalities
    (`reanswer_by_arm`; "answer_arm", "fused_text", "fused_label" added).
    """
    if model.mer is None:
        raise ValueError("predict_rows needs a trained run with heads (load_for_inference(run_dir=...))")
    prompt = load_prompt(prompt_name or model.cfg.data.prompt)
    gen_kwargs = _answer_gen_kwargs(model, prompt, batch_size)
    rows = _predict_rows(model, samples, prompt, batch_size, gen_kwargs, progress,
                         use_video=use_video, use_audio=use_audio)
    if not answers_by_arm(model, use_video, use_audio):
        yield from rows
        return
    yield from reanswer_by_arm(model, samples, list(rows), prompt, batch_size, gen_kwargs,
                               model.cfg.generate.label_mode)


def _answer_gen_kwargs(model: InferenceModel, prompt: PromptTemplate, batch_size: int) -> dict:
    """Decoding settings of `predict_rows`: greedy, `label_answer_tokens` new tokens for a prompt whose answer
    starts with the label, else `cfg.generate.max_new_tokens`."""
    tokens = model.cfg.generate.max_new_tokens
    if answers_with_label_first(prompt):
        tokens = min(tokens, label_answer_tokens(model.backbone.processor.tokenizer, list(model.cfg.data.labels)))
    return _gen_kwargs(model, GenerateConfig(max_new_tokens=tokens, batch_size=batch_size))


def predict_decodes_like(model: InferenceModel, prompt: PromptTemplate, batch_size: int,
                         options: GenerateConfig) -> bool:
    """Whether `predict_rows(prompt_name=prompt.name, batch_size=batch_size)` decodes exactly as `generate_rows`
    with `options` (then its `text` column is that generation's answer and need not be generated again)."""
    return (options.prompt == prompt.name and options.batch_size == batch_size
            and _answer_gen_kwargs(model, prompt, batch_size) == _gen_kwargs(model, options))


def _predict_rows(
    model: InferenceModel, samples: Sequence[Sample], prompt: PromptTemplate, batch_size: int, gen_kwargs: dict,
    progress: bool, *, use_video: bool, use_audio: bool,
) -> Iterator[dict]:
    """`predict_rows` without the arbiter's re-answering (every row answered from the given modalities)."""
    labels = list(model.cfg.data.labels)
    options = model.cfg.generate
    loader = inference_loader(model, samples, prompt, batch_size, use_video=use_video, use_audio=use_audio)
    for batch in tqdm(loader, disable=not progress, desc="predict"):
        with inference_scope(model, batch):
            out = model.mer(batch, compute_lm_loss=False)
            texts = _generate(model, batch, gen_kwargs)
        explained = model.mer.explain(out)  # e.g. DnR's component ablation per sample
        probs = {path: torch.softmax(lg, dim=-1) for path, lg in out.cls_logits.items()}
        arms = None
        if model.arbiter is not None:  # DCR: the path the arbiter picks, as the "arbiter" path
            probs, arms = add_arbiter_path(model.arbiter, probs, path_reliability(out))
        for i, sid in enumerate(batch["sample_ids"]):
            row = {"id": sid, "label": parse_label(texts[i], labels, mode=options.label_mode),
                   "label_source": "generated", "text": texts[i]}
            row.update(_head_columns(labels, probs, arms, i))
            row.update({key: values[i] for key, values in explained.items()})
            yield row


def routed_answers(
    model: InferenceModel, samples: Sequence[Sample], rows: Sequence[dict], arms: Sequence[str],
    batch_size: int = 16, prompt_name: str | None = None,
) -> list[str]:
    """The answer label of each sample from its arm's modalities (`ARM_INPUTS`), decoded as `predict_rows`
    decodes: "fused" samples keep their label in `rows` (the both-modality `predict_rows` output); only the
    samples routed to a unimodal arm are answered again (`arm_answer_rows`, generation only: no head pass)."""
    prompt = load_prompt(prompt_name or model.cfg.data.prompt)
    bare = dataclasses.replace(model, arbiter=None)
    texts = arm_answer_rows(bare, samples, arms, prompt, batch_size, _answer_gen_kwargs(model, prompt, batch_size))
    labels, mode = list(model.cfg.data.labels), model.cfg.generate.label_mode
    return [parse_label(texts[i], labels, mode=mode) if i in texts else r["label"] for i, r in enumerate(rows)]


def answers_per_arm(
    model: InferenceModel, samples: Sequence[Sample], batch_size: int = 16, rows: Sequence[dict] | None = None,
    prompt_name: str | None = None,
) -> dict[str, list[str]]:
    """{arm: the answer label of every sample generated from that arm's modalities (`ARM_INPUTS`)}: what
    `dcr.arbiter.reward="answer"` fits the arbiter on. Predicted without an arbiter; `rows` (the
    both-modality `predict_rows` output, if already computed) is reused for "fused"."""
    if rows is None:
        rows = list(predict_rows(dataclasses.replace(model, arbiter=None), samples, batch_size=batch_size,
                                 prompt_name=prompt_name))
    return {arm: routed_answers(model, samples, rows, [arm] * len(samples), batch_size, prompt_name)
            for arm in ARM_INPUTS}


def answers_by_arm(model: InferenceModel, use_video: bool = True, use_audio: bool = True) -> bool:
    """Whether answers follow the arbiter's arm: a fitted arbiter, `dcr.arbiter.answer="arm"`, both modalities."""
    return (model.arbiter is not None and model.cfg.dcr.arbiter.answer == "arm" and use_video and use_audio)


def arm_answer_rows(
    model: InferenceModel, samples: Sequence[Sample], arms: Sequence[str], prompt: PromptTemplate,
    batch_size: int, gen_kwargs: dict,
) -> dict[int, str]:
    """Generate, for every sample routed to a unimodal arm, the answer from that arm's modalities only.

    Args:
        samples: N samples.
        arms: N arm names (`ARM_INPUTS` keys); "fused" samples are skipped.
    Returns:
        {index into samples: generated text} for the non-fused samples.
    """
    out: dict[int, str] = {}
    for arm, (use_video, use_audio) in ARM_INPUTS.items():
        idx = [i for i, a in enumerate(arms) if a == arm]
        if arm == "fused" or not idx:
            continue
        # generation only, from at most one modality: no method sub-batch is read (DCR's paths are not run,
        # and per-sample AR skips its first pass where no prompt has both audio and video)
        loader = inference_loader(model, [samples[i] for i in idx], prompt, batch_size,
                                  use_video=use_video, use_audio=use_audio, method_parts=False)
        texts: list[str] = []
        for batch in loader:
            with inference_scope(model, batch):
                texts += _generate(model, batch, gen_kwargs)
        out.update(zip(idx, texts, strict=True))
    return out


def reanswer_by_arm(
    model: InferenceModel, samples: Sequence[Sample], rows: list[dict], prompt: PromptTemplate,
    batch_size: int, gen_kwargs: dict, label_mode: str,
) -> list[dict]:
    """Rows whose answer follows the arbiter: a row with a unimodal `arm` is answered again from that
    modality alone (`arm_answer_rows`); `answer_arm` names the arm whose inputs produced `text` / `label`,
    and `fused_text` / `fused_label` keep the both-modality answer."""
    labels = list(model.cfg.data.labels)
    texts = arm_answer_rows(model, samples, [r["arm"] for r in rows], prompt, batch_size, gen_kwargs)
    for i, row in enumerate(rows):
        row["fused_text"], row["fused_label"] = row["text"], row["label"]
        row["answer_arm"] = row["arm"]
        if i in texts:
            row["text"], row["label"] = texts[i], parse_label(texts[i], labels, mode=label_mode)
            if "labels_ov" in row:
                row["labels_ov"] = parse_openset_answer(texts[i])
    return rows


def generation_record(model: InferenceModel, options: GenerateConfig | None = None) -> dict:
    """What produced a predictions file (written beside it)."""
    options = options or model.cfg.generate
    prompt = load_prompt(options.prompt)
    return {"version": mllm_mer.__version__, "backbone": model.backbone.path, "prompt": prompt.name,
            "prompt_sha256": prompt.sha256, "generation": config_to_dict(options),
            "labels": list(model.cfg.data.labels), "methods": [m.name for m in active_methods(model.cfg)],
            "ar": config_to_dict(model.cfg.ar),
            "arbiter": config_to_dict(model.cfg.dcr.arbiter) if model.arbiter is not None else None}
