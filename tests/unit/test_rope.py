"""`mllm_mer.rope.RopePositions`: the memoized 3-D position ids equal the thinker's own `get_rope_index`."""

from __future__ import annotations

import dataclasses

import torch

from mllm_mer.backbone import load_backbone
from mllm_mer.config import load_config
from mllm_mer.data.dataset import decode, decode_options
from mllm_mer.data.jsonl import read_jsonl
from mllm_mer.data.loading import base_collator
from mllm_mer.data.schema import MER2023_LABELS
from mllm_mer.rope import RopePositions


def thinker_positions(thinker, batch: dict) -> torch.Tensor:
    """What the thinker's forward computes for `batch` (get_rope_index on the whole batch)."""
    fam = batch.get("feature_attention_mask")
    pos, _ = thinker.get_rope_index(
        batch["input_ids"],
        None,
        batch.get("video_grid_thw"),
        batch["attention_mask"],
        bool(batch.get("use_audio_in_video", False)),
        fam.sum(dim=1) if fam is not None else None,
        batch.get("video_second_per_grid"),
    )
    return pos


def test_memoized_positions_equal_get_rope_index_bitwise(tiny_backbone_dir, syn_dir, tmp_path):
    cfg = load_config(None, [f"model.path={tiny_backbone_dir}", "data.train=x.jsonl", "data.prompt=explain"])
    bb = load_backbone(tiny_backbone_dir)
    thinker = bb.model
    options = decode_options(cfg, bb.processor)
    samples = read_jsonl(syn_dir / "train.jsonl", MER2023_LABELS)[:4]
    items = [(s, decode(s, options)) for s in samples]
    no_video = [(s, dataclasses.replace(m, frames=None)) for s, m in items]
    mixed = [items[0], no_video[1], items[2], no_video[3]]  # rows with and without video in one batch
    train = base_collator(cfg, bb, train=True)
    batches = {
        "audio-visual, audio in video": train(items),
        "mixed rows": train(mixed),
        "audio only (no grid: the plain branch)": train(no_video),
        "video only": dataclasses.replace(train, use_audio=False)(items),
        "prompt only, left padded": base_collator(cfg, bb, train=False)(mixed),
    }
    memo = RopePositions()
    rows = sum(len(b["sample_ids"]) for b in batches.values())
    for rnd in range(2):  # computed, then served from the memo
        for name, batch in batches.items():
            fam = batch.get("feature_attention_mask")
            got = memo(thinker, batch, fam.sum(dim=1) if fam is not None else None)
            want = thinker_positions(thinker, batch)
            assert got.dtype == want.dtype and torch.equal(got, want), (rnd, name)
        if rnd == 0:
            first = memo.misses
            assert 0 < first < rows and memo.hits == rows - first  # repeated rows already hit
    assert memo.misses == first and memo.hits == 2 * rows - first  # the second round computes nothing


def test_batches_it_cannot_reproduce_are_left_to_the_thinker(tiny_dir):
    bb = load_backbone(tiny_dir)
    ids = torch.tensor([[1, 2, 3]])
    assert RopePositions()(bb.model, {"input_ids": ids}, None) is None  # no attention mask
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": torch.ones(1, 3)}
    assert RopePositions()(bb.model, batch, None) is None


def test_the_memo_keeps_at_most_max_rows(tiny_dir):
    bb = load_backbone(tiny_dir)
    memo = RopePositions(max_rows=2)
    for n in range(2, 6):
        ids = torch.arange(1, n)[None]
        out = memo(bb.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None)
        assert torch.equal(out, thinker_positions(bb.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    assert len(memo._rows) == 2 and memo.misses == 4
