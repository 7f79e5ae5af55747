"""DCR: unimodal sub-batches, path adapters and heads (both backbone families), AFD, the LinUCB arbiter,
held-out checks, reports."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from mllm_mer.backbone import load_backbone
from mllm_mer.config import ConfigError, load_config
from mllm_mer.data.collate import MerCollator
from mllm_mer.data.dataset import DecodeOptions, MerDataset, build_media_dataset
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.schema import MER2023_LABELS, Modality
from mllm_mer.fusion.dcr.ada import (
    ARMS,
    SEARCH_GRID,
    LinUCB,
    add_arbiter_path,
    arbiter_inputs,
    arm_rewards,
    build_state,
    check_held_out,
    crossfit_select,
    feature_names,
    fit_arbiter,
    load_arbiter,
    save_arbiter,
    search_arbiter,
)
from mllm_mer.fusion.dcr.afd import afd_loss, aggregate_evidence, teacher_distribution
from mllm_mer.fusion.dcr.collate import UnimodalPathCollator
from mllm_mer.fusion.dcr.config import PATHS, ArbiterConfig
from mllm_mer.fusion.dcr.paths import adapter_name
from mllm_mer.fusion.dcr.report import fuse_or_drop_report
from mllm_mer.model import build_mer_model
from mllm_mer.prompts import load_prompt
from mllm_mer.trainable import apply_trainable
from mllm_mer.training.run_dir import save_final

OPTS = DecodeOptions(fps=4.0, max_frames=32, sample_rate=16000, max_audio_seconds=30.0)


def cfg_for(tiny_backbone_dir, *overrides):
    return load_config(
        None, [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl", "dcr.enabled=true", *overrides]
    )


@pytest.fixture()
def items(syn_dir, tmp_path):
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:3]
    mds = MerDataset(samples, build_media_dataset(samples, OPTS, tmp_path / "cache"), OPTS)
    return [mds[i] for i in range(3)]


def path_collator(any_backbone, train: bool = True) -> UnimodalPathCollator:
    base = MerCollator(
        any_backbone.processor,
        any_backbone.token_ids,
        load_prompt("label"),
        load_prompt("system", kind="free").text,
        MER2023_LABELS,
        train=train,
    )
    return UnimodalPathCollator(base)


# ------------------------------------------------------------------------------------------ sub-batches
def test_unimodal_sub_batches_hold_only_their_modality(any_backbone, items):
    collate = path_collator(any_backbone)
    batch = collate(items)
    plain = collate.base(items)
    torch.testing.assert_close(batch["input_ids"], plain["input_ids"])  # the fused batch is unchanged
    expected = {
        "text": {Modality.TEXT},
        "audio": {Modality.TEXT, Modality.AUDIO},
        "video": {Modality.TEXT, Modality.VIDEO},
    }
    for path in PATHS:
        sub = batch["paths"][path]
        assert sub["sample_ids"] == batch["sample_ids"]
        torch.testing.assert_close(sub["class_id"], batch["class_id"])
        assert sub["labels"] is None and sub["use_audio_in_video"] is False  # prompt only
        tm = sub["token_modality"]
        real = sub["attention_mask"].bool()
        assert {Modality(int(v)) for v in tm[real].unique()} == expected[path]
        if path != "text":  # every sample has tokens of the path's modality
            assert ((tm == int(Modality[path.upper()])) & real).any(1).all()
    assert batch["paths"]["text"].get("pixel_values_videos") is None
    assert batch["paths"]["text"].get("input_features") is None
    assert batch["paths"]["audio"].get("pixel_values_videos") is None
    assert batch["paths"]["video"].get("input_features") is None


def test_modality_dropout_drops_the_answer_to_one_modality_and_leaves_the_paths(any_backbone, items):
    """`data.modality_dropout` (what the ablation's arbiter rows train with) makes the fused batch, the one with
    the LM answer, audio-only or video-only, while every unimodal path still gets its own sub-batch."""
    full = path_collator(any_backbone)
    dropped = UnimodalPathCollator(dataclasses.replace(full.base, modality_dropout=1.0))
    batch, ref = dropped(items), full(items)
    real = batch["attention_mask"].bool()
    present = {Modality(int(v)) for v in batch["token_modality"][real].unique()}
    assert present in ({Modality.TEXT, Modality.AUDIO}, {Modality.TEXT, Modality.VIDEO})
    assert (batch["labels"] != -100).any()  # the answer is still trained, from one modality
    for path in PATHS:
        for key, value in ref["paths"][path].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(batch["paths"][path][key], value)
            else:
                assert batch["paths"][path][key] == value


def test_sample_without_audio_is_masked_out_of_the_audio_path(tiny_backbone_dir, any_backbone, items):
    sample, media = items[0]
    batch = path_collator(any_backbone)([(sample, dataclasses.replace(media, audio=None))])
    assert not (batch["paths"]["audio"]["token_modality"] == int(Modality.AUDIO)).any()
    cfg = cfg_for(tiny_backbone_dir)
    model = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
    apply_trainable(model, cfg)
    out = model(batch)
    assert not out.parts["dcr"].present["audio"].any() and out.parts["dcr"].present["video"].all()
    assert float(out.aux_losses["dcr_audio"]) == 0.0
    out.loss.backward()  # the empty path still joins the graph (DDP sees every parameter used)
    assert all(p.grad is not None for n, p in model.named_parameters() if "fusion_audio" in n)


# --------------------------------------------------------------------------------------- model, adapters
def test_paths_forward_backward_and_adapters(tiny_backbone_dir, any_backbone, items):
    cfg = cfg_for(tiny_backbone_dir)
    model = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
    apply_trainable(model, cfg)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert set(model.backbone.peft_config) == {"default", *(adapter_name(p) for p in PATHS)}
    batch = path_collator(any_backbone)(items)
    out = model(batch)
    assert set(out.cls_logits) == {"fused", "text", "audio", "video"}
    assert all(v.shape == (3, 6) for v in out.cls_logits.values())
    assert {"dcr_text", "dcr_audio", "dcr_video", "dcr_afd"} <= set(out.aux_losses)
    # the student feed starts at exactly 0: "fused" is the fused head's own output at initialisation
    torch.testing.assert_close(out.parts["dcr"].feed, torch.zeros(3, 6))
    expected = (
        out.lm_loss + out.cls_loss + sum(model.aux_loss_weights[k] * v for k, v in out.aux_losses.items())
    )
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.backbone.active_adapter == "default"
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}  # switching left them alone
    for name in ("default", *(adapter_name(p) for p in PATHS)):
        grads = [p.grad for n, p in model.named_parameters() if f".lora_B.{name}." in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name
    for head in ("fusion_text", "fusion_audio", "fusion_video", "fusion_dcr_feed"):
        assert any(
            p.grad is not None and p.grad.abs().sum() > 0
            for n, p in model.named_parameters()
            if n.startswith(head)
        ), head


def test_a_subset_of_paths_gives_the_same_logits_without_losses(tiny_backbone_dir, any_backbone, items):
    """Per-sample AR's first pass runs the audio and video paths only: the same logits as the full pass."""
    from mllm_mer.fusion.dcr.paths import run_unimodal_paths

    model = build_mer_model(load_backbone(tiny_backbone_dir), cfg_for(tiny_backbone_dir)).eval()
    batch = path_collator(any_backbone, train=False)(items)
    with torch.no_grad():
        every = run_unimodal_paths(model, batch)
        two = run_unimodal_paths(model, batch, only=("audio", "video"))
    assert set(two.logits) == set(two.present) == {"audio", "video"} and two.feed is None and not two.losses
    for path in ("audio", "video"):
        torch.testing.assert_close(two.logits[path], every.logits[path], rtol=0, atol=0)
    with pytest.raises(ValueError, match="choose among the paths"):
        run_unimodal_paths(model, batch, only=("face",))


def test_staged_schedule_holds_afd_and_feed_until_stage_two(tiny_backbone_dir, any_backbone, items):
    cfg = cfg_for(tiny_backbone_dir, "dcr.schedule=staged", "dcr.stage1_steps=5")
    model = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
    apply_trainable(model, cfg)
    with torch.no_grad():
        model.fusion_dcr_feed.gate.fill_(1.0)
    batch = path_collator(any_backbone)(items)
    early = model({**batch, "train_step": 2})
    assert float(early.aux_losses["dcr_afd"]) == 0.0 and float(early.parts["dcr"].feed.abs().sum()) == 0.0
    late = model({**batch, "train_step": 5})
    assert float(late.aux_losses["dcr_afd"]) > 0.0 and float(late.parts["dcr"].feed.abs().sum()) > 0.0


def test_all_adapters_and_heads_save_and_reload(tiny_backbone_dir, any_backbone, items, tmp_path):
    cfg = cfg_for(tiny_backbone_dir, f"train.output_dir={tmp_path / 'run'}")
    model = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
    apply_trainable(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # make every adapter and head distinct from its initialisation
        for n, p in model.named_parameters():
            if ".lora_B." in n or n.startswith("fusion_"):
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    batch = path_collator(any_backbone, train=False)(items)
    with torch.no_grad():
        before = model(batch).cls_logits
    save_final(Accelerator(cpu=True), model, cfg)
    for path in PATHS:
        assert (tmp_path / "run" / "adapter" / adapter_name(path) / "adapter_model.safetensors").is_file()
    reloaded = build_mer_model(load_backbone(tiny_backbone_dir), cfg, run_dir=tmp_path / "run")
    reloaded.eval()
    with torch.no_grad():
        after = reloaded(batch).cls_logits
    for path, logits in before.items():
        torch.testing.assert_close(after[path], logits, msg=path)
    (tmp_path / "run" / "adapter" / "dcr_video" / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="dcr.enabled"):
        build_mer_model(load_backbone(tiny_backbone_dir), cfg, run_dir=tmp_path / "run")


def test_gradient_checkpointing_recomputes_under_the_path_adapter(tiny_backbone_dir, any_backbone, items):
    batch = path_collator(any_backbone)(items[:2])
    grads = []
    for ckpt in ("false", "true"):
        cfg = cfg_for(tiny_backbone_dir, f"train.gradient_checkpointing={ckpt}", "lora.dropout=0")
        torch.manual_seed(0)
        model = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
        apply_trainable(model, cfg)
        model.train()  # transformers checkpoints layers in training mode only
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        model(batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if ".lora_A.dcr_" in n})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)


# ------------------------------------------------------------------------------------------------- AFD
def test_afd_evidence_aggregation_hand_computed():
    # one sample, two steps, two classes: logits chosen so that softplus gives known evidence
    z = torch.tensor([[[math.log(math.e**3 - 1), math.log(math.e - 1)], [-30.0, math.log(math.e**2 - 1)]]])
    ev = aggregate_evidence(z, torch.tensor([[True, True]]))
    e1, e2 = torch.tensor([3.0, 1.0]), torch.tensor([0.0, 2.0])  # softplus(z) (e^-30 ~ 0)
    w1, w2 = 4.0 / 6.0, 2.0 / 4.0  # total / (total + C)
    a1, a2 = w1 / (w1 + w2), w2 / (w1 + w2)
    torch.testing.assert_close(ev.alpha[0], 1.0 + a1 * e1 + a2 * e2, atol=1e-6, rtol=0)
    torch.testing.assert_close(ev.confidence[0], torch.tensor(a1 * w1 + a2 * w2), atol=1e-6, rtol=0)
    # a masked step is ignored; a sample without steps is uniform, not present, with zero confidence
    only_first = aggregate_evidence(z, torch.tensor([[True, False]]))
    torch.testing.assert_close(only_first.alpha[0], 1.0 + e1, atol=1e-6, rtol=0)
    none = aggregate_evidence(z, torch.tensor([[False, False]]))
    assert not none.present[0] and float(none.confidence[0]) == 0.0
    torch.testing.assert_close(none.alpha[0], torch.ones(2))


def test_afd_loss_is_zero_when_student_equals_teachers():
    torch.manual_seed(0)
    z = torch.randn(4, 7, 6)
    mask = torch.ones(4, 7, dtype=torch.bool)
    audio, video = aggregate_evidence(z, mask), aggregate_evidence(z.clone(), mask)
    student = audio.alpha.log()  # softmax(student / tau) == softmax(log alpha / tau) for every tau
    for tau in (1.0, 2.0):
        loss = afd_loss(student, [audio, video], temperature=tau)
        assert abs(float(loss)) < 1e-6
    assert float(afd_loss(torch.zeros(4, 6), [audio, video])) > 1e-3


def sample_teachers(teachers: list, i: int) -> list:
    """Sample `i`'s slice of each teacher's evidence (batch of 1)."""
    return [
        dataclasses.replace(
            t, alpha=t.alpha[i : i + 1], confidence=t.confidence[i : i + 1], present=t.present[i : i + 1]
        )
        for t in teachers
    ]


def test_afd_gating_down_weights_disagreeing_teachers():
    C = 6
    big = torch.full((2, 3, C), -30.0)
    audio_z, video_z = big.clone(), big.clone()
    audio_z[..., 0] = 30.0
    video_z[0, :, 0] = 30.0  # sample 0: teachers agree (class 0)
    video_z[1, :, 3] = 30.0  # sample 1: teachers disagree (class 0 vs class 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    teachers = [aggregate_evidence(audio_z, mask), aggregate_evidence(video_z, mask)]
    _, agreement, valid = teacher_distribution(teachers, 1.0)
    assert valid.all() and float(agreement[0]) > 0.999 and float(agreement[1]) < 0.3
    student = torch.zeros(2, C)
    per_sample = [
        afd_loss(
            student[i : i + 1],
            sample_teachers(teachers, i),
        )
        for i in range(2)
    ]
    ungated = [
        afd_loss(
            student[i : i + 1],
            sample_teachers(teachers, i),
            agreement_power=0.0,
        )
        for i in range(2)
    ]
    torch.testing.assert_close(per_sample[1], ungated[1] * agreement[1])
    torch.testing.assert_close(per_sample[0], ungated[0] * agreement[0])
    # a sample with only one teacher present is not gated
    video_absent = dataclasses.replace(teachers[1], present=torch.tensor([False, False]))
    _, agreement, valid = teacher_distribution([teachers[0], video_absent], 1.0)
    assert valid.all() and torch.equal(agreement, torch.ones(2))


def test_afd_still_teaches_on_conflict_clips():
    C = 6
    big = torch.full((1, 3, C), -30.0)
    audio_z, video_z = big.clone(), big.clone()
    audio_z[..., 0] = 30.0  # audio teacher: class 0, very sure
    video_z[..., 3] = 2.0  # video teacher: class 3, less sure
    mask = torch.ones(1, 3, dtype=torch.bool)
    teachers = [aggregate_evidence(audio_z, mask), aggregate_evidence(video_z, mask)]
    assert float(teachers[0].confidence[0]) > float(teachers[1].confidence[0])
    _, g, _ = teacher_distribution(teachers, 1.0)
    student = torch.zeros(1, C)
    gated = afd_loss(student, teachers, agreement_power=4.0)
    ungated = afd_loss(student, teachers, agreement_power=0.0)
    floored = afd_loss(student, teachers, agreement_power=4.0, agreement_floor=0.25)
    torch.testing.assert_close(floored, (0.25 + 0.75 * g[0] ** 4) * ungated)
    assert float(floored) >= 0.25 * float(ungated) > float(gated) > 0
    # "confident": a disagreeing pair teaches mostly the surer teacher (audio here, by its own evidence)
    p_conf, g, _ = teacher_distribution(teachers, 1.0, "confident")
    p_mix, _, _ = teacher_distribution(teachers, 1.0, "mix")
    p_audio = teachers[0].alpha / teachers[0].alpha.sum(-1, keepdim=True)
    torch.testing.assert_close(p_conf, g[:, None] * p_mix + (1 - g[:, None]) * p_audio)
    assert float(p_conf[0, 0]) > float(p_mix[0, 0])
    # swap which teacher is surer: the target follows the evidence, not the modality
    swapped = [aggregate_evidence(video_z, mask), aggregate_evidence(audio_z, mask)]
    p_swap, _, _ = teacher_distribution(swapped, 1.0, "confident")
    torch.testing.assert_close(p_swap, p_conf)
    # agreeing teachers keep their mixture
    agree = [aggregate_evidence(audio_z, mask), aggregate_evidence(audio_z.clone(), mask)]
    torch.testing.assert_close(teacher_distribution(agree, 2.0, "confident")[0],
                               teacher_distribution(agree, 2.0, "mix")[0])


def test_afd_moves_only_the_student():
    student = torch.zeros(2, 6, requires_grad=True)
    teacher_z = torch.randn(2, 4, 6, requires_grad=True)
    ev = aggregate_evidence(teacher_z.detach(), torch.ones(2, 4, dtype=torch.bool))
    afd_loss(student, [ev, ev]).backward()
    assert student.grad is not None and teacher_z.grad is None


# ------------------------------------------------------------------------------------------------- ADA
def test_linucb_matches_hand_computed_updates_on_two_arms():
    bandit = LinUCB(n_arms=2, dim=2, ridge=1.0, alpha=1.0)
    x1, x2, x3 = np.array([1.0, 0.0]), np.array([1.0, 1.0]), np.array([0.0, 1.0])
    # step 1: theta = 0 and both bonuses are 1 -> tie -> arm 0; reward +1
    np.testing.assert_allclose(bandit.ucb(x1), [[1.0, 1.0]])
    bandit.update(0, x1, 1.0)
    np.testing.assert_allclose(bandit.A[0], [[2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(bandit.b[0], [1.0, 0.0])
    np.testing.assert_allclose(bandit.theta()[0], [0.5, 0.0])
    # step 2: ucb_0 = 0.5 + sqrt(1/2 + 1), ucb_1 = 0 + sqrt(2) -> arm 0; reward -1
    np.testing.assert_allclose(bandit.ucb(x2), [[0.5 + math.sqrt(1.5), math.sqrt(2.0)]])
    bandit.update(0, x2, -1.0)
    np.testing.assert_allclose(bandit.A[0], [[3.0, 1.0], [1.0, 2.0]])
    np.testing.assert_allclose(bandit.b[0], [0.0, -1.0])
    np.testing.assert_allclose(bandit.theta()[0], [0.2, -0.6])  # (1/5) [[2, -1], [-1, 3]] @ [0, -1]
    # step 3: ucb_0 = -0.6 + sqrt(3/5) ~ 0.17 < ucb_1 = 1 -> arm 1
    np.testing.assert_allclose(bandit.ucb(x3), [[-0.6 + math.sqrt(0.6), 1.0]])
    np.testing.assert_allclose(bandit.A[1], np.eye(2))  # untouched arm


def random_probs(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {a: torch.softmax(3 * torch.randn(n, 6, generator=g, dtype=torch.float64), -1) for a in ARMS}


def test_state_and_rewards_hand_checked():
    probs = {a: torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64) for a in ARMS}
    probs["audio"] = torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    x = build_state(probs, "probs")
    names = feature_names(["a", "b"], "probs")
    assert x.shape == (2, len(names)) == (2, 4 * 2 + 15)
    row = dict(zip(names, x[0].tolist(), strict=True))
    assert row["entropy_fused"] == pytest.approx(0.0) and row["margin_fused"] == pytest.approx(1.0)
    assert row["js_fused_audio"] == pytest.approx(1.0) and row["js_fused_text"] == pytest.approx(0.0)
    assert dict(zip(names, x[1].tolist(), strict=True))["entropy_video"] == pytest.approx(1.0)
    r = arm_rewards(probs, torch.tensor([0, 1]), ArbiterConfig(reward="head", state="rich", calibration_weight=0.5))
    # sample 0: fused correct, Brier/2 = 0 -> 1; audio wrong, Brier/2 = 1 -> -0.5
    assert r[0, ARMS.index("fused")] == pytest.approx(1.0) and r[0, ARMS.index("audio")] == pytest.approx(
        -0.5
    )
    # sample 1: a tie argmax picks class 0 (wrong), Brier/2 = 0.25 -> -0.125
    assert r[1, 0] == pytest.approx(-0.125)


def test_rich_state_adds_confidence_and_agreement():
    probs = {a: torch.tensor([[0.7, 0.3], [0.4, 0.6]], dtype=torch.float64) for a in ARMS}
    probs["audio"] = torch.tensor([[0.1, 0.9], [0.2, 0.8]], dtype=torch.float64)
    names = feature_names(["a", "b"])  # "rich" is the default
    x = build_state(probs)
    assert x.shape == (2, len(names)) == (2, 4 * 2 + 25) and names[-1] == "bias"
    torch.testing.assert_close(x[:, : 4 * 2 + 14], build_state(probs, "probs")[:, :-1])
    rows = [dict(zip(names, r.tolist(), strict=True)) for r in x]
    assert rows[0]["maxp_audio"] == pytest.approx(0.9) and rows[0]["maxp_video"] == pytest.approx(0.7)
    assert rows[0]["agree_audio_video"] == pytest.approx(0.07 + 0.27)  # argmaxes differ: low
    assert rows[1]["agree_audio_video"] == pytest.approx(0.08 + 0.48)  # same argmax: higher
    assert rows[0]["agree_fused_video"] == pytest.approx(0.49 + 0.09)
    one_hot = {a: torch.eye(2, dtype=torch.float64)[[0, 1]] for a in ARMS}
    one_hot["audio"] = torch.eye(2, dtype=torch.float64)[[1, 1]]
    hard = [dict(zip(names, r.tolist(), strict=True)) for r in build_state(one_hot)]
    assert [r["agree_audio_video"] for r in hard] == [0.0, 1.0]  # the indicator for one-hot paths
    with pytest.raises(ValueError, match="unknown arbiter state"):
        build_state(probs, "hidden")


def test_crossfit_never_scores_a_sample_with_an_arbiter_fitted_on_it():
    n = 60
    probs = random_probs(n, seed=4)
    labels = torch.randint(0, 6, (n,), generator=torch.Generator().manual_seed(5))
    cfg = ArbiterConfig(reward="head", state="rich", folds=4, seed=3)
    arms, folds = crossfit_select(probs, labels, cfg)
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3] and len(arms) == n
    for k in range(4):
        held = torch.as_tensor(folds == k)
        # each fold's choices are those of an arbiter fitted on the other folds only
        other = fit_arbiter({a: p[~held] for a, p in probs.items()}, labels[~held], cfg)
        assert [arms[i] for i in np.flatnonzero(folds == k)] == other.select({a: p[held] for a, p in probs.items()})
        # so changing the labels of fold k cannot change fold k's choices (it does change the others' fits)
        changed = torch.where(held, (labels + 1) % 6, labels)
        again, _ = crossfit_select(probs, changed, cfg)
        assert [again[i] for i in np.flatnonzero(folds == k)] == [arms[i] for i in np.flatnonzero(folds == k)]
    # in-sample choices differ from cross-fitted ones on this noise (the in-sample fit saw each label)
    assert fit_arbiter(probs, labels, cfg).select(probs) != arms


def test_search_chooses_on_cross_fitted_accuracy_with_fixed_folds():
    """search_arbiter scores every grid setting by crossfit_select on the same folds (never in-sample), keeps
    the best (ties: the earlier), drops the "reliable" state without reliabilities and refuses unknown fields."""
    n = 48
    probs, labels = random_probs(n, seed=7), torch.randint(0, 6, (n,), generator=torch.Generator().manual_seed(8))
    answers = {a: torch.full((n,), -1) for a in ARMS}  # only the audio arm's answer is ever right
    answers["audio"] = labels.clone()
    base = ArbiterConfig(reward="answer", state="rich", folds=4, seed=1)
    folds = np.arange(n) % 4
    chosen, records = search_arbiter(probs, labels, base, answers, grid={"fuse_margin": (100.0, 0.0)}, folds=folds)
    assert chosen.fuse_margin == 0.0 and [r["values"] for r in records] == [{"fuse_margin": 100.0}, {"fuse_margin": 0.0}]
    assert records[0]["answer_accuracy"] == 0.0 < records[1]["answer_accuracy"]  # a margin of 100 always fuses
    for r in records:  # each record is crossfit_select's choices on those folds, judged by the routed answer
        arms, _ = crossfit_select(probs, labels, dataclasses.replace(base, **r["values"]), answers, folds=folds)
        assert r["answer_accuracy"] == pytest.approx(np.mean([a == "audio" for a in arms]))
        heads = torch.stack([probs[a][i] for i, a in enumerate(arms)]).argmax(-1)
        assert r["accuracy"] == pytest.approx(float((heads == labels).double().mean()))
    tie, records = search_arbiter(probs, labels, dataclasses.replace(base, feedback="full"), answers,
                                  grid={"alpha": (0.5, 2.0)}, folds=folds)  # full feedback ignores alpha
    assert records[0]["answer_accuracy"] == records[1]["answer_accuracy"] and tie.alpha == 0.5
    default, records = search_arbiter(probs, labels, base, answers)  # no reliabilities: "rich" only, seeded folds
    assert len(records) == 12 and {r["values"]["state"] for r in records} == {"rich"}
    assert set(records[0]["values"]) == set(SEARCH_GRID)
    with pytest.raises(ValueError, match=r"\['ridg'\] are not dcr.arbiter fields"):
        search_arbiter(probs, labels, base, answers, grid={"ridg": (1.0,)})
    with pytest.raises(ValueError, match="no setting to try"):
        search_arbiter(probs, labels, base, answers, grid={"state": ("reliable",)})
    with pytest.raises(ValueError, match="at least 2 folds"):
        crossfit_select(probs, labels, base, answers, folds=np.zeros(n, dtype=int))


def test_arbiter_config_ranges_and_old_files(tmp_path):
    with pytest.raises(ConfigError, match=r"dcr.arbiter.folds=1 is out of range"):
        load_config(None, ["dcr.arbiter.folds=1"])
    with pytest.raises(ConfigError, match=r"dcr.afd_agreement_floor=1.5 is out of range"):
        load_config(None, ["dcr.afd_agreement_floor=1.5"])
    probs, labels = random_probs(20), torch.randint(0, 6, (20,), generator=torch.Generator().manual_seed(6))
    old = dataclasses.replace(fit_arbiter(probs, labels, ArbiterConfig(reward="head", state="probs")), labels=tuple(MER2023_LABELS))
    data = old.to_dict()
    for key in ("state", "folds", "reward", "fuse_margin", "answer"):  # a file written before these fields existed
        del data["config"][key]
    (tmp_path / "arbiter.json").write_text(json.dumps(data))
    assert load_arbiter(tmp_path / "arbiter.json").select(probs) == old.select(probs)


def test_full_feedback_fit_is_ridge_regression_per_arm():
    probs, labels = random_probs(40), torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(1))
    cfg = ArbiterConfig(reward="head", state="rich", feedback="full", epochs=3, ridge=2.0)  # full feedback: one pass whatever epochs
    arbiter = fit_arbiter(probs, labels, cfg)
    x = build_state(probs, cfg.state).numpy()
    r = arm_rewards(probs, labels, cfg).numpy()
    for k in range(len(ARMS)):
        theta = np.linalg.solve(2.0 * np.eye(x.shape[1]) + x.T @ x, x.T @ r[:, k])
        np.testing.assert_allclose(arbiter.policy.theta()[k], theta, rtol=1e-6, atol=1e-9)


def test_arbiter_fits_from_probabilities_and_labels_only():
    # the fitting API takes nothing else: no cue labels, no subsets, no sample ids
    # (and the model's own per-arm answers for reward="answer" and its paths' predicted reliabilities for
    # state="reliable": outputs, never cue labels)
    assert list(inspect.signature(fit_arbiter).parameters) == ["probs", "labels", "config", "answers", "reliability"]
    probs = random_probs(30)
    labels = torch.randint(0, 6, (30,), generator=torch.Generator().manual_seed(2))
    names = list(MER2023_LABELS)

    def rows(cues: str) -> list[dict]:
        return [
            {
                "id": f"s{i}",
                "label": "neutral",
                "subset": cues,
                "cues": {"audio": cues, "video": cues},
                "probs": {a: dict(zip(names, probs[a][i].tolist(), strict=True)) for a in ARMS},
            }
            for i in range(30)
        ]

    by_id = {f"s{i}": names[int(y)] for i, y in enumerate(labels)}
    fits = []
    for cues in ("happy", "sad"):  # the rows' cue fields differ; the fit must not
        p, y = arbiter_inputs(rows(cues), by_id, names)
        torch.testing.assert_close(y, labels)
        fits.append(fit_arbiter(p, y, ArbiterConfig(reward="head", state="rich")))
    np.testing.assert_array_equal(fits[0].policy.A, fits[1].policy.A)
    np.testing.assert_array_equal(fits[0].policy.b, fits[1].policy.b)
    # and the label does matter
    other = fit_arbiter(probs, (labels + 1) % 6, ArbiterConfig(reward="head", state="rich"))
    assert not np.array_equal(other.policy.b, fits[0].policy.b)


def test_arbiter_learns_which_path_to_trust_and_round_trips_as_json(tmp_path):
    # fused is right on "consistent" samples, audio on the rest; the state reveals which (JS fused-audio)
    n, C = 200, 6
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, C, (n,), generator=g)
    conflict = torch.rand(n, generator=g) < 0.4
    wrong = (y + 1) % C

    def onehot_soft(c: torch.Tensor) -> torch.Tensor:
        return torch.softmax(4.0 * torch.nn.functional.one_hot(c, C).double(), -1)

    probs = {
        "fused": onehot_soft(torch.where(conflict, wrong, y)),
        "audio": onehot_soft(y),
        "text": onehot_soft(wrong),
        "video": onehot_soft(torch.where(conflict, wrong, y)),
    }
    arbiter = dataclasses.replace(
        fit_arbiter(probs, y, ArbiterConfig(reward="head", state="rich", feedback="bandit", epochs=5)), labels=tuple(MER2023_LABELS)
    )
    arms = arbiter.select(probs)
    acc = sum(probs[a][i].argmax() == y[i] for i, a in enumerate(arms)) / n
    assert acc > 0.95 and "audio" in arms
    path = save_arbiter(arbiter, tmp_path / "arbiter.json")
    data = json.loads(path.read_text())  # plain JSON, never pickle
    assert data["arms"] == list(ARMS) and data["labels"] == list(MER2023_LABELS)
    loaded = load_arbiter(path, MER2023_LABELS)
    assert loaded.select(probs) == arms
    with pytest.raises(ValueError, match="fit on labels"):
        load_arbiter(path, ["a", "b", "c", "d", "e", "f"])
    with_path, chosen = add_arbiter_path(loaded, probs)
    assert chosen == arms
    for i, a in enumerate(arms):
        torch.testing.assert_close(with_path["arbiter"][i], probs[a][i])


def test_held_out_check_refuses_training_data(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("x\n")
    (tmp_path / "link.jsonl").symlink_to(train)
    with pytest.raises(ValueError, match="is the run's training data"):
        check_held_out(train, ["a"], train, ["b"])
    with pytest.raises(ValueError, match="is the run's training data"):
        check_held_out(tmp_path / "link.jsonl", ["a"], train, ["b"])
    with pytest.raises(ValueError, match="1 of 2 sample ids are in the run's training data"):
        check_held_out(tmp_path / "dev.jsonl", ["a", "c"], train, ["a", "b"])
    check_held_out(tmp_path / "dev.jsonl", ["c", "d"], train, ["a", "b"])


# ---------------------------------------------------------------------------------------------- report
def test_fuse_or_drop_report_hand_computed():
    y = ["happy", "sad", "angry", "happy"]
    preds = {
        "fused": ["happy", "happy", "angry", "sad"],
        "text": ["sad", "sad", "sad", "sad"],
        "audio": ["happy", "sad", "happy", "sad"],
        "video": ["sad", "happy", "happy", "happy"],
    }
    subsets = ["consistent", "audio_aligned", "consistent", "video_aligned"]
    arms = ["fused", "audio", "text", "video"]
    rep = fuse_or_drop_report(y, preds, subsets, arms)
    assert rep["best_single"] == "audio"  # audio 2/4, text 1/4, video 1/4
    assert list(rep["subsets"]) == ["all", "consistent", "video_aligned", "audio_aligned"]
    overall = rep["subsets"]["all"]
    assert overall["always_fuse"] == 0.5 and overall["best_single"] == 0.5 and overall["oracle"] == 1.0
    assert overall["arbiter"] == 0.75  # fused ok, audio ok, text wrong, video ok
    assert overall["arm_share"] == {"fused": 0.25, "text": 0.25, "audio": 0.25, "video": 0.25}
    assert rep["subsets"]["audio_aligned"] == {
        "n": 1,
        "always_fuse": 0.0,
        "best_single": 1.0,
        "oracle": 1.0,
        "per_path": {"fused": 0.0, "text": 1.0, "audio": 1.0, "video": 0.0},
        "arbiter": 1.0,
        "arm_share": {"fused": 0.0, "text": 0.0, "audio": 1.0, "video": 0.0},
    }
    with pytest.raises(ValueError, match="missing"):
        fuse_or_drop_report(y, {"fused": y}, subsets)
    with pytest.raises(ValueError, match="not arms"):
        fuse_or_drop_report(y, preds, subsets, ["fused", "both", "text", "text"])


def test_dcr_config_errors_are_reported_together(tiny_backbone_dir):
    with pytest.raises(ConfigError) as err:
        cfg_for(
            tiny_backbone_dir,
            "dcr.schedule=later",
            "dcr.afd_temperature=0",
            "dcr.arbiter.feedback=partial",
            "dcr.arbiter.alpah=1",
        )
    text = str(err.value)
    for part in (
        "dcr.schedule",
        "dcr.afd_temperature",
        "dcr.arbiter.feedback",
        "did you mean 'dcr.arbiter.alpha'",
    ):
        assert part in text, part


def test_answer_reward_judges_each_arm_by_its_own_answer():
    """reward=answer: an arm's correctness is its generated answer's (-1 = no label), the calibration term
    still its head's; without every arm's answers it refuses; cross-fitting hands each fold its answers."""
    probs, labels = random_probs(30), torch.randint(0, 6, (30,), generator=torch.Generator().manual_seed(4))
    answers = {a: torch.where(torch.arange(30) % (k + 2) == 0, labels, -1) for k, a in enumerate(ARMS)}
    cfg = ArbiterConfig(reward="answer", state="rich", calibration_weight=0.5)
    head = arm_rewards(probs, labels, dataclasses.replace(cfg, reward="head"))
    r = arm_rewards(probs, labels, cfg, answers)
    for k, a in enumerate(ARMS):
        head_right = (probs[a].argmax(-1) == labels).double()
        answer_right = (answers[a] == labels).double()
        torch.testing.assert_close(r[:, k] - answer_right, head[:, k] - head_right)  # same calibration term
    with pytest.raises(ValueError, match="reward=answer needs the answer of every arm"):
        fit_arbiter(probs, labels, cfg)
    with pytest.raises(ValueError, match="reward=answer needs"):
        fit_arbiter(probs, labels, cfg, {a: answers[a] for a in ARMS[:2]})
    arms, folds = crossfit_select(probs, labels, dataclasses.replace(cfg, folds=3), answers)
    for k in np.unique(folds):
        held = torch.as_tensor(folds == k)
        fold = fit_arbiter({a: p[~held] for a, p in probs.items()}, labels[~held], cfg,
                           {a: v[~held] for a, v in answers.items()})
        assert fold.select({a: p[held] for a, p in probs.items()}) == [arms[i] for i in np.flatnonzero(folds == k)]
    with pytest.raises(ConfigError, match="dcr.arbiter.reward=answer judges each arm"):
        load_config(None, ["dcr.arbiter.answer=fused"])
    assert load_config(None, ["dcr.arbiter.answer=fused", "dcr.arbiter.reward=head"]).dcr.arbiter.answer == "fused"


def test_fuse_margin_keeps_fusion_on_near_ties():
    probs, labels = random_probs(40), torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(5))
    cfg = ArbiterConfig(reward="head", state="rich")
    plain = fit_arbiter(probs, labels, cfg)
    scores = plain.policy.expected(build_state(probs, cfg.state).numpy())
    gap = scores.max(axis=1) - scores[:, 0]  # how far the best arm beats fused
    margin = float(np.median(gap[gap > 0]))
    kept = dataclasses.replace(plain, config=dataclasses.replace(cfg, fuse_margin=margin)).select(probs)
    for i, (a, b) in enumerate(zip(plain.select(probs), kept, strict=True)):
        assert b == ("fused" if gap[i] <= margin else a)
