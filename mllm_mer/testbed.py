"""The conflict testbed: a small "pretrained" emotion MLLM that perceives both cues, explains, and trusts audio.

A random tiny thinker has no modality habits, so conflict-aware methods cannot show anything on it.
Stage 0 (`scripts/pretrain_tiny.py`) trains all weights of a tiny twin (`STAGE0_SPEC`: 4 text layers, a
tokenizer that knows the explanation vocabulary) over synthetic clips (`STAGE0_DATA`) in two phases
(`STAGE0_PHASES`: first the label prompt on single-modality batches, then the `explain` prompt), with
modality dropout so that each modality alone is recognised and explained too:

- every clip is consistent (no conflict with a genuine label is ever seen: stage 0 never teaches how to
  resolve one); the face and the voice each show the label at a random intensity, per modality
  independently (`weak_display_rate`: half of the displays full "strong", a quarter "clear", a quarter
  "faint"), and the explanation names each cue with its intensity word;
- the voice is cleaner than the face (audio noise 0.05, video noise 0.1), so when both are present
  the model learns to trust the voice; the subtitle carries no evidence (text noise 1.0).

The frozen result follows audio on conflicts, like current emotion MLLMs on CA-MER, while its features
and its video-only answers still recover the face's cue. Methods are fine-tuned on top of it with
`TESTBED_DATA` (`bench/conflict_ablation.py`).

The stage-0 checkpoint is cached under `<root>/stage0-<key>/backbone`, where the key hashes everything
that determines it (data config, training config file, tiny spec, package version, seed, overrides).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import mllm_mer
from mllm_mer.backbone.tiny import TinySpec
from mllm_mer.data.synthetic import SyntheticConfig
from mllm_mer.generation import load_for_inference

STAGE0_DATA = SyntheticConfig(
    seed=100, train_size=720, dev_size=96, test_size=96,
    audio_noise=0.05, video_noise=0.1, text_noise=1.0, train_conflict_rate=0.0, weak_display_rate=0.5,
)
"""Stage-0 clips: consistent only, per-modality intensity varied, voice cleaner than face, no textual evidence."""

STAGE0_PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("perceive", ("data.prompt=label", "data.modality_dropout=1.0", "train.epochs=4")),
    ("explain", ()),
)
"""Stage 0 runs `configs/pretrain_tiny.yaml` once per phase with these overrides, each phase starting from
the previous one's weights:

- perceive: answer with the label only, every batch audio-only or video-only. Each tower and the
  language model's reading of it learn from answer tokens that all depend on the media; in a 75-token
  explanation only the first mention of the emotion does (the rest can be copied), and explain-only
  stage 0 read faces worse (on the testbed's test clips, video-only answers right on 0.78 of the
  full-intensity faces and a video-cue probe at 0.77, against 0.86 and 0.81 with this phase first);
- explain: the `explain` prompt, half of the batches with both modalities (the explanation, the intensity
  words and the trust in the voice are learned here)."""

STAGE0_SPEC = TinySpec(text_layers=4, explain_corpus=True, audio_chunk_seconds=4)
"""The stage-0 twin: 4 text layers (so that middle layers exist), a BPE that spells an explanation in ~75
tokens, and a 4 s audio window (the clips are 2 s; Whisper features of a 30 s window cost 8x the collate
time). The test twin (`TinySpec()`) is unchanged."""

TESTBED_DATA = SyntheticConfig(
    seed=0, train_size=480, dev_size=96, test_size=288,
    audio_noise=0.05, video_noise=0.1, text_noise=0.7, train_conflict_rate=0.2,
)
"""Fine-tuning data of the ablation harness (any set from `scripts/make_synthetic.py` works too). Video noise
0.1: a face shows a random label on 10% of the clips, so a perfect face reader scores ~0.92 on the face's
designed cue (0.2 capped it at ~0.83). Test: 288 clips, 96 per subset (one clip is about 1 point of a subset)."""


def stage0_key(config_text: str, seed: int = 0, overrides: Sequence[str] = ()) -> str:
    """Hash of everything that determines the stage-0 backbone.

    Args:
        config_text: the text of the stage-0 training config (`configs/pretrain_tiny.yaml` in the repository).
        seed: training seed.
        overrides: extra `key.path=value` settings applied to every phase.
    """
    payload = {
        "data": STAGE0_DATA.to_dict(),
        "config": config_text,
        "tiny": asdict(STAGE0_SPEC),
        "phases": [[name, list(phase)] for name, phase in STAGE0_PHASES],
        "version": mllm_mer.__version__,
        "seed": seed,
    }
    if overrides:
        payload["overrides"] = list(overrides)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def stage0_dir(config_text: str, root: str | Path = ".cache/mllm_mer", seed: int = 0,
               overrides: Sequence[str] = ()) -> Path:
    """`<root>/stage0-<key>`: holds `backbone/` (the checkpoint) and `stage0.json` (how it was made)."""
    return Path(root) / f"stage0-{stage0_key(config_text, seed, overrides)}"


def export_backbone(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a finished full-training run's thinker (+ processor) as a normal checkpoint directory."""
    model = load_for_inference(run_dir=run_dir)
    if model.cfg.adapter != "none":
        raise ValueError(
            f"{run_dir} trained an adapter (adapter={model.cfg.adapter}); export needs a run that trained the "
            "base weights (adapter=none)"
        )
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.backbone.model.save_pretrained(tmp)
    model.backbone.processor.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir
