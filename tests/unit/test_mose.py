"""MoSE (both backbone families): routing by modality, LoRA parity, regularizers, scoped hooks, checkpointing,
save/load, generate."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from mllm_mer.adapters.mose import MoSEConfig
from mllm_mer.adapters.mose.layer import MoSELinear, RoutingRecord, TokenPlan, route
from mllm_mer.adapters.mose.model import (
    MOSE_WEIGHTS,
    GateStatsMean,
    answer_logprob,
    apply_mose,
    bound_modalities,
    decision_balance_loss,
    flatten_gate_stats,
    load_balance_loss,
    modality_balance_loss,
    mose_aux_losses,
    mose_layers,
)
from mllm_mer.backbone import load_backbone
from mllm_mer.config import LM_TARGETS, ConfigError, load_config, save_config
from mllm_mer.data.collate import MerCollator
from mllm_mer.data.dataset import DecodeOptions, MerDataset, build_media_dataset
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.schema import MER2023_LABELS, Modality
from mllm_mer.model import build_mer_model
from mllm_mer.prompts import load_prompt
from mllm_mer.trainable import apply_trainable, part_of
from mllm_mer.training.run_dir import save_final

TEXT, AUDIO, VIDEO = int(Modality.TEXT), int(Modality.AUDIO), int(Modality.VIDEO)
ROUTINGS = ("soft", "top_k", "top1_st")


def cfg_for(tiny_backbone_dir, *overrides):
    base = [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl", "adapter=mose"]
    return load_config(None, [*base, *overrides])


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Give every MoSE parameter random values (a 'trained' adapter whose effect is visible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".mose_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def batches(tiny_backbone_dir, syn_dir, tmp_path_factory):
    """A training batch (right padding, answers) and an inference batch (left padding) of 2 clips."""
    bb = load_backbone(tiny_backbone_dir)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:2]
    opts = DecodeOptions(fps=4.0, max_frames=32, sample_rate=16000, max_audio_seconds=30)
    mds = MerDataset(samples, build_media_dataset(samples, opts, tmp_path_factory.mktemp("c")), opts)
    args = (bb.processor, bb.token_ids, load_prompt("explain"), load_prompt("system", kind="free").text,
            MER2023_LABELS)
    train = MerCollator(*args)([mds[0], mds[1]])
    infer = MerCollator(*args, train=False)([mds[0], mds[1]])
    return train, infer


def layer(routing: str = "soft", experts: int = 3, **kw) -> MoSELinear:
    torch.manual_seed(0)
    base = nn.Linear(16, 12).requires_grad_(False)
    cfg = MoSEConfig(r=4, experts=experts, routing=routing, dropout=0.0, gate_init_scale=2.0,
                     **kw)
    mose = MoSELinear(base, cfg)
    randomize(mose)
    return mose


# --------------------------------------------------------------------------------------------- config
def test_config_defaults_and_errors():
    assert MoSEConfig().target_modules == LM_TARGETS  # written out in mose/config.py (import cycle)
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["data.train=x", "mose.routing=top_k", "mose.top_k=5", "mose.r=0",
                           "mose.routing2=1"])
    msg = str(exc.value)
    assert "mose.top_k=5" in msg and "mose.r=0" in msg and "'mose.routing2'" in msg
    with pytest.raises(ConfigError, match=r"mose.routing='hard' is not allowed"):
        load_config(None, ["data.train=x", "mose.routing=hard"])


# ---------------------------------------------------------------------------------------------- layer
def test_fresh_layer_is_a_noop_and_refuses_to_run_unbound():
    base = nn.Linear(16, 12)
    mose = MoSELinear(base, MoSEConfig(experts=2))
    x = torch.randn(2, 5, 16)
    tm = torch.tensor([[0, 1, 1, 2, 0], [2, 2, 0, 1, 0]])
    torch.testing.assert_close(mose(x, token_modality=tm), base(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="bound_modalities"):
        mose(x)
    with pytest.raises(TypeError, match="nn.Linear"):
        MoSELinear(nn.Conv1d(2, 2, 1), MoSEConfig())


@pytest.mark.parametrize("routing", ROUTINGS)
def test_token_uses_only_its_modality_experts(routing):
    mose = layer(routing, top_k=2)
    x = torch.randn(2, 6, 16)
    tm = torch.tensor([[0, 1, 2, 1, 0, 2], [2, 2, 1, 0, 0, 1]])
    ref = mose(x, token_modality=tm).detach()
    for m in (TEXT, AUDIO, VIDEO):  # changing modality m's experts moves only m's tokens
        with torch.no_grad():
            mose.mose_B[m].add_(1.0)
            if mose.mose_gate is not None:
                mose.mose_gate[m].mul_(-1.0)
            mose.mose_modality_logit[m].add_(0.5)
        out = mose(x, token_modality=tm).detach()
        torch.testing.assert_close(out[tm != m], ref[tm != m], rtol=0, atol=0)
        assert (out[tm == m] - ref[tm == m]).abs().max() > 1e-3
        ref = out
    # gradients from audio tokens reach the shared A and audio's parameters only
    mose.zero_grad()
    out = mose(x, token_modality=tm)
    out[tm == AUDIO].pow(2).sum().backward()
    assert mose.mose_A.grad.abs().sum() > 0
    for name in ("mose_B", "mose_gate", "mose_modality_logit"):
        grad = getattr(mose, name).grad
        assert grad[AUDIO].abs().sum() > 0, name
        assert grad[TEXT].abs().sum() == 0 and grad[VIDEO].abs().sum() == 0, name
    assert mose.base_layer.weight.grad is None


def test_sample_gate_weighs_audio_against_video_per_sample():
    torch.manual_seed(0)
    cfg = MoSEConfig(r=4, experts=2, routing="soft", dropout=0.0)
    gated = MoSELinear(nn.Linear(16, 12).requires_grad_(False), cfg)
    assert gated.mose_sample_gate.shape == (2, 32) and gated.mose_sample_gate.abs().sum() == 0  # w = 1 at start
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (gated.mose_B, gated.mose_gate, gated.mose_modality_logit, gated.mose_sample_gate):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    plain = MoSELinear(gated.base_layer, MoSEConfig(r=4, experts=2, routing="soft", dropout=0.0, sample_gate=False))
    assert plain.mose_sample_gate is None
    with torch.no_grad():
        for name in ("mose_A", "mose_B", "mose_gate", "mose_modality_logit"):
            getattr(plain, name).copy_(getattr(gated, name))
    x = torch.randn(2, 6, 16)
    x[1, [1, 3]] += 3.0  # sample 1's audio differs
    tm = torch.tensor([[0, 1, 2, 1, 0, 2], [0, 1, 2, 1, 0, 2]])
    base = gated.base_layer(x)
    d_gated, d_plain = gated(x, token_modality=tm) - base, plain(x, token_modality=tm) - base
    w = gated.sample_weights(x, tm)  # (B, 3): 1, w_a, w_v
    assert torch.equal(w[:, 0], torch.ones(2)) and torch.allclose(w[:, 1] + w[:, 2], torch.full((2,), 2.0))
    assert (w[0] - w[1]).abs().max() > 1e-2  # a per-sample decision, not one scalar for every clip
    expected = d_plain * w.gather(1, tm)[..., None]  # each token's delta scaled by its sample's gate
    torch.testing.assert_close(d_gated, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_gated[tm == TEXT], d_plain[tm == TEXT], rtol=0, atol=0)  # text: not gated
    with torch.no_grad():  # zero gate: exactly the layer without it
        gated.mose_sample_gate.zero_()
    torch.testing.assert_close(gated(x, token_modality=tm), plain(x, token_modality=tm), rtol=0, atol=0)



def per_token_reference(mose: MoSELinear, x: torch.Tensor, tm: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The layer docstring's formula token by token (dense, no sorting, no dropout): output, record fields."""
    B, M = x.shape[0], len(Modality)
    h = x @ mose.mose_A.T  # (B,T,r)
    if mose.mose_gate is None:
        probs = torch.ones(*tm.shape, 1)
    else:
        probs = torch.einsum("btd,bted->bte", x, mose.mose_gate[tm]).softmax(-1)
    weights = route(probs, mose.routing, mose.top_k)
    w = 2 * torch.sigmoid(mose.mose_modality_logit) if mose.mose_modality_logit is not None else torch.ones(M)
    sample = torch.ones(B, M)
    if mose.mose_sample_gate is not None:
        means = [(x * (tm == m)[..., None]).sum(1) / (tm == m).sum(1, keepdim=True).clamp_min(1) for m in (AUDIO, VIDEO)]
        sample = torch.cat([torch.ones(B, 1), 2 * torch.softmax(torch.cat(means, -1) @ mose.mose_sample_gate.T, -1)], -1)
    coef = w[tm] * sample.gather(1, tm)  # (B,T)
    delta = mose.scaling * coef[..., None] * torch.einsum("bte,bteor,btr->bto", weights, mose.mose_B[tm], h)
    onehot = torch.nn.functional.one_hot(tm, M).float()
    denom = onehot.sum((0, 1)).clamp_min(1)
    top1 = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).float()
    record = {
        "tokens": onehot.sum((0, 1)),
        "gate_mass": torch.einsum("btm,bte->me", onehot, probs) / denom[:, None],
        "expert_usage": torch.einsum("btm,bte->me", onehot, top1) / denom[:, None],
        "contribution": torch.einsum("btm,bt->m", onehot, delta.pow(2).sum(-1)) / denom,
        "modality_weights": w,
        "sample_gate": sample.mean(0),
    }
    return mose.base_layer(x) + delta, record


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize(("experts", "r", "d_out", "sample_gate"),
                         [(3, 4, 12, True), (3, 4, 12, False), (1, 4, 12, True), (2, 2, 20, True)])
def test_layer_matches_the_per_token_formula(routing, experts, r, d_out, sample_gate):
    """The sorted, grouped computation gives the formula's output, records and gradients (d_out > (E r)^2:
    the records' other branch)."""
    torch.manual_seed(0)
    cfg = MoSEConfig(r=r, experts=experts, routing=routing, top_k=min(2, experts), dropout=0.0,
                     sample_gate=sample_gate)
    mose = MoSELinear(nn.Linear(16, d_out).requires_grad_(False), cfg)
    randomize(mose)
    tm = torch.tensor([[0, 1, 2, 1, 0, 2, 0], [2, 2, 0, 0, 0, 2, 2]])  # sample 1 has no audio
    x = torch.randn(2, 7, 16, requires_grad=True)
    weights = torch.randn(2, 7, d_out)
    results = []
    for run in ("layer", "reference"):
        mose.zero_grad()
        x.grad = None
        if run == "layer":
            records = []
            out = mose(x, token_modality=tm, mose_records=records)
            record = {k: getattr(records[0], k) for k in ("tokens", "gate_mass", "expert_usage", "contribution",
                                                         "modality_weights", "sample_gate")}
        else:
            out, record = per_token_reference(mose, x, tm)
        ((out * weights).sum() + record["gate_mass"].pow(2).sum() + record["contribution"].sum()).backward()
        grads = {n: p.grad.clone() for n, p in mose.named_parameters() if p.requires_grad}
        results.append((out.detach(), {k: v.detach() for k, v in record.items()}, grads, x.grad.clone()))
    (out_a, rec_a, grads_a, gx_a), (out_b, rec_b, grads_b, gx_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    for k in rec_b:
        torch.testing.assert_close(rec_a[k], rec_b[k], rtol=1e-5, atol=1e-5, msg=k)
    assert set(grads_a) == set(grads_b)
    for n in grads_b:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(gx_a, gx_b, rtol=1e-4, atol=1e-5)


def test_layers_reading_one_input_share_its_cast_and_means_with_identical_results():
    """q, k, v read the same tensor: with one plan they share its media means (and its cast); outputs and
    every gradient equal those of separate plans, and of the same values passed as different tensors."""
    torch.manual_seed(0)
    cfg = MoSEConfig(r=4, experts=3, dropout=0.0)
    layers = [MoSELinear(nn.Linear(16, d).requires_grad_(False), cfg) for d in (12, 8, 8)]
    for i, m in enumerate(layers):
        randomize(m, seed=i)
    params = [p for m in layers for p in m.parameters() if p.requires_grad]
    tm = torch.tensor([[0, 1, 2, 1, 0, 2, 0], [2, 2, 0, 1, 0, 2, 1]])
    x0 = torch.randn(2, 7, 16, requires_grad=True)
    weights = [torch.randn(2, 7, m.out_features) for m in layers]

    def run(shared_plan: bool, same_tensor: bool):
        for p in params:
            p.grad = None
        x0.grad = None
        x = x0 * 1.0  # a non-leaf input, as a decoder layer's normed hidden states
        inputs = [x if same_tensor else x.clone() for _ in layers]
        plan = TokenPlan(tm)
        records = []
        outs = [m(i, token_modality=tm, mose_plan=plan if shared_plan else TokenPlan(tm), mose_records=records)
                for m, i in zip(layers, inputs, strict=True)]
        loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
        loss = loss + sum(r.contribution.sum() + r.gate_mass.pow(2).sum() for r in records)
        loss.backward()
        return [o.detach() for o in outs], [p.grad.clone() for p in params], x0.grad.clone(), plan

    shared = run(shared_plan=True, same_tensor=True)
    for other in (run(shared_plan=False, same_tensor=True), run(shared_plan=True, same_tensor=False)):
        for a, b in zip(shared[0] + shared[1] + [shared[2]], other[0] + other[1] + [other[2]], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    plan = TokenPlan(tm)
    x = x0 * 1.0
    means = plan.media_means(x)
    assert plan.media_means(x) is means  # computed once for the layers that read x
    assert plan.media_means(x.clone()) is not means  # another tensor: computed for it
    y = x0.detach() * 1.0
    stale = plan.media_means(y)
    y.add_(1.0)  # changed in place: recomputed
    torch.testing.assert_close(plan.media_means(y), stale + 1.0)
    with torch.no_grad():  # another grad mode: computed without a graph
        assert not plan.media_means(x).requires_grad
    assert plan.media_means(x).requires_grad
    with torch.inference_mode():  # inference tensors have no version counter: computed per call, not shared
        xi = x0.detach() * 1.0
        assert torch.equal(plan.media_means(xi), plan.media_means(xi))
        plan_i = TokenPlan(tm)
        for m, expected in zip(layers, shared[0], strict=True):
            torch.testing.assert_close(m(xi, token_modality=tm, mose_plan=plan_i), expected, rtol=1e-6, atol=1e-6)
    half = x.detach().to(torch.bfloat16)
    assert plan.cast(half, torch.float32) is plan.cast(half, torch.float32)
    assert torch.equal(plan.cast(half, torch.float32), half.float()) and plan.cast(x, torch.float32) is x

def test_decision_balance_loss_hand_computed():
    full = torch.tensor([-1.0, -2.0, -0.5])
    without = {"audio": torch.tensor([-3.0, -2.0, -0.5]), "video": torch.tensor([-1.5, -2.5, -9.0])}
    present = {"audio": torch.tensor([True, True, True]), "video": torch.tensor([True, True, False])}
    loss, d = decision_balance_loss(full, without, present)
    # D_a = (2 + 0 + 0) / 3, D_v = (0.5 + 0.5) / 2 (sample 2 has no video)
    torch.testing.assert_close(d, torch.tensor([2 / 3, 0.5]))
    assert float(loss) == pytest.approx(((2 / 3 - 0.5) / (2 / 3 + 0.5)) ** 2, rel=1e-5)
    balanced, _ = decision_balance_loss(full, {"audio": full - 1, "video": full + 1}, present)
    assert float(balanced) == 0.0
    none_video = {"audio": present["audio"], "video": torch.zeros(3, dtype=torch.bool)}
    assert float(decision_balance_loss(full, without, none_video)[0]) == 0.0
    # answer log-probabilities: the mean over answer tokens (labels shifted by one)
    head = nn.Linear(4, 5, bias=False)
    hidden = torch.randn(2, 4, 4)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, -100, -100]])
    lp = answer_logprob(hidden, labels, head)
    logp = torch.log_softmax(head(hidden), -1)
    torch.testing.assert_close(lp, torch.stack([(logp[0, 1, 3] + logp[0, 2, 1]) / 2, logp[1, 0, 2]]))


def test_decision_balance_runs_the_batch_without_each_modality(tiny_dir, syn_dir, tmp_path):
    from tests.unit.test_architecture import train_batch

    cfg = load_config(None, [f"model.path={tiny_dir}", f"data.train={syn_dir / 'train.jsonl'}", "adapter=mose",
                             f"data.cache_dir={tmp_path / 'c'}", "mose.decision_balance_weight=0.5",
                             "dcr.enabled=true"])  # composes with DCR's sub-batches
    backbone = load_backbone(tiny_dir)
    torch.manual_seed(0)
    model = build_mer_model(backbone, cfg)
    apply_trainable(model, cfg)
    randomize(model, scale=0.05)
    batch = train_batch(backbone, cfg, syn_dir)
    masked = batch["mose_masked"]
    assert not (masked["audio"]["token_modality"] == AUDIO).any() and (masked["audio"]["token_modality"] == VIDEO).any()
    assert not (masked["video"]["token_modality"] == VIDEO).any() and (masked["video"]["token_modality"] == AUDIO).any()
    assert "paths" in batch and set(batch["paths"]) == {"text", "audio", "video"}
    out = model(batch)
    loss = out.aux_losses["mose_decision_balance"]
    assert 0 < float(loss) <= 1 and out.gate_stats["decision_change"].shape == (3,)
    assert model.aux_loss_weights["mose_decision_balance"] == 0.5
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".mose_" in n)
    # a training batch without the sub-batches is refused, not silently unregularised
    with pytest.raises(ValueError, match="mose_masked"):
        model({k: v for k, v in batch.items() if k != "mose_masked"})


def test_routing_weights():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]], requires_grad=True)
    torch.testing.assert_close(route(probs, "top_k", 2), torch.tensor([[0.5, 0.3, 0.0], [0.0, 0.2, 0.7]]))
    hard = route(probs, "top1_st")
    torch.testing.assert_close(hard, torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), rtol=0, atol=0)
    (hard * torch.tensor([1.0, 2.0, 3.0])).sum().backward()  # straight-through: gradient of the softmax
    torch.testing.assert_close(probs.grad, torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match="mose.routing"):
        route(probs, "noisy")


def test_one_expert_per_modality_equals_plain_lora(tiny_backbone_dir, batches):
    """experts=1 (the gate is fixed at 1) and w_m = 1: MoSE is LoRA with the same A and B (peft reference)."""
    train, _ = batches
    lora_cfg = load_config(None, [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl", "lora.dropout=0"])
    lora = build_mer_model(load_backbone(tiny_backbone_dir), lora_cfg)
    mose = build_mer_model(load_backbone(tiny_backbone_dir), cfg_for(tiny_backbone_dir, "mose.experts=1", "mose.dropout=0"))
    mose.fusion_head.load_state_dict(lora.fusion_head.state_dict())
    lora.eval()
    mose.eval()
    zero_b = lora(train).cls_logits["fused"].detach()
    torch.testing.assert_close(mose(train).cls_logits["fused"], zero_b, rtol=0, atol=0)  # fresh: both no-ops
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in mose.backbone.named_modules():
            if isinstance(module, MoSELinear):
                peft_layer = lora.backbone.base_model.model.get_submodule(name)
                b = torch.randn(module.out_features, module.r, generator=g)
                peft_layer.lora_B["default"].weight.copy_(b)
                module.mose_A.copy_(peft_layer.lora_A["default"].weight)
                module.mose_B.copy_(peft_layer.lora_B["default"].weight.expand_as(module.mose_B))
    a, b = lora(train), mose(train)
    torch.testing.assert_close(b.cls_logits["fused"], a.cls_logits["fused"], rtol=0, atol=1e-6)
    torch.testing.assert_close(b.lm_loss, a.lm_loss, rtol=0, atol=1e-6)
    assert (a.cls_logits["fused"] - zero_b).abs().max() > 1e-3  # the B's mattered


# --------------------------------------------------------------------------------------- regularizers
def test_regularizers_zero_exactly_at_balance_and_positive_away():
    E = 4
    u = torch.full((E,), 1.0 / E)
    assert load_balance_loss(u, u) == 0
    # balanced load from confident tokens: rotate (0.7, 0.1, 0.1, 0.1) over the experts
    probs = torch.stack([torch.roll(torch.tensor([0.7, 0.1, 0.1, 0.1]), i) for i in range(E)])
    usage = torch.nn.functional.one_hot(probs.argmax(-1), E).float().mean(0)
    assert load_balance_loss(usage, probs.mean(0)).abs() < 1e-7
    g = torch.Generator().manual_seed(0)
    f = torch.distributions.Dirichlet(torch.ones(E)).sample((500,))
    p = torch.distributions.Dirichlet(torch.ones(E)).sample((500,))
    assert (load_balance_loss(f, p) > 0).all() and (load_balance_loss(u.expand(500, E), p) > 0).all()
    # where the Switch loss alone goes negative, ours stays positive
    f_bad, p_bad = torch.tensor([0.9, 0.1]), torch.tensor([0.46, 0.54])
    assert 2 * (f_bad * p_bad).sum() - 1 < 0 < load_balance_loss(f_bad, p_bad)

    assert modality_balance_loss(torch.tensor(0.3), torch.tensor(0.3)) == 0
    assert modality_balance_loss(torch.tensor(0.0), torch.tensor(0.0)) == 0
    c = torch.rand(200, 2, generator=g) + 1e-3
    assert (modality_balance_loss(c[:, 0], c[:, 0] * 1.01) > 0).all()
    assert modality_balance_loss(torch.tensor(1.0), torch.tensor(0.0)) == pytest.approx(1.0)

    def record(contribution, tokens=(5.0, 3.0, 3.0)):
        return RoutingRecord(torch.tensor(tokens), u.expand(3, E), u.expand(3, E), torch.tensor(contribution),
                             torch.ones(3))

    aux = mose_aux_losses([record([0.1, 0.2, 0.2]), record([9.0, 0.5, 0.5])])
    assert aux["mose_load_balance"] == 0 and aux["mose_modality_balance"] == 0
    aux = mose_aux_losses([record([0.1, 0.4, 0.2])])
    assert aux["mose_modality_balance"] == pytest.approx((0.2 / 0.6) ** 2)
    assert mose_aux_losses([record([0.1, 0.4, 0.2], tokens=(5.0, 3.0, 0.0))])["mose_modality_balance"] == 0


# ---------------------------------------------------------------------------------- model integration
def test_apply_mose_targets_exactly_the_language_model_attention(tiny_backbone_dir):
    bb = load_backbone(tiny_backbone_dir)
    names = apply_mose(bb.model, MoSEConfig())
    expected = sorted(f"model.language_model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo")
    assert names == expected and len(mose_layers(bb.model)) == 8
    with pytest.raises(ValueError, match="already applied"):
        apply_mose(bb.model, MoSEConfig())
    with pytest.raises(ValueError, match="matches no module"):
        apply_mose(load_backbone(tiny_backbone_dir).model, MoSEConfig(target_modules=r".*nothing_here"))
    with pytest.raises(ValueError, match="outside the language model"):
        apply_mose(load_backbone(tiny_backbone_dir).model, MoSEConfig(target_modules=r".*self_attn\.(q_proj|v_proj)"))


def test_only_mose_and_heads_train(tiny_backbone_dir):
    cfg = cfg_for(tiny_backbone_dir)  # adapter=mose: no peft LoRA at all
    model = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
    counts = apply_trainable(model, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".mose_" in n or n.startswith("fusion_") for n in trainable)
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    assert "lora" not in counts and counts["mose"][0] == counts["mose"][1] > 0
    base_weight = "backbone.model.language_model.layers.0.self_attn.q_proj.base_layer.weight"
    assert part_of(base_weight) == "language_model"
    for part in ("language_model", "audio_tower", "audio_projector", "vision_tower", "vision_projector"):
        assert counts[part][0] == 0


def test_forward_reports_regularizers_gate_stats_and_loss(tiny_backbone_dir, batches):
    train, _ = batches
    cfg = cfg_for(tiny_backbone_dir, "mose.modality_balance_weight=0.5")
    model = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
    apply_trainable(model, cfg)
    randomize(model, scale=0.05)
    out = model(train)
    lb, mb = out.aux_losses["mose_load_balance"], out.aux_losses["mose_modality_balance"]
    assert lb > 0 and mb > 0  # random experts: neither balanced
    torch.testing.assert_close(out.loss, out.lm_loss + out.cls_loss + 0.01 * lb + 0.5 * mb)
    stats = out.gate_stats
    assert stats["expert_usage"].shape == (3, 4) and stats["modality_weights"].shape == (3,)
    tokens = train["token_modality"].flatten().bincount(minlength=3).float()
    torch.testing.assert_close(stats["tokens"], tokens)
    torch.testing.assert_close(stats["expert_usage"].sum(-1), torch.ones(3))
    torch.testing.assert_close(stats["delta_share"].sum(), torch.tensor(1.0))
    flat = flatten_gate_stats(stats)
    assert "audio/expert_usage/e3" in flat and "video/modality_weights" in flat
    mean = GateStatsMean()
    mean.add(stats)
    mean.add(stats)
    assert mean.summary()["steps"] == 2
    assert mean.summary()["audio"]["expert_usage"] == pytest.approx(stats["expert_usage"][AUDIO].tolist())
    out.loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n  # every expert gets a (maybe zero) grad: DDP-safe


def test_hooks_exist_only_inside_the_block(tiny_backbone_dir, batches):
    train, _ = batches
    model = build_mer_model(load_backbone(tiny_backbone_dir), cfg_for(tiny_backbone_dir))
    layers = mose_layers(model)
    with pytest.raises(RuntimeError, match="boom"), bound_modalities(model.backbone, train["token_modality"]):
        assert all(len(m._forward_pre_hooks) == 1 for m in layers)
        raise RuntimeError("boom")
    assert all(len(m._forward_pre_hooks) == 0 for m in layers)
    assert model.backbone._mose_binding is None
    model(train)
    assert all(len(m._forward_pre_hooks) == 0 for m in layers)
    with pytest.raises(RuntimeError, match="without token_modality"):
        model.backbone(input_ids=train["input_ids"][:, :8])


def test_gradient_checkpointing_gives_the_same_loss_and_grads(tiny_backbone_dir, batches):
    """Checkpointed layers recompute after the binding has exited; the context_fn re-binds them."""
    train, _ = batches
    results = []
    for gc in ("false", "true"):
        cfg = cfg_for(tiny_backbone_dir, f"train.gradient_checkpointing={gc}", "mose.dropout=0")
        torch.manual_seed(0)  # same heads in both models
        model = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
        apply_trainable(model, cfg)
        randomize(model, scale=0.05)
        model.train()
        out = model(train)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".mose_" in n}
        results.append((out.loss.detach(), grads))
        assert all(len(m._forward_pre_hooks) == 0 for m in mose_layers(model))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6)


def test_save_load_through_run_dir_gives_identical_outputs(tiny_backbone_dir, batches, tmp_path):
    train, infer = batches
    cfg = cfg_for(tiny_backbone_dir, f"train.output_dir={tmp_path}")
    model = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
    apply_trainable(model, cfg)
    randomize(model)
    model.eval()
    save_config(cfg, tmp_path / "config.yaml")
    save_final(Accelerator(cpu=True), model, cfg)
    assert (tmp_path / MOSE_WEIGHTS).is_file() and not (tmp_path / "adapter").exists()
    assert not (tmp_path / "trainable_base.safetensors").exists()
    loaded = build_mer_model(load_backbone(tiny_backbone_dir), cfg, run_dir=tmp_path)
    loaded.eval()
    for batch in (train, infer):
        a, b = loaded(batch).cls_logits["fused"], model(batch).cls_logits["fused"]
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bad = cfg_for(tiny_backbone_dir, "mose.experts=2")
    with pytest.raises(ValueError, match="shapes differ"):
        build_mer_model(load_backbone(tiny_backbone_dir), bad, run_dir=tmp_path)


def test_generate_with_kv_cache_matches_uncached(tiny_backbone_dir, batches):
    """Generated tokens are text: cached steps (1 new token) and uncached steps (whole sequence) agree."""
    _, infer = batches
    model = build_mer_model(load_backbone(tiny_backbone_dir), cfg_for(tiny_backbone_dir))
    randomize(model, scale=0.5)
    model.eval()
    inputs = {k: infer[k] for k in ("input_ids", "attention_mask", "input_features", "feature_attention_mask",
                                    "pixel_values_videos", "video_grid_thw", "video_second_per_grid")}
    kw = {"max_new_tokens": 6, "do_sample": False, "use_audio_in_video": infer["use_audio_in_video"],
          "pad_token_id": 0}
    with torch.no_grad(), model.backbone_scope(infer["token_modality"]):
        cached = model.backbone.generate(**inputs, use_cache=True, **kw)
        uncached = model.backbone.generate(**inputs, use_cache=False, **kw)
        beams = model.backbone.generate(**inputs, use_cache=True, num_beams=2, **kw)
    assert cached.shape[1] > infer["input_ids"].shape[1]
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    assert beams.shape[0] == 2
    assert all(len(m._forward_pre_hooks) == 0 for m in mose_layers(model))
