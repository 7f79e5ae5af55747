"""Frozen-encoder cache: cached epochs equal uncached ones, invalidation, corrupt shards, ranks, refusals;
and the encoders-outside-the-thinker path that ZeRO-3 uses. The equality, invalidation and ZeRO-3 tests run on
both backbone families (`tiny_backbone_dir`: Qwen2.5-Omni, and Qwen3-Omni with its deepstack features)."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import os
import shutil
import threading
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from mllm_mer import cache as C
from mllm_mer import encoders
from mllm_mer.backbone import family_of, load_backbone
from mllm_mer.cache import keys as cache_keys
from mllm_mer.config import ConfigError, load_config
from mllm_mer.data.collate import MODEL_INPUT_KEYS
from mllm_mer.data.dataset import MerDataset, build_media_dataset, decode_options
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.loading import base_collator, build_collator, prompt_variants, wrap_collator
from mllm_mer.data.media import MediaError
from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.fusion.dcr.collate import UnimodalPathCollator
from mllm_mer.model import build_mer_model
from mllm_mer.trainable import apply_trainable
from mllm_mer.training.loop import build_optimizer


def cfg_for(tiny_dir: Path, tmp_path: Path, *overrides: str):
    return load_config(
        None,
        [
            f"model.path={tiny_dir}",
            "data.train=x.jsonl",
            "data.prompt=explain",
            "data.feature_cache=true",
            f"data.feature_cache_dir={tmp_path / 'features'}",
            f"data.cache_dir={tmp_path / 'decoded'}",
            "train.batch_size=4",
            "data.num_workers=0",
            *overrides,
        ],
    )


def fill(cfg, bb, samples, cache_dir: Path | None = None, processor=None, accelerator=None, rank: int = 0):
    """Fill the cache for `samples` with `bb`'s towers (optionally another processor).

    Returns:
        (uncached collator, cached collator (both wrapped by the run's methods), cached items, fill report).
    """
    if processor is not None:
        bb = dataclasses.replace(bb, processor=processor)
    base = base_collator(cfg, bb, train=True)
    options = decode_options(cfg, bb.processor)
    spec = C.build_spec(bb, options, prompt_variants(cfg))
    cache = C.FeatureCache(cache_dir or cfg.data.feature_cache_dir, rank=rank)
    served, presence, report = C.fill_cache(cache, samples, base, bb.model, spec, options, accelerator=accelerator)
    cached = wrap_collator(cfg, C.CachedCollator.from_collator(base, cache))
    return build_collator(cfg, bb, train=True), cached, [(s, presence[s.id]) for s in served], report


def uncached_items(cfg, bb, samples):
    options = decode_options(cfg, bb.processor)
    ds = MerDataset(samples, build_media_dataset(samples, options, cfg.data.cache_dir), options)
    return [ds[i] for i in range(len(ds))]


def copy_samples(syn_dir: Path, dest: Path, n: int) -> list:
    """The first `n` training samples with their media copied under `dest` (so tests may change files)."""
    rows = [json.loads(line) for line in (syn_dir / "train.jsonl").read_text().splitlines()[:n]]
    for r in rows:
        for key in ("video", "audio"):
            if r[key]:
                (dest / r[key]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(syn_dir / r[key], dest / r[key])
    (dest / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_jsonl(dest / "train.jsonl", MER2023_LABELS)


# ------------------------------------------------------------------------------------------ equality
def test_cached_epoch_gives_the_uncached_losses(tiny_backbone_dir, syn_dir, tmp_path):
    cfg = cfg_for(tiny_backbone_dir, tmp_path, "data.modality_dropout=0.5")
    bb = load_backbone(tiny_backbone_dir)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:8]
    collator, cached, cached_items, report = fill(cfg, bb, samples)
    assert report.features_computed == 8 and report.layouts_computed == 8 * 3  # a+v, video-only, audio-only
    items = uncached_items(cfg, bb, samples)
    losses = {}
    for name, collate, data in (("uncached", collator, items), ("cached", cached, cached_items)):
        torch.manual_seed(0)
        model = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
        apply_trainable(model, cfg)
        optimizer, _ = build_optimizer(model, cfg, total_steps=10)
        model.train()
        losses[name] = []
        for start in (0, 4):  # one epoch: two batches (one of them keeps a single modality: dropout)
            torch.manual_seed(start)
            out = model(collate(data[start : start + 4]))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(out.loss.item())
    assert losses["cached"] == pytest.approx(losses["uncached"], abs=1e-6)
    for start in (0, 4):  # and the batches themselves match key by key
        assert_same_batch(collator(items[start : start + 4]), cached(cached_items[start : start + 4]))


def assert_same_batch(plain: dict, fast: dict) -> None:
    """An uncached and a cached batch hold the same values under every key of the uncached one (the
    processor's features excepted; feature mask: lengths only), DCR sub-batches included."""
    for key, value in plain.items():
        if key in ("input_features", "pixel_values_videos"):
            continue
        if key == "paths":
            assert set(fast[key]) == set(value)
            for path, sub in value.items():
                assert_same_batch(sub, fast[key][path])
        elif key == "feature_attention_mask":
            torch.testing.assert_close(fast[key].sum(1), value.sum(1).to(torch.long))
        elif isinstance(value, torch.Tensor):
            torch.testing.assert_close(fast[key], value.to(fast[key].dtype), rtol=0, atol=0)
        else:
            assert fast[key] == value, key


def test_cached_collator_is_wrapped_like_the_uncached_one(tiny_dir, syn_dir, tmp_path):
    """The methods wrap the cached collator as they wrap the uncached one (DCR: `UnimodalPathCollator`, whose
    sub-batch collators are `dataclasses.replace` copies): every sub-batch equals the uncached one, for the
    modality-dropout draws of training and for a prompt-only (inference) copy."""
    cfg = cfg_for(tiny_dir, tmp_path, "dcr.enabled=true", "data.modality_dropout=0.5")
    bb = load_backbone(tiny_dir)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:8]
    collator, cached, cached_items, report = fill(cfg, bb, samples)
    assert report.layouts_computed == 8 * 4  # a+v, video-only, audio-only, text-only (DCR)
    assert type(cached) is UnimodalPathCollator and isinstance(cached.base, C.CachedCollator)
    assert all(isinstance(c, C.CachedCollator) for c in cached.path_collators.values())
    items = uncached_items(cfg, bb, samples)
    draws = set()
    for start in range(0, 8, 2):
        plain = collator(items[start : start + 2])
        assert_same_batch(plain, cached(cached_items[start : start + 2]))
        draws.add(tuple(bool((plain["token_modality"] == m).any()) for m in (1, 2)))
    assert len(draws) > 1  # the dropout draw kept one modality in some batch
    prompt_only = UnimodalPathCollator(dataclasses.replace(collator.base, train=False))
    fast = UnimodalPathCollator(dataclasses.replace(cached.base, train=False))
    plain = prompt_only(items[:3])
    assert plain["labels"] is None and plain["attention_mask"][:, -1].all()  # left padded
    assert_same_batch(plain, fast(cached_items[:3]))


def test_cached_dcr_paths_match_uncached(tiny_backbone_dir, syn_dir, tmp_path):
    cfg = cfg_for(tiny_backbone_dir, tmp_path, "dcr.enabled=true", "dnr.enabled=true")
    bb = load_backbone(tiny_backbone_dir)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:3]
    collator, cached, cached_items, _ = fill(cfg, bb, samples)
    model = build_mer_model(load_backbone(tiny_backbone_dir), cfg)
    apply_trainable(model, cfg)
    model.eval()
    fast_batch = cached(cached_items)
    with torch.no_grad():
        plain, fast = model(collator(uncached_items(cfg, bb, samples))), model(fast_batch)
    for path in ("fused", "text", "audio", "video"):
        torch.testing.assert_close(fast.cls_logits[path], plain.cls_logits[path], rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.loss, plain.loss, rtol=0, atol=1e-6)
    if family_of(bb.model.config).deepstack:  # Qwen3: the cached deepstack features reach the language model
        deep = fast_batch["video_deepstack"]
        assert deep.shape[1:] == fast_batch["video_embeds"].shape and deep.shape[0] >= 1
        with torch.no_grad():
            zeroed = model({**fast_batch, "video_deepstack": torch.zeros_like(deep)})
        assert not torch.allclose(zeroed.cls_logits["fused"], fast.cls_logits["fused"], rtol=0, atol=1e-6)
    else:
        assert "video_deepstack" not in fast_batch


def test_cached_collator_refuses_items_it_was_not_prepared_for(tiny_dir, syn_dir, tmp_path):
    cfg = cfg_for(tiny_dir, tmp_path)  # the fused prompt variant only
    bb = load_backbone(tiny_dir)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:2]
    _, cached, items, _ = fill(cfg, bb, samples)
    assert type(cached) is C.CachedCollator
    relabelled = dataclasses.replace(cached, labels=tuple(reversed(cached.labels)))
    with pytest.raises(ValueError, match="another prompt, system prompt or label set"):
        relabelled(items)
    with pytest.raises(KeyError, match=r"\(has_video, has_audio\)=\(False, False\) was not cached"):
        UnimodalPathCollator(cached)(items)  # DCR's text-only variant was not filled
    with pytest.raises(TypeError, match="wrap the CachedCollator"):
        C.prepare_cache(cfg, bb, samples, UnimodalPathCollator(base_collator(cfg, bb, True)), [(True, True)])


# ------------------------------------------------------------------------------------------ invalidation
def test_changed_media_file_invalidates_only_its_entry(tiny_backbone_dir, syn_dir, tmp_path):
    samples = copy_samples(syn_dir, tmp_path / "data", 3)
    cfg = cfg_for(tiny_backbone_dir, tmp_path)
    bb = load_backbone(tiny_backbone_dir)
    _, cached, items, first = fill(cfg, bb, samples)
    before = cached(items)["video_embeds"]
    _, _, _, again = fill(cfg, bb, samples)
    assert (again.features_computed, again.layouts_computed, again.reused) == (0, 0, 3)
    shutil.copy(samples[2].video, samples[0].video)  # sample 0's file now holds sample 2's clip
    _, cached, items, changed = fill(cfg, bb, samples)
    assert (changed.features_computed, changed.layouts_computed, changed.reused) == (1, 1, 2)
    after = cached(items)["video_embeds"]
    n = after.shape[0] // 3
    assert not torch.equal(after[:n], before[:n])  # sample 0: the new clip's features
    torch.testing.assert_close(after[:n], after[2 * n :], rtol=0, atol=0)  # ... which are sample 2's
    torch.testing.assert_close(after[n:], before[n:], rtol=0, atol=0)  # the others untouched


def test_changed_processor_config_invalidates_entries(tiny_dir, syn_dir, tmp_path):
    cfg = cfg_for(tiny_dir, tmp_path)
    bb = load_backbone(tiny_dir)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:2]
    options = decode_options(cfg, bb.processor)
    fill(cfg, bb, samples)
    processor = copy.deepcopy(bb.processor)
    processor.video_processor.image_mean = [0.5, 0.5, 0.5]
    assert C.encoder_fingerprint(bb.model, processor, options) != C.encoder_fingerprint(
        bb.model, bb.processor, options
    )
    _, cached, items, report = fill(cfg, bb, samples, processor=processor)
    assert report.features_computed == 2 and report.reused == 0
    _, _, _, back = fill(cfg, bb, samples)  # the original config's entries are still there
    assert back.reused == 2 and back.features_computed == 0
    # the decode options and the towers' weights are part of the key too
    assert C.encoder_fingerprint(
        bb.model, bb.processor, dataclasses.replace(options, fps=2.0)
    ) != C.encoder_fingerprint(bb.model, bb.processor, options)
    other = load_backbone(tiny_dir)
    with torch.no_grad():
        other.model.model.visual.merger.mlp[0].weight.mul_(1.01)
    assert C.tower_fingerprint(other.model) != C.tower_fingerprint(bb.model)


def _rewrite_middle_keeping_size_and_mtime(path: Path, at: int | None = None) -> None:
    """Change one byte (the middle one, or offset `at`), then restore the file's mtime."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_fill_decodes_straight_from_the_files_with_or_without_the_decode_cache(tiny_dir, syn_dir, tmp_path):
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:2]
    bb = load_backbone(tiny_dir)
    cfg = cfg_for(tiny_dir, tmp_path, f"data.cache_dir={tmp_path / 'decoded-unused'}")
    streamed = cfg_for(tiny_dir, tmp_path, "data.decode_cache=false", f"data.cache_dir={tmp_path / 'unused'}")
    _, cached, items, _ = fill(cfg, bb, samples)
    _, cached2, items2, report = fill(streamed, bb, samples, cache_dir=tmp_path / "features2")
    assert report.features_computed == 2
    assert not (tmp_path / "unused").exists() and not (tmp_path / "decoded-unused").exists()  # no Arrow cache
    a, b = cached(items), cached2(items2)
    for key in ("input_ids", "audio_embeds", "video_embeds"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_media_hashes_read_each_file_once_and_see_every_rewrite(tmp_path, monkeypatch):
    media = tmp_path / "clip.mp4"
    media.write_bytes(bytes(range(256)) * 4096)
    reads: list[Path] = []
    real = C.file_checksum
    monkeypatch.setattr(cache_keys, "file_checksum", lambda p: reads.append(p) or real(p))
    hashes = C.MediaHashes(tmp_path / "cache")
    first = hashes(media)
    hashes.save()
    assert C.MediaHashes(tmp_path / "cache")(media) == first and len(reads) == 1  # remembered on disk
    _rewrite_middle_keeping_size_and_mtime(media)  # the old size+mtime+edges fingerprint missed this
    changed = C.MediaHashes(tmp_path / "cache")(media)
    assert changed != first and len(reads) == 2
    copied = tmp_path / "elsewhere" / "clip.mp4"
    copied.parent.mkdir()
    shutil.copy2(media, copied)
    assert hashes(copied) == changed  # the key follows the content, not the path


def test_unreadable_media_file_is_reported_not_crashed_on(tiny_dir, syn_dir, tmp_path):
    samples = copy_samples(syn_dir, tmp_path / "data", 2)
    samples[1].video.unlink()  # gone after the rows were read
    cfg = cfg_for(tiny_dir, tmp_path)
    bb = load_backbone(tiny_dir)
    with pytest.raises(MediaError, match=samples[1].id):
        fill(cfg, bb, samples)
    collator = base_collator(cfg, bb, train=True)
    options = decode_options(cfg, bb.processor)
    spec = C.build_spec(bb, options, prompt_variants(cfg))
    cache = C.FeatureCache(cfg.data.feature_cache_dir)
    served, _, report = C.fill_cache(cache, samples, collator, bb.model, spec, options, skip_bad=True)
    assert [s.id for s in served] == [samples[0].id] and len(report.skipped) == 1


def test_moved_dataset_keeps_its_entries(tiny_dir, syn_dir, tmp_path):
    samples = copy_samples(syn_dir, tmp_path / "a", 2)
    cfg = cfg_for(tiny_dir, tmp_path)
    bb = load_backbone(tiny_dir)
    assert fill(cfg, bb, samples)[3].features_computed == 2
    moved = copy_samples(syn_dir, tmp_path / "b", 2)
    again = fill(cfg, bb, moved)[3]
    assert (again.features_computed, again.reused) == (0, 2)
    video = moved[1].video
    at = video.read_bytes().index(b"Copyleft")  # inside x264's version SEI: the clip still decodes
    _rewrite_middle_keeping_size_and_mtime(video, at)
    assert fill(cfg, bb, moved)[3].features_computed == 1


# ------------------------------------------------------------------------------------------ corruption
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_is_detected_and_recomputed(tiny_dir, syn_dir, tmp_path, damage, caplog):
    cfg = cfg_for(tiny_dir, tmp_path)
    bb = load_backbone(tiny_dir)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:2]
    _, cached, items, _ = fill(cfg, bb, samples)
    good = cached(items)
    (shard,) = Path(cfg.data.feature_cache_dir).glob("rank0-*.safetensors")
    raw = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(raw[: len(raw) // 2])
    else:  # same length, one byte of tensor data changed: only the checksum sees it
        shard.write_bytes(raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:])
    cache = C.FeatureCache(cfg.data.feature_cache_dir)
    assert len(cache) == 0 and shard.name in cache.bad_shards
    assert ("truncated" if damage == "truncate" else "checksum") in cache.bad_shards[shard.name]
    assert "unusable" in caplog.text
    _, cached, items, report = fill(cfg, bb, samples)
    assert report.features_computed == 2 and not shard.exists()  # recomputed; the bad shard is gone
    again = cached(items)
    for key in ("input_ids", "audio_embeds", "video_embeds"):
        torch.testing.assert_close(again[key], good[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ ranks
class _ThreadRank:
    """The Accelerator members fill_cache uses, for one of two ranks simulated by threads."""

    def __init__(self, rank: int, barrier: threading.Barrier) -> None:
        self.process_index, self.num_processes, self.mixed_precision = rank, 2, "no"
        self.device = torch.device("cpu")
        self._barrier = barrier

    def wait_for_everyone(self) -> None:
        self._barrier.wait(timeout=120)

    def main_process_first(self):
        return nullcontext()

    def autocast(self):
        return nullcontext()


def test_two_ranks_write_their_own_shards_and_indexes(tiny_dir, syn_dir, tmp_path):
    cfg = cfg_for(tiny_dir, tmp_path)
    bb = load_backbone(tiny_dir)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:4]
    build_media_dataset(
        samples, decode_options(cfg, bb.processor), cfg.data.cache_dir
    )  # decode once, up front
    barrier = threading.Barrier(2)
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            results[rank] = fill(cfg, bb, samples, accelerator=_ThreadRank(rank, barrier), rank=rank)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    root = Path(cfg.data.feature_cache_dir)
    assert sorted(p.name for p in root.glob("index-rank*.json")) == ["index-rank0.json", "index-rank1.json"]
    for rank in (0, 1):
        assert results[rank][3].features_computed == 2  # every world_size-th sample
        index = json.loads((root / f"index-rank{rank}.json").read_text())
        assert all(name.startswith(f"rank{rank}-") for name in index["shards"])
    # both ranks serve every sample from the union of the shards
    batches = [results[r][1](results[r][2]) for r in (0, 1)]
    torch.testing.assert_close(batches[0]["audio_embeds"], batches[1]["audio_embeds"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ refusals
def test_cache_refused_when_a_tower_or_projector_trains(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.freeze.audio_projector=true"):
        cfg_for(tiny_dir, tmp_path, "model.freeze.audio_projector=false")
    cfg = load_config(
        None, [f"model.path={tiny_dir}", "data.train=x.jsonl", "model.freeze.vision_tower=false"]
    )
    with pytest.raises(ValueError, match="model.freeze.vision_tower=true"):
        C.check_cacheable(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, feature_cache=True)))


# ------------------------------------------------------------------------------------------ ZeRO-3 path
def test_every_tower_path_equals_the_thinkers_forward(tiny_backbone_dir, syn_dir, tmp_path, monkeypatch):
    """Under ZeRO-3 the towers run outside the thinker, on every call (dummy input when a modality is
    missing); the outputs must equal the thinker's own forward, with and without a modality."""
    cfg = cfg_for(tiny_backbone_dir, tmp_path)
    bb = load_backbone(tiny_backbone_dir)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:2]
    collator = build_collator(cfg, bb, train=True)
    items = uncached_items(cfg, bb, samples)
    calls: list[str] = []
    bb.model.model.audio_tower.register_forward_hook(lambda *a: calls.append("audio"))
    bb.model.model.visual.register_forward_hook(lambda *a: calls.append("video"))
    for use_video, use_audio in ((True, True), (False, True), (True, False), (False, False)):
        batch = dataclasses.replace(collator, use_video=use_video, use_audio=use_audio)(items)
        with torch.no_grad():
            monkeypatch.setattr(encoders, "is_zero3", lambda m: False)
            plain = bb.model(
                **encoders.backbone_inputs(bb.model, batch, MODEL_INPUT_KEYS),
                use_audio_in_video=batch["use_audio_in_video"],
            )
            monkeypatch.setattr(encoders, "is_zero3", lambda m: True)
            calls.clear()
            every = bb.model(
                **encoders.backbone_inputs(bb.model, batch, MODEL_INPUT_KEYS),
                use_audio_in_video=batch["use_audio_in_video"],
            )
        assert calls == ["audio", "video"], (use_video, use_audio)  # both towers, in a fixed order
        torch.testing.assert_close(every.logits, plain.logits, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ imports
def _module_file(module: str) -> Path | None:
    base = Path(C.__file__).parents[2] / module.replace(".", "/")  # the directory holding mllm_mer/
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _imports_of(module: str) -> set[str]:
    """The `mllm_mer` modules `module` imports (every import statement in its source, at any depth)."""
    found = set()
    for node in ast.walk(ast.parse(_module_file(module).read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mllm_mer"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mllm_mer")}
    return found


def test_the_cache_imports_neither_the_loaders_nor_the_model_nor_the_methods():
    """`data.loading` imports the cache, never the reverse (no cycle); the cache names no method."""
    seen, todo = set(), ["mllm_mer.cache"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imports_of(module))
    forbidden = ("mllm_mer.data.loading", "mllm_mer.model", "mllm_mer.training", "mllm_mer.methods",
                 "mllm_mer.fusion.dcr.collate", "mllm_mer.fusion.dcr.paths")
    assert {"mllm_mer.cache.fill", "mllm_mer.data.collate"} <= seen
    assert not [m for m in seen if m.startswith(forbidden)], sorted(seen)


def test_cached_loader_reads_in_the_main_process(tiny_dir, syn_dir, tmp_path):
    """`data.num_workers` drives the decoding loader; the cached loader always reads in the main process."""
    from accelerate import Accelerator

    from mllm_mer.data.loading import build_loader

    bb = load_backbone(tiny_dir)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:2]
    accelerator = Accelerator(cpu=True)
    cached, _ = build_loader(cfg_for(tiny_dir, tmp_path, "data.num_workers=2"), bb, samples, train=True,
                             accelerator=accelerator)
    assert cached.num_workers == 0
    decoding, _ = build_loader(cfg_for(tiny_dir, tmp_path, "data.num_workers=2", "data.feature_cache=false"), bb,
                               samples, train=True, accelerator=accelerator)
    assert decoding.num_workers == 2
