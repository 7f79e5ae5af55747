"""DnR (`mllm_mer.fusion.dnr`): objectives on hand-made tensors, pooling, stage gating, the plug-in's
no-op exactness (off, and on at initialisation), component ablation (MerModel tests on both backbone
families), and the evaluation report section."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eval.report import report_paths, write_report
from eval.tasks import EvalOptions, run_task
from mllm_mer.backbone import load_backbone
from mllm_mer.config import ConfigError, load_config
from mllm_mer.data.collate import MerCollator
from mllm_mer.data.dataset import DecodeOptions, MerDataset, build_media_dataset
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.fusion.dnr.model import (
    COMPONENTS,
    DIVIDE_PREFIX,
    DnRConfig,
    DnRHead,
    DnROutput,
    ablation_rows,
    component_ablation,
    grad_reverse,
    info_nce,
    pool_modalities,
    pull_loss,
    push_loss,
    synergy_loss,
)
from mllm_mer.model import build_mer_model
from mllm_mer.prompts import load_prompt
from mllm_mer.trainable import apply_trainable

# Zero-mean, mutually orthogonal columns over a batch of 4: per-feature Pearson correlations are exactly 0.
H = torch.tensor([[1.0, 1.0, -1.0, -1.0], [1.0, -1.0, 1.0, -1.0], [1.0, -1.0, -1.0, 1.0]])  # (3, B=4)


def cfg_for(tiny_backbone_dir, *overrides):
    return load_config(None, [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl", *overrides])


def hand_parts(u: torch.Tensor, r: torch.Tensor, s: torch.Tensor, modalities: int = 3) -> torch.Tensor:
    """(B,) vectors -> (B, M, 3, P=2) parts, the same in every modality, feature 1 = 2 x feature 0."""
    one = torch.stack([u, r, s], dim=1)[..., None] * torch.tensor([1.0, 2.0])  # (B, 3, 2)
    return one[:, None].expand(-1, modalities, -1, -1).clone()


def hidden_batch(B: int = 4, T: int = 6, D: int = 8, seed: int = 0):
    """Hand-made hidden states: tokens text, video, audio, text, text, text (prompt = all but the last)."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, D, generator=g),) * 2
    tm = torch.tensor([[0, 2, 1, 0, 0, 0]]).expand(B, -1)
    pm = torch.ones(B, T, dtype=torch.bool)
    pm[:, -1] = False
    return hidden, tm, pm


# ----------------------------------------------------------------------------------------------- config
def test_config_defaults_overrides_and_errors(tiny_backbone_dir):
    assert DnRConfig().problems() == [] and not cfg_for(tiny_backbone_dir).dnr.enabled
    cfg = cfg_for(tiny_backbone_dir, "dnr.enabled=true", "dnr.part_dim=16", "dnr.noise_sigmas=[0.3]")
    assert cfg.dnr.enabled and cfg.dnr.part_dim == 16 and cfg.dnr.noise_sigmas == (0.3,)
    assert cfg.dnr.loss_weights == {"dnr_push": 5.0, "dnr_pull": 0.5, "dnr_synergy": 0.5, "dnr_refine": 0.1}
    with pytest.raises(ConfigError, match="did you mean 'dnr.temperature'"):
        cfg_for(tiny_backbone_dir, "dnr.temprature=1")
    with pytest.raises(ConfigError) as err:
        bad = ("dnr.part_dim=1", "dnr.noise_sigmas=[]", "dnr.stage=divide", "dnr.refine_start_step=3",
               "dnr.divide_fraction=1.0")
        cfg_for(tiny_backbone_dir, *bad)
    text = str(err.value)
    assert "dnr.divide_fraction=1.0 is out of range (0, 1)" in text
    assert "dnr.part_dim=1" in text and "dnr.noise_sigmas" in text
    assert "only used with dnr.stage=joint" in text
    assert DnRConfig(enabled=True, stage="refine").frozen_prefixes() == (DIVIDE_PREFIX,)
    assert DnRConfig(enabled=True, stage="joint").frozen_prefixes() == ()


# ---------------------------------------------------------------------------------------------- pooling
def test_pool_modalities_hand_computed():
    hidden = torch.arange(2 * 6 * 2, dtype=torch.float32).view(2, 6, 2)
    tm = torch.tensor([[0, 2, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    pm = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    pooled, present = pool_modalities(hidden, tm, pm, "after_media")
    assert pooled.shape == (2, 3, 2) and present.tolist() == [[True, True, True], [True, False, False]]
    torch.testing.assert_close(pooled[0, 0], hidden[0, 3:5].mean(0))  # text after the last media token only
    torch.testing.assert_close(pooled[0, 1], hidden[0, 2])  # audio
    torch.testing.assert_close(pooled[0, 2], hidden[0, 1])  # video
    torch.testing.assert_close(pooled[1, 0], hidden[1, :4].mean(0))  # no media: all prompt text
    assert pooled[1, 1:].abs().sum() == 0  # absent modalities pool to zeros
    pooled_all, _ = pool_modalities(hidden, tm, pm, "all")
    torch.testing.assert_close(pooled_all[0, 0], hidden[0, [0, 3, 4]].mean(0))


# ----------------------------------------------------------------------------------------------- losses
def test_push_is_zero_for_decorrelated_and_one_for_identical_parts():
    present = torch.ones(4, 3, dtype=torch.bool)
    assert push_loss(hand_parts(H[0], H[1], H[2]), present).item() == pytest.approx(0.0, abs=1e-6)
    assert push_loss(hand_parts(H[0], H[0], H[0]), present).item() == pytest.approx(1.0, abs=1e-6)
    # anti-correlated counts as correlated (|corr|); one identical pair of three -> 1/3
    assert push_loss(hand_parts(H[0], -H[0], -H[0]), present).item() == pytest.approx(1.0, abs=1e-6)
    assert push_loss(hand_parts(H[0], H[0], H[2]), present).item() == pytest.approx(1 / 3, abs=1e-6)
    # an absent modality does not count: its (zeroed) rows are left out
    parts = hand_parts(H[0], H[1], H[2])
    parts[:, 1] = hand_parts(H[0], H[0], H[0])[:, 1]  # audio: identical parts
    assert push_loss(parts, present).item() == pytest.approx(1 / 3, abs=1e-6)
    present[:, 1] = False  # ... but audio is absent: its rows are left out
    assert push_loss(parts, present).item() == pytest.approx(0.0, abs=1e-6)


def test_pull_is_zero_for_identical_redundant_parts_and_one_for_decorrelated():
    present = torch.ones(4, 3, dtype=torch.bool)
    same = hand_parts(H[0], H[0], H[0])[:, :, 1]  # (B, 3, P): identical r in every modality
    assert pull_loss(same, present).item() == pytest.approx(0.0, abs=1e-6)
    decorrelated = torch.stack([H[0], H[1], H[2]], dim=1)[..., None].expand(-1, -1, 2)
    assert pull_loss(decorrelated, present).item() == pytest.approx(1.0, abs=1e-6)
    # a pair without 2 shared samples is skipped; with no pair left the loss is 0 but keeps its graph
    present[:, 1:] = False
    x = decorrelated.clone().requires_grad_(True)
    loss = pull_loss(x, present)
    assert loss.item() == 0.0 and loss.requires_grad


def test_synergy_margin_zero_when_joint_beats_singles_and_positive_otherwise():
    target = torch.tensor([0, 1, 2, 3])
    joint = F.one_hot(target, 6).float() * 30.0  # confident and right: CE ~ 0
    uniform = torch.zeros(3, 4, 6)  # CE = log 6 = 1.79 > margin
    assert synergy_loss(joint, uniform, target, margin=0.3).item() == pytest.approx(0.0, abs=1e-6)
    # the unimodal probes as good as the joint one: gap 0 -> loss = J + margin
    joint_soft = F.one_hot(target, 6).float() * 2.0
    ce = F.cross_entropy(joint_soft, target).item()
    singles = joint_soft.expand(3, -1, -1).clone().requires_grad_(True)
    loss = synergy_loss(joint_soft, singles, target, margin=0.3)
    assert loss.item() == pytest.approx(ce + 0.3, abs=1e-5)
    # the probes' own term has zero value but trains them toward the label (gradient of their CE)
    loss.backward()
    assert (singles.grad.gather(2, target.expand(3, -1)[..., None]) < 0).all()  # raise the target logit


def test_gradient_reversal():
    x = torch.ones(3, requires_grad=True)
    grad_reverse(x, 0.5).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), -0.5))


def test_info_nce_aligned_views_lower_than_shuffled():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=g)
    noisy = z + 0.05 * torch.randn(8, 16, generator=g)
    shuffled = noisy[torch.roll(torch.arange(8), 1)]
    aligned, wrong = info_nce(z, noisy, 0.7).item(), info_nce(z, shuffled, 0.7).item()
    assert aligned < math.log(8) < wrong
    assert info_nce(z, shuffled, 0.7).item() == pytest.approx(info_nce(shuffled, z, 0.7).item())  # symmetric


# ----------------------------------------------------------------------------------------------- module
def test_head_adds_exact_zero_at_init_and_zeroes_absent_modalities():
    torch.manual_seed(0)
    hidden, tm, pm = hidden_batch()
    tm = tm.clone()
    tm[2:, 2] = 0  # samples 2, 3 have no audio
    base = torch.randn(4, 6)
    pooled = torch.randn(4, 4, 8)
    logits_head = DnRHead(8, 6, DnRConfig(enabled=True, part_dim=4, head_input="logits"))
    assert torch.equal(logits_head(hidden, tm, pm, base).fused_logits, base)
    head = DnRHead(8, 6, DnRConfig(enabled=True, part_dim=4))  # head_input="features"
    with pytest.raises(ValueError, match="needs the fused head's pooled states"):
        head(hidden, tm, pm, base)
    out = head(hidden, tm, pm, base, pooled=pooled)
    assert torch.equal(out.fused_logits, base) and torch.equal(out.dnr_logits, torch.zeros(4, 6))
    assert out.parts.shape == (4, 3, 3, 4) and out.losses == {}  # no targets, no objectives
    assert out.present[:, 1].tolist() == [True, True, False, False]
    assert out.parts[2:, 1].abs().sum() == 0 and out.parts[:2, 1].abs().sum() > 0


def test_stage_gating_and_refine_never_reaches_the_divide_heads():
    hidden, tm, pm = hidden_batch()
    cid = torch.tensor([0, 1, 2, -100])
    torch.manual_seed(0)
    joint = DnRHead(8, 6, DnRConfig(enabled=True, part_dim=4, stage="joint", refine_start_step=3,
                                    head_input="logits")).train()
    assert set(joint(hidden, tm, pm, torch.zeros(4, 6), cid, train_step=2).losses) == {
        "dnr_push", "dnr_pull", "dnr_synergy"}
    out = joint(hidden, tm, pm, torch.zeros(4, 6), cid, train_step=3)
    assert set(out.losses) == {"dnr_push", "dnr_pull", "dnr_synergy", "dnr_refine"}
    out.losses["dnr_refine"].backward()
    for name, p in joint.named_parameters():
        reached = p.grad is not None and p.grad.abs().sum() > 0
        assert reached == name.startswith("recombine."), name  # Divide heads and classifier: no gradient
    joint.eval()  # Refine views are random: training only
    assert "dnr_refine" not in joint(hidden, tm, pm, torch.zeros(4, 6), cid, train_step=5).losses
    refine = DnRHead(8, 6, DnRConfig(enabled=True, part_dim=4, stage="refine", head_input="logits")).train()
    assert set(refine(hidden, tm, pm, torch.zeros(4, 6), cid).losses) == {"dnr_refine"}
    divide = DnRHead(8, 6, DnRConfig(enabled=True, part_dim=4, stage="divide", head_input="logits")).train()
    assert "dnr_refine" not in divide(hidden, tm, pm, torch.zeros(4, 6), cid, train_step=10).losses
    unlabelled = torch.full((4,), -100)
    assert divide(hidden, tm, pm, torch.zeros(4, 6), unlabelled).losses == {}


def test_phased_schedule_refines_from_the_divided_model():
    """Default stage "phased": Divide objectives until divide_fraction of the steps, then Refine on the same
    (divided) weights; the Divide heads are not re-initialised and get no Divide gradient afterwards."""
    hidden, tm, pm = hidden_batch()
    cid = torch.tensor([0, 1, 2, 3])
    pooled = torch.randn(4, 4, 8)
    torch.manual_seed(0)
    head = DnRHead(8, 6, DnRConfig(enabled=True, part_dim=4)).train()
    assert head.cfg.stage == "phased" and head.cfg.divide_fraction == 0.5
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    start = {k: v.clone() for k, v in head.divide.state_dict().items()}
    for step in range(5):  # Divide phase: steps 0-4 of 10
        out = head(hidden, tm, pm, torch.zeros(4, 6), cid, train_step=step, pooled=pooled, total_steps=10)
        assert set(out.losses) == {"dnr_push", "dnr_pull", "dnr_synergy"}
        opt.zero_grad()
        sum(out.losses.values()).backward()
        opt.step()
    divided = {k: v.clone() for k, v in head.divide.state_dict().items()}
    assert any(not torch.equal(start[k], divided[k]) for k in start)  # the Divide phase trained them
    out = head(hidden, tm, pm, torch.zeros(4, 6), cid, train_step=5, pooled=pooled, total_steps=10)
    assert set(out.losses) == {"dnr_synergy", "dnr_refine"} and float(out.losses["dnr_synergy"]) == 0.0
    # the Refine phase starts from the divided weights: its parts are the divided heads' parts
    with torch.no_grad():
        means, present = pool_modalities(hidden[head.cfg.layer], tm, pm, head.cfg.text_tokens)
        torch.testing.assert_close(out.parts, head.divide_parts(means, present))
    opt.zero_grad()
    sum(out.losses.values()).backward()
    for name, p in head.divide.named_parameters():  # no Divide objective reaches them any more
        assert p.grad is None or p.grad.abs().sum() == 0, name
    # without a known total (evaluation, a bare forward) a batch counts as Divide
    assert "dnr_push" in head(hidden, tm, pm, torch.zeros(4, 6), cid, train_step=9, pooled=pooled).losses


def test_feature_head_reads_the_representation_with_the_pooled_states():
    """head_input=features: once trained, the DnR logits depend on both z and the pooled states, jointly."""
    torch.manual_seed(0)
    head = DnRHead(8, 6, DnRConfig(enabled=True, part_dim=4))
    with torch.no_grad():
        for p in head.feature_head.parameters():
            p.normal_()
    hidden, tm, pm = hidden_batch()
    pooled = torch.randn(4, 4, 8)
    out = head(hidden, tm, pm, torch.zeros(4, 6), pooled=pooled)
    other_pooled = head(hidden, tm, pm, torch.zeros(4, 6), pooled=pooled + 1.0)
    other_hidden = head(tuple(h * 2.0 for h in hidden), tm, pm, torch.zeros(4, 6), pooled=pooled)
    assert not torch.allclose(out.dnr_logits, other_pooled.dnr_logits)
    assert not torch.allclose(out.dnr_logits, other_hidden.dnr_logits)
    assert "feature_head.hidden.weight" in dict(head.named_parameters()) and not hasattr(head, "classifier")


def test_views_mask_and_noise_the_right_parts():
    torch.manual_seed(0)
    parts = torch.randn(4, 3, 3, 2)
    present = torch.ones(4, 3, dtype=torch.bool)
    present[:, 1] = False  # no audio in this batch: no audio view
    parts[:, 1] = 0.0
    head = DnRHead(8, 6, DnRConfig(enabled=True, part_dim=2, noise_sigmas=(0.2, 0.1)))
    masked, noised = head.views(parts, present)
    assert len(masked) == 2 and len(noised) == 2
    assert torch.equal(masked[0][:, 0], parts[:, 0]) and masked[0][:, 1:].abs().sum() == 0  # text kept
    for view in noised:
        assert torch.equal(view[:, :, [0, 2]], parts[:, :, [0, 2]])  # u and s untouched
        assert not torch.equal(view[:, 0, 1], parts[:, 0, 1]) and view[:, 1].abs().sum() == 0
    drop = DnRHead(8, 6, DnRConfig(enabled=True, part_dim=2, view_mask="drop_one"))
    masked, _ = drop.views(parts, present)
    assert masked[0][:, 0].abs().sum() == 0 and torch.equal(masked[0][:, 2], parts[:, 2])


def test_component_ablation_hand_made():
    """Only text.unique feeds the classifier: ablating it moves the probabilities, other parts are inert."""
    head = DnRHead(4, 2, DnRConfig(enabled=True, part_dim=2, head_input="logits"))
    with torch.no_grad():
        head.recombine.weight.zero_()
        head.recombine.bias.zero_()
        head.recombine.weight[0, 0] = 1.0  # z_0 = gelu(text.unique[0])
        head.classifier.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
        head.classifier.bias.zero_()
    parts = torch.zeros(2, 3, 3, 2)
    parts[:, 0, 0, 0] = torch.tensor([2.0, -2.0])
    parts[:, 1:] = 1.0  # other parts present but unused
    base = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    dnr_logits = head.classify(parts)
    out = DnROutput(parts, torch.ones(2, 3, dtype=torch.bool), base, dnr_logits, base + dnr_logits)
    table = component_ablation(head, out)
    assert table["kl"].shape == table["delta_p"].shape == (2, 9) and table["pred"].tolist() == [0, 1]
    # sample 0: full logits [3 gelu(2), 1] -> ablated [0, 1]; KL and the drop of p(class 0) by hand
    g = 2.0 * 0.5 * (1 + math.erf(2.0 / math.sqrt(2)))
    p = torch.softmax(torch.tensor([3 * g, 1.0]), 0)
    q = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert table["kl"][0, 0].item() == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    assert table["delta_p"][0, 0].item() == pytest.approx(float(p[0] - q[0]), rel=1e-5)
    assert table["kl"][0, 1:].abs().max() == 0 and table["delta_p"][:, 1:].abs().max() == 0
    rows = ablation_rows(table)
    assert len(rows) == 2 and list(rows[0]) == list(COMPONENTS)
    kl00, dp00 = table["kl"][0, 0].item(), table["delta_p"][0, 0].item()
    assert rows[0]["text.unique"] == {"kl": kl00, "delta_p": dp00}
    # sample 1 predicts class 1; gelu(-2) < 0 lowers class 0, so the part supports the prediction too
    p1 = torch.softmax(torch.tensor([3 * (g - 2.0), 1.0]), 0)  # gelu(-2) = gelu(2) - 2 < 0
    assert rows[1]["text.unique"]["delta_p"] == pytest.approx(float(p1[1] - q[1]), rel=1e-4) and p1[1] > q[1]


# ------------------------------------------------------------------------------------------- MerModel
@pytest.fixture(scope="module")
def batch(tiny_backbone_dir, syn_dir, tmp_path_factory):
    bb = load_backbone(tiny_backbone_dir)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:3]
    opts = DecodeOptions(fps=4.0, max_frames=32, sample_rate=16000, max_audio_seconds=30)
    mds = MerDataset(samples, build_media_dataset(samples, opts, tmp_path_factory.mktemp("c")), opts)
    system = load_prompt("system", kind="free").text
    col = MerCollator(bb.processor, bb.token_ids, load_prompt("explain"), system, MER2023_LABELS)
    return col([mds[i] for i in range(3)])


def build(tiny_backbone_dir, *overrides):
    cfg = cfg_for(tiny_backbone_dir, *overrides)
    torch.manual_seed(0)
    model = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
    apply_trainable(model, cfg)
    return model, cfg


def test_plugin_off_and_on_at_init_leave_the_fused_logits_bitwise_unchanged(tiny_backbone_dir, batch):
    off, _ = build(tiny_backbone_dir)
    on, _ = build(tiny_backbone_dir, "dnr.enabled=true", "dnr.part_dim=8")
    assert not hasattr(off, "fusion_dnr") and not any(k.startswith("fusion_dnr") for k in off.state_dict())
    assert set(off.head_state_dict()) < set(on.head_state_dict())
    off.eval(), on.eval()
    with torch.no_grad():
        a, b = off(batch), on(batch)
    assert torch.equal(a.cls_logits["fused"], b.cls_logits["fused"])
    assert torch.equal(a.cls_loss, b.cls_loss) and torch.equal(a.lm_loss, b.lm_loss)
    assert "dnr" not in a.parts and not any(k.startswith("dnr_") for k in a.aux_losses)
    assert off.explain(a) == {} and len(on.explain(b)["dnr_ablation"]) == 3
    assert set(b.aux_losses) == {"dnr_push", "dnr_pull", "dnr_synergy"}  # eval mode: no Refine
    # the weighted DnR objectives are in the total loss
    w = on.aux_loss_weights
    expected = b.lm_loss + b.cls_loss + sum(w[k] * v for k, v in b.aux_losses.items())
    torch.testing.assert_close(b.loss, expected)


def test_training_forward_backward_and_refine_stage_freezes_divide(tiny_backbone_dir, batch):
    model, _ = build(tiny_backbone_dir, "dnr.enabled=true", "dnr.part_dim=8", "dnr.stage=joint")
    model.train()
    out = model({**batch, "train_step": 0})
    assert set(out.aux_losses) == {"dnr_push", "dnr_pull", "dnr_synergy", "dnr_refine"}
    out.loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    model, _ = build(tiny_backbone_dir, "dnr.enabled=true", "dnr.part_dim=8", "dnr.stage=refine")
    frozen = {n for n, p in model.named_parameters() if n.startswith("fusion_dnr") and not p.requires_grad}
    assert frozen and all(n.startswith(DIVIDE_PREFIX) for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters()
               if n.startswith("fusion_") and not n.startswith(DIVIDE_PREFIX))
    model.train()
    out = model(batch)
    assert set(out.aux_losses) == {"dnr_refine"}
    out.loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


# ------------------------------------------------------------------------------------------ reporting
def test_evaluation_report_renders_dnr_ablation(tmp_path: Path):
    def write(name: str, rows: list[dict]) -> Path:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    refs = [
        {"id": f"s{i}", "video": f"media/s{i}.mp4", "audio": None, "subtitle": "", "label": label,
         "explanation": "", "subset": "consistent", "cues": {}}
        for i, label in enumerate(["happy", "sad"])
    ]
    write("test.jsonl", refs)
    zero = {c: {"kl": 0.0, "delta_p": 0.0} for c in COMPONENTS}
    audio = [{"kl": 0.2, "delta_p": 0.1}, {"kl": 0.4, "delta_p": -0.1}]
    write("pred.jsonl", [
        {"id": f"s{i}", "label": "happy", "dnr_ablation": {**zero, "audio.unique": a}}
        for i, a in enumerate(audio)
    ])
    opts = EvalOptions(predictions=tmp_path / "pred.jsonl", references=tmp_path / "test.jsonl")
    result = run_task("synthetic", opts)
    assert result["dnr_ablation"]["n"] == 2 and list(result["dnr_ablation"]["components"]) == list(COMPONENTS)
    assert result["dnr_ablation"]["components"]["audio.unique"] == pytest.approx({"kl": 0.3, "delta_p": 0.0})
    write_report(result, tmp_path / "out.json")
    md = report_paths(tmp_path / "out.json")["markdown"].read_text()
    assert "## DnR component ablation (mean over 2 predictions)" in md and "| audio.unique | 0.3000 |" in md
    # rows without the field: no section; a malformed field is an error naming the line
    write("pred.jsonl", [{"id": r["id"], "label": "sad"} for r in refs])
    assert "dnr_ablation" not in run_task("synthetic", opts)
    write("pred.jsonl", [{"id": "s0", "label": "sad", "dnr_ablation": {"x": 1}}])
    with pytest.raises(ValueError, match="line 1: 'dnr_ablation'"):
        run_task("synthetic", opts)


def test_init_from_loads_divide_weights_and_refuses_mismatches(tmp_path: Path):
    from safetensors.torch import save_file

    from mllm_mer.fusion.dnr.model import load_divide_weights

    torch.manual_seed(0)
    source = DnRHead(8, 6, DnRConfig(enabled=True, part_dim=4))
    save_file({f"fusion_dnr.{k}": v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "heads.safetensors"))
    target = DnRHead(8, 6, DnRConfig(enabled=True, part_dim=4))
    recombine = target.recombine.weight.clone()
    assert load_divide_weights(target, tmp_path) == len(source.divide.state_dict())
    for k, v in source.divide.state_dict().items():
        assert torch.equal(target.divide.state_dict()[k], v)
    assert torch.equal(target.recombine.weight, recombine)  # only the Divide side is copied
    with pytest.raises(ValueError, match="dnr.part_dim"):
        load_divide_weights(DnRHead(8, 6, DnRConfig(enabled=True, part_dim=6)), tmp_path)
    with pytest.raises(FileNotFoundError, match="dnr.init_from"):
        load_divide_weights(target, tmp_path / "nowhere")
