"""Attention reallocation (AR): exact no-op when neutral, full restore on exit (also on error), shares move
toward the target at the targeted layers only, batch/padding invariance, KV-cache consistency, backend and
settings checks, and `ar.enabled` honoured by generation.generate_rows / predict_rows; on both backbone
families (the module's fixtures are parametrized over the tiny Qwen2.5-Omni and Qwen3-Omni twins)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch

from mllm_mer.attention import realloc
from mllm_mer.attention.config import ARConfig
from mllm_mer.attention.realloc import attention_reallocation, default_layers
from mllm_mer.attention.sample import sample_targets
from mllm_mer.attention.stats import attention_shares
from mllm_mer.backbone import load_backbone
from mllm_mer.config import ConfigError, load_config
from mllm_mer.data.collate import MerCollator
from mllm_mer.data.dataset import DecodeOptions, MerDataset, build_media_dataset
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.generation import (
    InferenceModel,
    generate_rows,
    generation_record,
    predict_rows,
)
from mllm_mer.model import build_mer_model
from mllm_mer.prompts import load_prompt

NOT_INPUTS = ("labels", "class_id", "token_modality", "prompt_mask")
STRONG = ARConfig(enabled=True, strength=0.8, target_audio_share=0.95, layers=(0, 1))


def model_inputs(batch: dict) -> dict:
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in NOT_INPUTS}
    return inputs | {"use_audio_in_video": batch["use_audio_in_video"]}


def forward(model, batch: dict, **kwargs):
    with torch.no_grad():
        return model(**model_inputs(batch), use_cache=False, **kwargs)


def generate(model, batch: dict, new_tokens: int = 4, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**model_inputs(batch), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, **kwargs)


@pytest.fixture(scope="module")
def sdpa(tiny_backbone_dir: Path):
    """A fresh backbone (sdpa) owned by this module: AR switches its attention back and forth."""
    return load_backbone(tiny_backbone_dir)


@pytest.fixture(scope="module")
def eager(tiny_backbone_dir: Path):
    """A fresh eager backbone: AR then also returns the weights, so `attention_shares` reads them."""
    return load_backbone(tiny_backbone_dir, attn_implementation="eager")


@pytest.fixture(scope="module")
def clips(sdpa, syn_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Collator + decoded items of 3 test clips; batches: audio+video (left-padded), audio only."""
    samples = read_jsonl(syn_dir / "test.jsonl", MER2023_LABELS)[:3]
    opts = DecodeOptions(fps=4.0, max_frames=32, sample_rate=16000, max_audio_seconds=30)
    mds = MerDataset(samples, build_media_dataset(samples, opts, tmp_path_factory.mktemp("dec")), opts)
    col = MerCollator(sdpa.processor, sdpa.token_ids, load_prompt("label"),
                      load_prompt("system", kind="free").text, MER2023_LABELS, train=False)
    items = [mds[i] for i in range(3)]
    av = col(items)
    assert not av["attention_mask"].bool().all(), "the tests want a batch with left padding"
    return {"col": col, "items": items, "samples": samples, "av": av,
            "audio": dataclasses.replace(col, use_video=False)(items)}


def targets_seen(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Record the per-sample targets (tau, alpha) each AR scope is entered with (None: fixed mode), in order."""
    from mllm_mer.attention import method as ar_method

    seen: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    real = ar_method.attention_reallocation

    def spy(model, token_modality, ar, sample_targets=None):
        seen.append(sample_targets)
        return real(model, token_modality, ar, sample_targets=sample_targets)

    monkeypatch.setattr(ar_method, "attention_reallocation", spy)
    return seen


def fix_reliabilities(mer, audio: float, video: float, text: float = 0.5) -> None:
    """Fit every path's reliability head to a constant (zero weights, bias = the value), marking it fitted."""
    from mllm_mer.fusion.dcr.paths import reliability_name

    width = mer.fusion_audio_reliability.weight.numel()
    for path, r in (("audio", audio), ("video", video), ("text", text)):
        getattr(mer, reliability_name(path)).load_fit(torch.zeros(width), torch.ones(width), torch.zeros(width), r)


def snapshot(model) -> dict:
    return {
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "impl": {key: getattr(model.config, key)._attn_implementation for key in model.config.sub_configs
                 if getattr(model.config, key, None) is not None} | {"": model.config._attn_implementation},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


# ------------------------------------------------------------------------------------------ neutral = no-op
def test_strength_zero_is_bitwise_identical(sdpa, clips):
    batch, model = clips["av"], sdpa.model
    ref_logits, ref_tokens = forward(model, batch).logits, generate(model, batch)
    with attention_reallocation(model, batch["token_modality"], dataclasses.replace(STRONG, strength=0.0)):
        assert model.config.text_config._attn_implementation == "mllm_mer_ar_sdpa"
        assert torch.equal(forward(model, batch).logits, ref_logits)
        assert torch.equal(generate(model, batch), ref_tokens)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_clip_without_video_keeps_its_attention(sdpa, eager, clips, backend):
    """Nothing to reallocate: the recomputed rows equal the backend's up to float rounding, and every real
    token before them is bitwise the backend's (left-padding positions are excluded: their outputs are
    meaningless and, with eager attention, may differ in the last bits when the batch's other rows change)."""
    batch, model = clips["audio"], {"sdpa": sdpa, "eager": eager}[backend].model
    ref = forward(model, batch, output_attentions=backend == "eager")
    with attention_reallocation(model, batch["token_modality"], STRONG):
        out = forward(model, batch, output_attentions=backend == "eager")
    real = batch["attention_mask"][:, :-1].bool()
    assert torch.equal(out.logits[:, :-1][real], ref.logits[:, :-1][real])
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    if backend == "eager":
        for a, b in zip(out.attentions, ref.attentions, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ restore on exit
@pytest.mark.parametrize("fail", [False, True], ids=["normal-exit", "exception"])
def test_model_is_restored_exactly_after_the_block(sdpa, clips, fail):
    batch, model = clips["av"], sdpa.model
    before = snapshot(model)
    ref_logits, ref_tokens = forward(model, batch).logits, generate(model, batch)
    try:
        with attention_reallocation(model, batch["token_modality"], STRONG):
            changed = forward(model, batch).logits
            generate(model, batch)
            if fail:
                raise KeyError("boom")
    except KeyError:
        assert fail
    assert not torch.equal(changed, ref_logits)  # AR was really on inside
    after = snapshot(model)
    assert after["impl"] == before["impl"] and after["impl"]["text_config"] == "sdpa"
    assert after["hooks"] == before["hooks"] == 0
    assert after["params"].keys() == before["params"].keys()
    assert all(torch.equal(after["params"][k], v) for k, v in before["params"].items())
    assert not realloc._SCOPES
    assert torch.equal(forward(model, batch).logits, ref_logits)
    assert torch.equal(generate(model, batch), ref_tokens)


def test_error_while_switching_on_leaves_nothing_behind(sdpa, clips, monkeypatch):
    model = sdpa.model
    calls = []

    def failing(self, implementation):
        calls.append(implementation)
        if len(calls) == 1:
            raise OSError("switch failed")
        return original(self, implementation)

    original = type(model).set_attn_implementation
    monkeypatch.setattr(type(model), "set_attn_implementation", failing)
    with pytest.raises(OSError), attention_reallocation(model, clips["av"]["token_modality"], STRONG):
        pass
    assert calls == [{"text_config": "mllm_mer_ar_sdpa"}, {"text_config": "sdpa"}]
    assert model.config.text_config._attn_implementation == "sdpa" and not realloc._SCOPES


# ------------------------------------------------------------------------------------------ the effect
@pytest.mark.parametrize("mode", ["probs", "scores"])
@pytest.mark.parametrize("target", [0.95, 0.05])
def test_audio_share_moves_toward_the_target_at_targeted_layers_only(eager, clips, mode, target):
    batch, model = clips["av"], eager.model
    cfg = ARConfig(strength=0.5, target_audio_share=target, layers=(1,), mode=mode)
    base = attention_shares(model, batch)["per_sample"]  # (B, L, 3) text / audio / video
    ref = forward(model, batch, output_hidden_states=True)
    with attention_reallocation(model, batch["token_modality"], cfg):
        moved = attention_shares(model, batch)["per_sample"]
        out = forward(model, batch, output_hidden_states=True)
    torch.testing.assert_close(moved[:, 0], base[:, 0], rtol=0, atol=0)  # layer 0 is not targeted
    av_share = lambda s: s[:, 1, 1] / (s[:, 1, 1] + s[:, 1, 2])  # noqa: E731  audio share of audio+video
    assert ((av_share(moved) - target).abs() < (av_share(base) - target).abs() - 0.02).all()
    if target > 0.5:
        assert (moved[:, 1, 1] > base[:, 1, 1]).all()  # more attention on audio ...
    else:
        assert (moved[:, 1, 2] > base[:, 1, 2]).all()  # ... or on video
    if mode == "probs":  # the text mass is kept; "scores" boosts the under-attended one at text's expense too
        torch.testing.assert_close(moved[:, 1, 0], base[:, 1, 0])
    # hidden states up to the first targeted layer are bitwise unchanged, the layer's output is not
    assert torch.equal(out.hidden_states[0], ref.hidden_states[0])
    assert torch.equal(out.hidden_states[1], ref.hidden_states[1])
    assert not torch.equal(out.hidden_states[2][:, -1], ref.hidden_states[2][:, -1])
    real = batch["attention_mask"].bool()
    real[:, -1] = False  # "generated" rows only: every other real position is unchanged
    assert torch.equal(out.hidden_states[2][real], ref.hidden_states[2][real])


@pytest.mark.parametrize("mode", ["probs", "scores"])
def test_each_row_follows_the_formula(sdpa, clips, mode):
    """One head, one row per sample: s' = s + strength * (target - s) for the audio share of audio+video."""
    batch, cfg = clips["av"], ARConfig(strength=0.3, target_audio_share=0.9, layers=(0,), heads=(2,), mode=mode)
    with attention_reallocation(sdpa.model, batch["token_modality"], cfg, record=True) as monitor:
        forward(sdpa.model, batch)
    (before, after), = monitor.shares().values()
    assert monitor.rows[0].tolist() == [1.0, 1.0, 1.0]
    s, s_new = before[:, 1] / before[:, 1:].sum(-1), after[:, 1] / after[:, 1:].sum(-1)
    torch.testing.assert_close(s_new, s + 0.3 * (0.9 - s))
    torch.testing.assert_close(after.sum(-1), torch.ones(3))
    if mode == "probs":
        torch.testing.assert_close(after[:, 0], before[:, 0])
    else:
        assert (after[:, 0] < before[:, 0]).all()


def test_query_all_also_changes_prompt_positions(sdpa, clips):
    batch = clips["av"]
    ref = forward(sdpa.model, batch, output_hidden_states=True).hidden_states[2]
    cfg = dataclasses.replace(STRONG, layers=(0,), query="all")
    with attention_reallocation(sdpa.model, batch["token_modality"], cfg):
        out = forward(sdpa.model, batch, output_hidden_states=True).hidden_states[2]
    real = batch["attention_mask"].bool()
    changed = (out - ref).abs().amax(-1)[real]
    assert (changed > 0).float().mean() > 0.5


# ------------------------------------------------------------------------------------------ batching, cache
def test_batch_with_left_padding_matches_each_sample_alone(sdpa, clips):
    batch, model = clips["av"], sdpa.model
    with attention_reallocation(model, batch["token_modality"], STRONG):
        logits = forward(model, batch).logits[:, -1]
        gen = generate(model, batch, output_logits=True, return_dict_in_generate=True)
    moved = (logits - forward(model, batch).logits[:, -1]).abs().amax()
    assert moved > 1e-3  # AR changes the result ...
    for i, item in enumerate(clips["items"]):
        alone = clips["col"]([item])
        with attention_reallocation(model, alone["token_modality"], STRONG):
            alone_logits = forward(model, alone).logits[0, -1]
            alone_gen = generate(model, alone, output_logits=True, return_dict_in_generate=True)
        torch.testing.assert_close(logits[i], alone_logits, rtol=0, atol=2e-5)  # ... the same way alone
        prompt_len = batch["input_ids"].shape[1]
        assert torch.equal(gen.sequences[i, prompt_len:], alone_gen.sequences[0, alone["input_ids"].shape[1]:])
        for step, alone_step in zip(gen.logits, alone_gen.logits, strict=True):
            torch.testing.assert_close(step[i], alone_step[0], rtol=0, atol=2e-5)


def test_cached_generation_equals_a_cache_free_forward(sdpa, clips):
    """With the KV cache, each new token's query is reallocated; a forward over prompt + generated tokens
    without cache ("generated" rows) must predict the same tokens."""
    batch, model = clips["av"], sdpa.model
    n = 4
    with attention_reallocation(model, batch["token_modality"], STRONG):
        gen = generate(model, batch, new_tokens=n, output_logits=True, return_dict_in_generate=True)
        full = dict(batch)
        full["input_ids"] = gen.sequences[:, :-1]
        full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(gen.sequences[:, -n:-1])], 1)
        logits = forward(model, full).logits[:, -n:]  # rows T-1 .. T+n-2 predict the n new tokens
    assert torch.equal(logits.argmax(-1), gen.sequences[:, -n:])
    torch.testing.assert_close(logits, torch.stack(gen.logits, dim=1), rtol=0, atol=2e-5)


def test_beam_search_expands_the_prompt_modality(sdpa, clips):
    batch = clips["av"]
    with attention_reallocation(sdpa.model, batch["token_modality"], STRONG):
        out = generate(sdpa.model, batch, new_tokens=2, num_beams=2)
    assert out.shape[0] == 3


# ------------------------------------------------------------------------------------------ checks
def test_flash_attention_backend_is_refused(sdpa, clips):
    text_config = sdpa.model.config.text_config
    text_config._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(RuntimeError, match="flash_attention_2.*never materialises"), \
                attention_reallocation(sdpa.model, clips["av"]["token_modality"], STRONG):
            pass
        assert text_config._attn_implementation == "flash_attention_2"
    finally:
        text_config._attn_implementation_internal = "sdpa"
    assert not realloc._SCOPES


def test_nesting_training_mode_and_bad_settings_are_refused(sdpa, clips):
    model, tm = sdpa.model, clips["av"]["token_modality"]
    with attention_reallocation(model, tm, STRONG):
        with pytest.raises(RuntimeError, match="already active"), attention_reallocation(model, tm, STRONG):
            pass
    model.train()
    try:
        with pytest.raises(RuntimeError, match="eval"), attention_reallocation(model, tm, STRONG):
            pass
    finally:
        model.eval()
    with pytest.raises(ValueError, match=r"ar.layers=\[5\]"), \
            attention_reallocation(model, tm, dataclasses.replace(STRONG, layers=(5,))):
        pass
    with pytest.raises(ValueError, match=r"ar.heads"), \
            attention_reallocation(model, tm, dataclasses.replace(STRONG, heads=(4,))):
        pass
    with pytest.raises(ValueError, match="token_modality"), attention_reallocation(model, tm.float(), STRONG):
        pass
    assert model.config.text_config._attn_implementation == "sdpa" and not realloc._SCOPES
    with attention_reallocation(model, tm[:2], STRONG), pytest.raises(RuntimeError, match="batch of 2 prompts"):
        forward(model, clips["av"])


def test_config_validation_and_defaults(tiny_backbone_dir):
    cfg = load_config(None, ["data.train=x.jsonl", "ar.enabled=true", "ar.layers=[-1]", "ar.mode=scores"])
    assert cfg.ar.enabled and cfg.ar.layers == (-1,) and cfg.ar.mode == "scores"
    assert load_config(None, ["data.train=x.jsonl"]).ar == ARConfig()
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.train=x.jsonl", "ar.strength=1.5", "ar.target_audio_share=0", "ar.heads=[-1]"])
    assert "ar.strength=1.5" in str(err.value) and "ar.target_audio_share" in str(err.value)
    assert "ar.heads" in str(err.value)
    with pytest.raises(ConfigError, match="ar.query='last'"):
        load_config(None, ["data.train=x.jsonl", "ar.query=last"])
    assert default_layers(2) == (0,) and default_layers(28) == tuple(range(7, 21))
    assert ARConfig(layers=(1, -1)).problems(num_layers=2) == ["ar.layers=[1, -1] names the same index twice"]


# ------------------------------------------------------------------------------------------ generation.py
def test_generate_rows_and_predict_rows_honour_ar_enabled(tiny_backbone_dir, clips, tmp_path):
    backbone = load_backbone(tiny_backbone_dir)
    cfg = load_config(None, [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl", f"data.cache_dir={tmp_path}"])
    mer = build_mer_model(backbone, cfg)
    mer.eval()
    samples = clips["samples"]

    def run(ar: ARConfig) -> tuple[list[dict], list[dict]]:
        model = InferenceModel(backbone, dataclasses.replace(cfg, ar=ar), mer)
        preds = list(predict_rows(model, samples, batch_size=3, prompt_name="label"))
        options = dataclasses.replace(cfg.generate, prompt="label", max_new_tokens=3, batch_size=3)
        rows = list(generate_rows(model, samples, options, progress=False))
        return preds, rows

    off_preds, off_rows = run(ARConfig())
    zero_preds, zero_rows = run(dataclasses.replace(STRONG, strength=0.0))
    on_preds, on_rows = run(STRONG)
    assert zero_preds == off_preds and zero_rows == off_rows
    assert on_preds != off_preds and [r["probs"] for r in on_rows] != [r["probs"] for r in off_rows]
    assert backbone.model.config.text_config._attn_implementation == "sdpa" and not realloc._SCOPES
    record = generation_record(InferenceModel(backbone, dataclasses.replace(cfg, ar=STRONG), mer))
    assert record["ar"]["enabled"] is True and record["ar"]["strength"] == 0.8


# ------------------------------------------------------------------------------------------- per sample
def test_sample_targets_follow_each_clips_own_paths():
    sure_happy = torch.tensor([[0.9, 0.02, 0.02, 0.02, 0.02, 0.02]])
    unsure_sad = torch.tensor([[0.2, 0.3, 0.125, 0.125, 0.125, 0.125]])
    tau, alpha = sample_targets(torch.cat([sure_happy, unsure_sad, sure_happy]),
                                torch.cat([unsure_sad, sure_happy, sure_happy]), strength=0.8)
    assert tau[0] > 0.7 and tau[1] < 0.3 and tau[2] == pytest.approx(0.5)  # toward the surer modality
    assert alpha[0] == pytest.approx(alpha[1]) and 0 < alpha[0] <= 0.8 and alpha[2] == 0.0  # agreement: none
    sharp, _ = sample_targets(torch.cat([sure_happy, unsure_sad]), torch.cat([unsure_sad, sure_happy]), 0.8, 4.0)
    assert sharp[0] > tau[0] and sharp[1] < tau[1]
    assert ((tau >= 0.02) & (tau <= 0.98)).all()


def test_per_sample_ar_moves_each_clip_its_own_way(eager, clips):
    batch, model = clips["av"], eager.model
    cfg = ARConfig(strength=1.0, layers=(1,))
    tau, alpha = torch.tensor([0.95, 0.05, 0.5]), torch.tensor([0.8, 0.8, 0.0])
    base = attention_shares(model, batch)["per_sample"]  # (B, L, 3) text / audio / video
    with attention_reallocation(model, batch["token_modality"], cfg, sample_targets=(tau, alpha)):
        moved = attention_shares(model, batch)["per_sample"]
    assert moved[0, 1, 1] > base[0, 1, 1] + 1e-3  # clip 0 asks for audio: more attention on audio
    assert moved[1, 1, 2] > base[1, 1, 2] + 1e-3  # clip 1 asks for video: more attention on video
    torch.testing.assert_close(moved[2], base[2])  # clip 2: strength 0, unchanged (up to rounding)
    torch.testing.assert_close(moved[:, 0], base[:, 0], rtol=0, atol=0)  # untargeted layer: bitwise
    # each row follows the formula with its own target: s' = s + alpha_b (tau_b - s)
    av = lambda s: s[:, 1, 1] / (s[:, 1, 1] + s[:, 1, 2])  # noqa: E731
    with attention_reallocation(model, batch["token_modality"], cfg, sample_targets=(tau, alpha),
                                record=True) as monitor:
        forward(model, batch)
    before, after = monitor.shares()[1]
    s, s2 = before[:, 1] / (before[:, 1] + before[:, 2]), after[:, 1] / (after[:, 1] + after[:, 2])
    assert ((s2 - tau).abs() <= (s - tau).abs() + 1e-6).all() and (s2[:2] - s[:2]).abs().min() > 1e-3
    assert av(moved)[0] > av(base)[0] and av(moved)[1] < av(base)[1]
    # strength 0: bitwise no-op whatever the per-sample targets; bad targets are refused
    ref = forward(model, batch, output_hidden_states=True)
    with attention_reallocation(model, batch["token_modality"], ARConfig(strength=0.0, layers=(1,)),
                                sample_targets=(tau, torch.ones(3))):
        out = forward(model, batch, output_hidden_states=True)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states, strict=True))
    with pytest.raises(ValueError, match="one \\(tau, alpha\\) per prompt"):
        with attention_reallocation(model, batch["token_modality"], cfg, sample_targets=(tau[:2], alpha[:2])):
            pass
    with pytest.raises(ValueError, match="every tau must lie in"):
        with attention_reallocation(model, batch["token_modality"], cfg, sample_targets=(tau * 0, alpha)):
            pass
    assert model.config.text_config._attn_implementation == "eager" and not realloc._SCOPES


def disagreeing_paths(mer):
    """The DCR model with random audio and video heads, so the two paths disagree on every clip."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in mer.named_parameters():
            if name.startswith(("fusion_audio", "fusion_video")):
                p.copy_(torch.randn(p.shape, generator=g))
    return mer


def test_paths_mode_needs_dcr_and_uses_the_paths_first_pass(tiny_backbone_dir, clips, tmp_path):
    backbone = load_backbone(tiny_backbone_dir)
    paths = ARConfig(enabled=True, strength=0.8, layers=(0, 1), target_mode="paths")
    plain_cfg = load_config(None, [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl",
                                   f"data.cache_dir={tmp_path}"])
    plain = build_mer_model(backbone, plain_cfg).eval()
    with pytest.raises(ValueError, match="needs a run trained with dcr.enabled=true"):  # strength > 0
        list(predict_rows(InferenceModel(backbone, dataclasses.replace(plain_cfg, ar=paths), plain),
                          clips["samples"], batch_size=3, prompt_name="label"))
    cfg = load_config(None, [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl", f"data.cache_dir={tmp_path}",
                             "dcr.enabled=true"])
    mer = disagreeing_paths(build_mer_model(backbone, cfg).eval())

    def run(ar: ARConfig) -> list[dict]:
        model = InferenceModel(backbone, dataclasses.replace(cfg, ar=ar), mer)
        return list(predict_rows(model, clips["samples"], batch_size=3, prompt_name="label"))

    off = run(ARConfig())
    zero = run(dataclasses.replace(paths, strength=0.0))
    on = run(paths)
    assert zero == off and [r["probs"]["fused"] for r in on] != [r["probs"]["fused"] for r in off]
    # every query row: the unimodal paths' shorter prompts run with AR paused, their probabilities unchanged
    every = run(dataclasses.replace(paths, query="all"))
    assert [r["probs"]["fused"] for r in every] != [r["probs"]["fused"] for r in off]
    for a, b in zip(every, off, strict=True):
        assert a["probs"]["audio"] == b["probs"]["audio"] and a["probs"]["video"] == b["probs"]["video"]
    assert backbone.model.config.text_config._attn_implementation == "sdpa" and not realloc._SCOPES


def test_first_pass_serves_the_heads_forward_and_one_modality_batches_skip_it(tiny_backbone_dir, clips, tmp_path,
                                                                              monkeypatch):
    from mllm_mer.fusion.dcr import method as dcr_method
    from mllm_mer.fusion.dcr import paths as dcr_paths

    backbone = load_backbone(tiny_backbone_dir)
    cfg = load_config(None, [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl", f"data.cache_dir={tmp_path}",
                             "dcr.enabled=true", "ar.enabled=true", "ar.target_mode=paths", "ar.strength=0.8",
                             "ar.layers=[0,1]"])
    mer = disagreeing_paths(build_mer_model(backbone, cfg).eval())
    model = InferenceModel(backbone, cfg, mer)
    ran: list[str] = []
    real_run = dcr_paths._run_path
    monkeypatch.setattr(dcr_paths, "_run_path", lambda mer, sub, path: ran.append(path) or real_run(mer, sub, path))
    targets = targets_seen(monkeypatch)

    def run(on=model, **flags) -> list[dict]:
        ran.clear(), targets.clear()
        return list(predict_rows(on, clips["samples"], batch_size=3, prompt_name="label", **flags))

    shared = run()  # one batch: the first pass (audio, video) is the heads' forward's audio and video passes
    assert sorted(ran) == ["audio", "text", "video"] and targets[0][1].gt(0).all()
    with monkeypatch.context() as m:  # without the memo both passes run, to the same numbers
        m.setattr(dcr_method, "reusing_path_runs", lambda mer: contextlib.nullcontext())
        again = run()
    assert sorted(ran) == ["audio", "audio", "text", "video", "video"] and again == shared
    assert not dcr_paths._MEMOS
    # audio-only prompts (e.g. the arbiter's re-answer from the voice): no first pass, AR moves no mass
    audio_only = run(use_video=False)
    assert sorted(ran) == ["audio", "text", "video"] and not targets[0][1].any()
    plain = run(InferenceModel(backbone, dataclasses.replace(cfg, ar=ARConfig()), mer), use_video=False)
    assert [r["label"] for r in audio_only] == [r["label"] for r in plain]
    for a, b in zip(audio_only, plain, strict=True):
        for path in ("fused", "audio", "video", "text"):
            assert a["probs"][path] == pytest.approx(b["probs"][path], abs=1e-5)


def test_path_memo_is_inference_only_and_scoped(tiny_backbone_dir, clips, tmp_path, monkeypatch):
    from mllm_mer.data.loading import build_collator
    from mllm_mer.fusion.dcr import paths as dcr_paths

    backbone = load_backbone(tiny_backbone_dir)
    cfg = load_config(None, [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl", f"data.cache_dir={tmp_path}",
                             "dcr.enabled=true"])
    mer = build_mer_model(backbone, cfg).eval()
    batch = build_collator(cfg, backbone, train=False, prompt="label")(clips["items"])
    ran: list[str] = []
    real_run = dcr_paths._run_path
    monkeypatch.setattr(dcr_paths, "_run_path", lambda mer, sub, path: ran.append(path) or real_run(mer, sub, path))
    with dcr_paths.reusing_path_runs(mer):
        with dcr_paths.reusing_path_runs(mer):  # nested: the outer memo
            first = dcr_paths.run_unimodal_paths(mer, batch, only=("audio",))
        with torch.no_grad():
            second = dcr_paths.run_unimodal_paths(mer, batch, only=("audio",))
            third = dcr_paths.run_unimodal_paths(mer, batch, only=("audio",))
        assert ran == ["audio", "audio"]  # the first call had autograd on: not kept
        assert third.logits["audio"] is second.logits["audio"]
        assert torch.equal(first.logits["audio"], second.logits["audio"])
        with pytest.raises(RuntimeError, match="boom"), dcr_paths.reusing_path_runs(mer):
            raise RuntimeError("boom")
        assert id(mer) in dcr_paths._MEMOS  # an inner block leaves the outer one's memo
    assert not dcr_paths._MEMOS
    with pytest.raises(RuntimeError, match="boom"), dcr_paths.reusing_path_runs(mer):
        raise RuntimeError("boom")
    assert not dcr_paths._MEMOS


def test_sample_targets_with_reliabilities_replace_the_max_probabilities():
    sure_happy = torch.tensor([[0.9, 0.02, 0.02, 0.02, 0.02, 0.02]])
    unsure_sad = torch.tensor([[0.2, 0.3, 0.125, 0.125, 0.125, 0.125]])
    pa, pv = torch.cat([unsure_sad, unsure_sad, sure_happy]), torch.cat([sure_happy, sure_happy, sure_happy])
    by_prob, alpha = sample_targets(pa, pv, strength=0.8)
    # the video path is surer of itself on clips 0-1, but its fitted reliability says it is wrong on clip 0
    r_audio, r_video = torch.tensor([0.9, 0.2, 0.5]), torch.tensor([0.1, 0.8, 0.5])
    by_rel, alpha_rel = sample_targets(pa, pv, strength=0.8, confidence=(r_audio, r_video))
    assert by_prob[0] < 0.5 and by_rel[0] == pytest.approx(0.9) and by_rel[1] == pytest.approx(0.2)
    torch.testing.assert_close(alpha_rel, alpha)  # the strength is still the paths' disagreement
    assert alpha_rel[2] == 0.0
    sharp, _ = sample_targets(pa, pv, 0.8, 4.0, confidence=(r_audio, r_video))
    assert sharp[0] > by_rel[0] and sharp[1] < by_rel[1]
    with pytest.raises(ValueError, match="one value per clip"):
        sample_targets(pa, pv, 0.8, confidence=(r_audio[:2], r_video[:2]))


def test_reliability_confidence_needs_fitted_heads_and_follows_them(tiny_backbone_dir, clips, tmp_path,
                                                                    monkeypatch):
    base = [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl", f"data.cache_dir={tmp_path}"]
    reliable = ["ar.enabled=true", "ar.target_mode=paths", "ar.sample_confidence=reliability"]
    for missing in ([], ["dcr.enabled=true", "dcr.reliability=false", "dcr.arbiter.state=rich"]):
        with pytest.raises(ConfigError, match="ar.sample_confidence=reliability reads the DCR reliability heads"):
            load_config(None, [*base, *missing, *reliable])
    backbone = load_backbone(tiny_backbone_dir)
    cfg = load_config(None, [*base, "dcr.enabled=true", *reliable, "ar.strength=0.8", "ar.layers=[0,1]"])
    mer = disagreeing_paths(build_mer_model(backbone, cfg).eval())
    model = InferenceModel(backbone, cfg, mer)
    with pytest.raises(ValueError, match="needs the audio and video reliability heads"):  # not fitted yet
        list(predict_rows(model, clips["samples"], batch_size=3, prompt_name="label"))

    seen = targets_seen(monkeypatch)

    def run(r_audio: float, r_video: float) -> list[dict]:
        fix_reliabilities(mer, r_audio, r_video)
        seen.clear()
        return list(predict_rows(model, clips["samples"], batch_size=3, prompt_name="label"))

    toward_audio = run(0.9, 0.1)
    tau, alpha = seen[0]  # every clip's target follows its reliabilities, the strength its disagreement
    assert tau.tolist() == pytest.approx([0.9] * len(tau)) and alpha.gt(0).all()
    toward_video = run(0.1, 0.9)
    assert seen[0][0].tolist() == pytest.approx([0.1] * len(tau)) and torch.equal(seen[0][1], alpha)
    assert [r["probs"]["fused"] for r in toward_audio] != [r["probs"]["fused"] for r in toward_video]
    assert backbone.model.config.text_config._attn_implementation == "sdpa" and not realloc._SCOPES


def test_auto_confidence_reads_reliabilities_once_they_are_fitted(tiny_backbone_dir, clips, tmp_path, monkeypatch):
    base = [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl", f"data.cache_dir={tmp_path}", "dcr.enabled=true",
            "ar.enabled=true", "ar.target_mode=paths", "ar.strength=0.8", "ar.layers=[0,1]"]
    no_heads = load_config(None, [*base, "dcr.reliability=false", "dcr.arbiter.state=rich"])  # no config error
    assert no_heads.ar.sample_confidence == "auto"
    backbone = load_backbone(tiny_backbone_dir)
    auto, by_prob = (load_config(None, [*base, *extra]) for extra in ([], ["ar.sample_confidence=max_prob"]))
    assert auto.ar.sample_confidence == "auto"
    mer = disagreeing_paths(build_mer_model(backbone, auto).eval())
    seen = targets_seen(monkeypatch)

    def targets(cfg) -> tuple[torch.Tensor, torch.Tensor]:
        seen.clear()
        list(predict_rows(InferenceModel(backbone, cfg, mer), clips["samples"], batch_size=3, prompt_name="label"))
        return seen[0]

    unfitted, max_prob = targets(auto), targets(by_prob)  # heads not fitted: auto is max_prob, no error
    assert torch.equal(unfitted[0], max_prob[0]) and torch.equal(unfitted[1], max_prob[1])
    assert not torch.allclose(max_prob[0], torch.full_like(max_prob[0], 0.9))
    fix_reliabilities(mer, 0.9, 0.1)
    fitted = targets(auto)  # fitted: auto follows the reliabilities; max_prob does not read them
    assert fitted[0].tolist() == pytest.approx([0.9] * len(fitted[0])) and torch.equal(fitted[1], max_prob[1])
    again = targets(by_prob)
    assert torch.equal(again[0], max_prob[0]) and torch.equal(again[1], max_prob[1])
