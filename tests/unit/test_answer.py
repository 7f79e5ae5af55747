"""The model's answer is every prediction row's primary `label` (as CA-MER scores it), on both backbone
families: generated greedily and parsed; the head's argmax and DCR's arbiter stay extra columns."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mllm_mer.backbone import load_backbone
from mllm_mer.config import load_config
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.fusion.dcr.ada import ARMS, Arbiter, LinUCB, feature_names
from mllm_mer.fusion.dcr.config import ArbiterConfig
from mllm_mer.generation import (
    ARM_INPUTS,
    InferenceModel,
    answers_with_label_first,
    generate_rows,
    generation_record,
    label_answer_tokens,
    predict_rows,
    routed_answers,
)
from mllm_mer.labels import parse_label
from mllm_mer.model import build_mer_model
from mllm_mer.prompts import load_prompt


@pytest.fixture(scope="module")
def setup(tiny_backbone_dir, syn_dir, tmp_path_factory):
    backbone = load_backbone(tiny_backbone_dir)
    cfg = load_config(None, [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl",
                             f"data.cache_dir={tmp_path_factory.mktemp('c')}", "generate.max_new_tokens=4"])
    torch.manual_seed(0)
    mer = build_mer_model(backbone, cfg)
    mer.eval()
    samples = read_jsonl(syn_dir / "test.jsonl", MER2023_LABELS)[:4]
    return backbone, cfg, mer, samples


def test_a_one_word_prompt_generates_just_enough_tokens(setup):
    backbone, cfg, _, _ = setup
    tok = backbone.processor.tokenizer
    need = label_answer_tokens(tok, cfg.data.labels)
    assert need == max(len(tok(w + "<|im_end|>", add_special_tokens=False)["input_ids"]) for w in cfg.data.labels)
    assert answers_with_label_first(load_prompt("label")) and not answers_with_label_first(load_prompt("explain"))


def test_primary_label_is_the_answer_never_the_head(setup):
    """A head pushed to always say labels[0] changes `head_label` only: the answer columns stay as they were."""
    backbone, cfg, mer, samples = setup
    model = InferenceModel(backbone, cfg, mer)
    before = list(predict_rows(model, samples, batch_size=2, prompt_name="label"))
    push = torch.tensor([100.0] + [0.0] * (len(cfg.data.labels) - 1))
    with torch.no_grad():
        mer.fusion_head.proj.bias.add_(push)
    try:
        rows = list(predict_rows(model, samples, batch_size=2, prompt_name="label"))
        generated = list(predict_rows(model, samples[:2], batch_size=2, prompt_name="explain"))
    finally:
        with torch.no_grad():
            mer.fusion_head.proj.bias.sub_(push)
    assert [r["id"] for r in rows] == [s.id for s in samples]
    for r, b in zip(rows, before, strict=True):
        assert r["label_source"] == "generated" and r["head_label"] == cfg.data.labels[0]
        assert r["label"] == parse_label(r["text"], cfg.data.labels)
        assert r["label"] == b["label"] and r["text"] == b["text"]
    assert any(b["head_label"] != cfg.data.labels[0] for b in before)  # the push really changed the head
    for r in generated:
        assert r["label_source"] == "generated" and r["label"] == parse_label(r["text"], cfg.data.labels)
        assert r["head_label"] == cfg.data.labels[0]


def test_generated_rows_keep_the_head_as_a_column(setup):
    backbone, cfg, mer, samples = setup
    options = dataclasses.replace(cfg.generate, prompt="label", max_new_tokens=3, batch_size=2)
    rows = list(generate_rows(InferenceModel(backbone, cfg, mer), samples[:2], options, progress=False))
    for r in rows:
        assert r["label_source"] == "generated" and r["label"] == parse_label(r["text"], cfg.data.labels)
        assert r["head_label"] == max(r["probs"]["fused"], key=r["probs"]["fused"].get)


@pytest.fixture(scope="module")
def dcr_setup(setup, tiny_backbone_dir):
    """A model with DCR's unimodal paths (the arbiter needs every path's probabilities)."""
    _, cfg, _, samples = setup
    backbone = load_backbone(tiny_backbone_dir)  # its own: peft wraps the backbone it is given
    cfg = dataclasses.replace(cfg, dcr=dataclasses.replace(cfg.dcr, enabled=True))
    torch.manual_seed(0)
    mer = build_mer_model(backbone, cfg)
    mer.eval()
    return backbone, cfg, mer, samples


def routing_arbiter(labels, arm: str, **config) -> Arbiter:
    """A real arbiter whose reward model prefers `arm` on every clip (its bias feature's weight)."""
    cfg = ArbiterConfig(**{"state": "rich", **config})  # the untrained model has no fitted reliability heads
    dim = len(feature_names(labels, cfg.state))
    policy = LinUCB(len(ARMS), dim, cfg.ridge, cfg.alpha)
    policy.b[ARMS.index(arm), -1] = 10.0  # theta_arm . x = 10 * bias for every x
    return Arbiter(labels=tuple(labels), policy=policy, config=cfg, fit_info={})


@pytest.mark.parametrize("arm", ["audio", "video", "text"])
def test_the_answer_drops_to_the_arm_the_arbiter_picks(dcr_setup, arm):
    """With a fitted arbiter the answer of a clip routed to a unimodal arm is the answer from that modality
    alone, exactly as `predict_rows(use_video/use_audio=False)` gives it; the both-modality answer is kept."""
    backbone, cfg, mer, samples = dcr_setup
    use_video, use_audio = ARM_INPUTS[arm]
    plain = InferenceModel(backbone, cfg, mer)
    fused = list(predict_rows(plain, samples, batch_size=2, prompt_name="label"))
    alone = list(predict_rows(plain, samples, batch_size=2, prompt_name="label",
                              use_video=use_video, use_audio=use_audio))
    mixed = [arm if i % 2 else "fused" for i in range(len(samples))]  # the library's label-path twin
    assert routed_answers(plain, samples, fused, mixed, 2, "label") == [
        (a if i % 2 else f)["label"] for i, (f, a) in enumerate(zip(fused, alone, strict=True))]
    routed = InferenceModel(backbone, cfg, mer, routing_arbiter(cfg.data.labels, arm))
    rows = list(predict_rows(routed, samples, batch_size=2, prompt_name="label"))
    for r, f, a in zip(rows, fused, alone, strict=True):
        assert r["arm"] == r["answer_arm"] == arm
        assert (r["text"], r["label"]) == (a["text"], a["label"])
        assert (r["fused_text"], r["fused_label"]) == (f["text"], f["label"])
        assert r["arbiter_label"] == max(r["probs"][arm], key=r["probs"][arm].get)
    options = dataclasses.replace(cfg.generate, prompt="label", max_new_tokens=3, batch_size=2)
    gen = list(generate_rows(routed, samples[:2], options, progress=False))
    gen_alone = list(generate_rows(plain, samples[:2], options, progress=False,
                                   use_video=use_video, use_audio=use_audio))
    assert [g["text"] for g in gen] == [g["text"] for g in gen_alone]
    assert all(g["answer_arm"] == arm for g in gen)
    assert generation_record(routed)["arbiter"]["answer"] == "arm" and generation_record(plain)["arbiter"] is None


def test_reanswers_collate_no_method_sub_batches(dcr_setup, monkeypatch):
    """A clip routed to one modality is answered from batches without DCR's path sub-batches (nothing reads
    them there), to the same answers as from batches that carry them."""
    from mllm_mer import generation

    backbone, cfg, mer, samples = dcr_setup
    plain = InferenceModel(backbone, cfg, mer)
    fused = list(predict_rows(plain, samples, batch_size=2, prompt_name="label"))
    alone = list(predict_rows(plain, samples, batch_size=2, prompt_name="label", use_video=False))
    flags: list[bool] = []
    real = generation.build_inference_loader

    def spy(*args, **kwargs):
        flags.append(kwargs["methods"])
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "build_inference_loader", spy)
    answers = routed_answers(plain, samples, fused, ["audio"] * len(samples), 2, "label")
    assert flags == [False] and answers == [a["label"] for a in alone]


def test_fuse_margin_and_answer_fused_keep_the_bimodal_answer(dcr_setup):
    backbone, cfg, mer, samples = dcr_setup
    fused = list(predict_rows(InferenceModel(backbone, cfg, mer), samples, batch_size=2, prompt_name="label"))
    for arbiter, arm in ((routing_arbiter(cfg.data.labels, "video", fuse_margin=20.0), "fused"),
                         (routing_arbiter(cfg.data.labels, "video"), "video")):
        for answer in ("arm", "fused"):
            run_cfg = dataclasses.replace(cfg, dcr=dataclasses.replace(
                cfg.dcr, arbiter=dataclasses.replace(cfg.dcr.arbiter, answer=answer)))
            rows = list(predict_rows(InferenceModel(backbone, run_cfg, mer, arbiter), samples, batch_size=2,
                                     prompt_name="label"))
            assert [r["arm"] for r in rows] == [arm] * len(samples)
            if answer == "fused" or arm == "fused":
                assert [r["text"] for r in rows] == [f["text"] for f in fused]
            assert ("answer_arm" in rows[0]) == (answer == "arm")


def _bias_report_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bias_report.py"
    spec = importlib.util.spec_from_file_location("bias_report_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bias_report_scores_heads_and_generates_each_condition_once(setup, monkeypatch):
    """With --run, the heads' accuracy comes from `head_label`, and the generated answers reuse the
    `predict_rows` texts when the decoding is the same (one generation per condition), not otherwise."""
    backbone, cfg, mer, samples = setup
    model = InferenceModel(backbone, cfg, mer)
    bias = _bias_report_script()
    prompt, tokens = load_prompt("explain"), cfg.generate.max_new_tokens
    predicted = bias.condition_rows(model, samples, "explain", 2)
    options = dataclasses.replace(cfg.generate, prompt="explain", max_new_tokens=tokens, batch_size=2)
    expected = [r["text"] for r in generate_rows(model, samples, options, progress=False)]
    calls: list[dict] = []

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return generate_rows(*args, **kwargs)

    monkeypatch.setattr(bias, "generate_rows", counting)
    report = bias.generated_report(model, samples, prompt, 2, tokens, predicted)
    assert calls == [] and report["generated"]["examples"] == expected[:3]
    bias.generated_report(model, samples, prompt, 2, tokens - 1, predicted)  # another budget: generated again
    assert len(calls) == 3
    acc = bias.accuracy_report(model, samples, predicted)
    heads = [r["head_label"] for r in predicted["full"]]
    assert acc["fused"]["accuracy"] == pytest.approx(sum(h == s.label for h, s in zip(heads, samples, strict=True)) / len(samples))
    video_heads = [r["head_label"] for r in predicted["video_only"]]
    assert acc["unimodal"]["video_only"]["accuracy"] == pytest.approx(
        sum(h == s.label for h, s in zip(video_heads, samples, strict=True)) / len(samples))
