"""DCR reliability heads (predicted true-class probability per unimodal path, fitted in closed form after
training) and the arbiter state that reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator

from mllm_mer.backbone import load_backbone
from mllm_mer.config import ConfigError, load_config, load_run_config, save_config
from mllm_mer.fusion.dcr.ada import (
    ARMS,
    build_state,
    crossfit_select,
    feature_names,
    fit_arbiter,
    reliability_inputs,
)
from mllm_mer.fusion.dcr.config import PATHS, ArbiterConfig
from mllm_mer.fusion.dcr.paths import ReliabilityHead, path_reliability, reliability_name
from mllm_mer.fusion.dcr.reliability import fit_reliability, fit_ridge, ridge_loo, true_class_probability
from mllm_mer.model import build_mer_model
from mllm_mer.trainable import apply_trainable
from mllm_mer.training.loop import after_training
from tests.unit.test_dcr import cfg_for, items, path_collator, random_probs  # noqa: F401  (items: fixture)


def test_reliability_head_is_a_fixed_readout_until_fitted():
    head = ReliabilityHead(4)
    assert list(head.parameters()) == [] and not head.is_fitted  # nothing here trains by gradient
    hidden = torch.randn(3, 5, 4, requires_grad=True)
    tokens = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    prompt = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    f = head.features(hidden, tokens, prompt)
    assert f.shape == (3, 8) and not f.requires_grad  # detached: the path's representation is never moved
    torch.testing.assert_close(f[0], torch.cat([hidden[0, 1:3].mean(0), hidden[0, 3]]).detach())
    torch.testing.assert_close(f[2], torch.cat([torch.zeros(4), hidden[2, 1]]).detach())  # no modality tokens
    assert torch.equal(head(f), torch.full((3,), 0.5))
    mean, scale, weight = torch.randn(8), torch.rand(8) + 0.5, torch.randn(8)
    head.load_fit(mean, scale, weight, 0.3)
    assert head.is_fitted
    expected = (((f - mean) / scale) @ weight + 0.3).clamp(0, 1)
    torch.testing.assert_close(head(f), expected)
    assert ((head(f * 100) >= 0) & (head(f * 100) <= 1)).all()


def test_ridge_leave_one_out_residuals_equal_refitting_without_each_sample():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    alpha = 0.7
    w, loo = ridge_loo(x, y, alpha)
    design = np.c_[np.ones(12), x.numpy()]
    penalty = alpha * np.diag([0.0] + [1.0] * 5)  # the intercept is not penalized
    full = np.linalg.solve(design.T @ design + penalty, design.T @ y.numpy())
    np.testing.assert_allclose(w.numpy(), full[1:], rtol=1e-8)
    for i in range(12):
        keep = np.arange(12) != i
        beta = np.linalg.solve(design[keep].T @ design[keep] + penalty, design[keep].T @ y.numpy()[keep])
        assert float(loo[i]) == pytest.approx(float(y[i] - design[i] @ beta), rel=1e-8)


def test_fit_ridge_chooses_the_penalty_by_leave_one_out_error():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g) * torch.tensor([1.0, 10.0, 0.1, 1, 1, 1, 1, 1])
    x[:, 7] = 3.0  # a constant feature: kept at scale 1, weight 0
    signal = 0.5 + 0.1 * x[:, 1] / 10 - 0.2 * x[:, 2] / 0.1
    fit = fit_ridge(x, signal, alphas=(1e-3, 1.0, 1e3))
    assert fit.alpha == 1e-3 and fit.loo_mse < 1e-6 and fit.samples == 60
    pred = ((x.double() - fit.mean) / fit.scale) @ fit.weight + fit.bias
    torch.testing.assert_close(pred, signal.double(), atol=1e-3, rtol=0)
    assert fit.scale[7] == 1.0 and abs(float(fit.weight[7])) < 1e-12
    noise = torch.rand(60, generator=g)
    fit = fit_ridge(x, noise, alphas=(1e-3, 1.0, 1e3))  # nothing to learn: the strongest penalty wins
    assert fit.alpha == 1e3 and float(fit.weight.abs().max()) < 0.02


def test_true_class_probability_is_zero_for_unlabelled_samples():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    p = true_class_probability(logits, torch.tensor([1, -100]))
    torch.testing.assert_close(p, torch.tensor([torch.softmax(logits[0], -1)[1].item(), 0.0]))


def test_fit_after_training_sets_the_heads_and_exposes_them(tiny_backbone_dir, any_backbone, items):  # noqa: F811
    cfg = cfg_for(tiny_backbone_dir)
    assert cfg.dcr.reliability and "dcr_reliability" not in cfg.dcr.loss_weights  # no loss: a closed-form fit
    model = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
    counts = apply_trainable(model, cfg)
    assert sum(t for t, _ in counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = path_collator(any_backbone)(items)
    out = model(batch)
    assert path_reliability(out) is None and "reliability" not in (model.explain(out) or {})  # not fitted yet
    paths = out.parts["dcr"]
    assert {p: f.shape for p, f in paths.reliability_features.items()} == {
        p: (len(items), 2 * model.hidden_size) for p in PATHS}
    accelerator = Accelerator(cpu=True)
    model.train()
    summary = after_training(model, [batch, batch], accelerator, cfg)["dcr_reliability"]
    assert model.training  # the pass runs in eval mode and restores the mode
    assert sorted(summary) == sorted(PATHS)
    for path in PATHS:
        assert summary[path]["fitted"] and summary[path]["samples"] == 2 * len(items)
        head = getattr(model, reliability_name(path))
        assert head.is_fitted
        # the head is the ridge fit of p_path(y) on the pass's features (the model is deterministic in eval)
        model.eval()
        with torch.no_grad():
            again = model(batch).parts["dcr"]
        target = true_class_probability(again.logits[path], batch["class_id"])
        fit = fit_ridge(torch.cat([again.reliability_features[path]] * 2), torch.cat([target] * 2))
        expected = (((again.reliability_features[path].double() - fit.mean) / fit.scale) @ fit.weight + fit.bias)
        torch.testing.assert_close(again.reliability[path].double(), expected.clamp(0, 1), atol=1e-4, rtol=0)
    with torch.no_grad():
        out = model(batch)
    rel = path_reliability(out)
    assert rel.shape == (len(items), len(PATHS))
    rows = model.explain(out)["reliability"]
    torch.testing.assert_close(reliability_inputs([{"reliability": r} for r in rows]), rel.double())
    # saved with the heads: a model loaded from them gives the same reliabilities
    fresh = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
    fresh.load_state_dict(model.head_state_dict(), strict=False)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(path_reliability(fresh(batch)), rel)
    # off: no heads, no features, nothing fitted after training
    off = cfg_for(tiny_backbone_dir, "dcr.reliability=false", "dcr.arbiter.state=rich")
    bare = build_mer_model(load_backbone(tiny_backbone_dir), off)
    assert not any(k.startswith(reliability_name("audio")) for k in bare.state_dict())
    out = bare(batch)
    assert path_reliability(out) is None and not out.parts["dcr"].reliability_features
    assert after_training(bare, [batch], accelerator, off) == {}
    with pytest.raises(ValueError, match="dcr.reliability=true"):
        fit_reliability(bare, bare, [batch], accelerator)


def test_runs_saved_before_reliability_heads_load_without_them(tmp_path):
    cfg = load_config(None, ["dcr.enabled=true"])
    save_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "run_info.json").write_text("{}")
    assert load_run_config(tmp_path).dcr.reliability is True  # saved: kept
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del data["dcr"]["reliability"]
    data["dcr"]["arbiter"]["state"] = "rich"  # as saved before the heads existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    assert load_run_config(tmp_path).dcr.reliability is False  # an older run: trained without them
    assert load_run_config(tmp_path, ["dcr.reliability=true"]).dcr.reliability is True
    del data["dcr"]["arbiter"]["state"]  # older still: fitted its arbiter on the "rich" state
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    assert load_run_config(tmp_path).dcr.arbiter.state == "rich"


def test_the_reliable_state_needs_the_reliability_heads():
    assert load_config(None, ["dcr.enabled=true"]).dcr.arbiter.state == "reliable"  # the default
    with pytest.raises(ConfigError, match="dcr.arbiter.state=rich, or dcr.reliability=true"):
        load_config(None, ["dcr.enabled=true", "dcr.reliability=false"])
    assert load_config(None, ["dcr.enabled=true", "dcr.reliability=false", "dcr.arbiter.state=rich"])
    assert load_config(None, ["dcr.reliability=false"])  # DCR off: nothing reads the state


def test_reliable_state_adds_reliabilities_and_their_product_with_disagreement():
    probs = random_probs(5)
    rel = torch.rand(5, len(PATHS), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = build_state(probs, "reliable", rel)
    names = feature_names([str(c) for c in range(6)], "reliable")
    assert x.shape == (5, len(names)) == (5, 4 * 6 + 31) and names[-1] == "bias"
    rich = build_state(probs, "rich")
    torch.testing.assert_close(x[:, : rich.shape[1] - 1], rich[:, :-1])  # "rich" is a prefix
    disagree = 1 - (probs["audio"] * probs["video"]).sum(-1)
    for k, path in enumerate(PATHS):
        torch.testing.assert_close(x[:, names.index(f"reliability_{path}")], rel[:, k])
        torch.testing.assert_close(x[:, names.index(f"reliability_{path}_x_av_disagree")], rel[:, k] * disagree)
    with pytest.raises(ValueError, match="dcr.reliability=true"):
        build_state(probs, "reliable")
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        build_state(probs, "reliable", rel[:, :2])
    with pytest.raises(ValueError, match="lack 'reliability'"):
        reliability_inputs([{"reliability": {p: 0.5 for p in PATHS}}, {}])
    assert reliability_inputs([{}, {}]) is None


def test_arbiter_learns_to_drop_an_unreliable_modality_from_reliability_alone():
    # two kinds of disagreeing clips look the same in the paths' probabilities: in one the audio path is right,
    # in the other the video path; only the audio path's predicted reliability tells them apart
    n, C = 80, 6
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, C, (n,), generator=g)
    other = (y + 1 + torch.randint(0, C - 1, (n,), generator=g)) % C
    audio_right = torch.arange(n) % 2 == 0
    sure = lambda cls: torch.nn.functional.one_hot(cls, C).double() * 0.8 + 0.2 / C  # noqa: E731
    audio_cls, video_cls = torch.where(audio_right, y, other), torch.where(audio_right, other, y)
    probs = {"fused": sure(audio_cls), "text": torch.full((n, C), 1.0 / C, dtype=torch.float64),
             "audio": sure(audio_cls), "video": sure(video_cls)}
    rel = torch.stack([torch.full((n,), 0.2), torch.where(audio_right, 0.9, 0.1), torch.full((n,), 0.7)], 1)
    rel = rel.double() + 0.02 * torch.rand(n, 3, generator=g, dtype=torch.float64)
    cfg = ArbiterConfig(reward="head", state="rich", calibration_weight=0.0, folds=4)

    def accuracy(arms: list[str]) -> float:
        return sum(int(probs[a][i].argmax()) == int(y[i]) for i, a in enumerate(arms)) / n

    rich, _ = crossfit_select(probs, y, cfg)
    reliable, _ = crossfit_select(probs, y, ArbiterConfig(reward="head", calibration_weight=0.0, folds=4,
                                                          state="reliable"), reliability=rel)
    assert accuracy(rich) <= 0.6 and accuracy(reliable) >= 0.95
    arbiter = fit_arbiter(probs, y, ArbiterConfig(reward="head", state="reliable"), reliability=rel)
    assert set(arbiter.select(probs, rel)) <= set(ARMS)
