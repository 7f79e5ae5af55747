"""The speed and size benchmarks run end to end on the tiny thinker (one short round each) and print their
JSON line and the ratio as the last line. Their figures are not checked here (no timed tests): only that
they measure what they say, on the variants they say. Slow tier (`pytest -m slow`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import pytest

from tests.smoke.conftest import base_args, check, run_finetune

pytestmark = pytest.mark.slow  # each bench takes 20-30 s on the tiny model: opt-in (-m slow)

REPO = Path(__file__).resolve().parents[2]
RATIO = re.compile(r": (\d+\.\d+)$")


def run_bench(name: str, *args: str) -> tuple[dict, list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / name), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = proc.stdout.strip().splitlines()
    row = next(json.loads(line) for line in lines if line.startswith("{"))
    return row, lines


def data_args(tiny_dir: Path, syn_dir: Path, tmp: Path) -> list[str]:
    return [
        f"model.path={tiny_dir}",
        "model.build_tiny=false",
        "data.synthetic_dir=null",
        f"data.train={syn_dir / 'train.jsonl'}",
        f"data.cache_dir={tmp / 'decoded'}",
        "train.batch_size=2",
    ]


def test_cache_speedup_times_all_three_loaders(tiny_dir, syn_dir, tmp_path):
    row, lines = run_bench(
        "cache_speedup.py",
        "--samples",
        "4",
        "--rounds",
        "1",
        "--cache-dir",
        str(tmp_path / "features"),
        "--clips",
        "config",
        *data_args(tiny_dir, syn_dir, tmp_path),
    )
    assert row["samples"] == 4 and row["batch_size"] == 2 and row["clips"] == "config"
    assert set(row["median_epoch_cpu_s"]) == {"uncached", "decode_cached", "cached"}
    assert all(v > 0 for v in row["median_epoch_cpu_s"].values())
    headline = float(RATIO.search(lines[-1]).group(1))
    assert lines[-1].startswith("cache speedup") and headline == round(
        row["cpu_ratio_to_cached"]["uncached"], 2
    )
    assert list((tmp_path / "features").glob("*.safetensors")), "the cached variant did not use the cache"
    assert list((tmp_path / "decoded").iterdir()), "the decode-cached variant did not use the decode cache"


def test_trainable_share_covers_both_published_architectures():
    row, lines = run_bench("trainable_share.py")
    assert lines[-1].startswith("trainable share")
    assert set(row["results"]) == {"3B", "7B"}
    for size, methods in row["results"].items():
        assert set(methods) == {"lora", "mose", "dnr", "dcr", "full"}
        assert methods["lora"]["trainable"] < methods["full"]["trainable"]
        assert methods["full"]["share"] <= 0.01, (size, methods["full"])  # the size goal
    # the published architectures, not the tiny twin: billions of parameters
    assert 6e9 < row["results"]["7B"]["lora"]["total"] < 1e10


def test_cache_speedup_builds_camera_sized_clips(tiny_dir, syn_dir, tmp_path):
    row, lines = run_bench(
        "cache_speedup.py",
        "--samples",
        "2",
        "--rounds",
        "1",
        "--frame-size",
        "96",
        "--source-fps",
        "8",
        "--clip-seconds",
        "1",
        "--clips-dir",
        str(tmp_path / "clips"),
        *data_args(tiny_dir, syn_dir, tmp_path),
    )
    assert row["clips"] == {"frame_size": 96, "source_fps": 8, "clip_seconds": 1.0} and row["samples"] == 2
    (clip_set,) = (tmp_path / "clips").iterdir()
    clip = next((clip_set / "media").rglob("*.mp4"))
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height, stream.average_rate) == (96, 96, 8)


def test_gpu_step_runs_its_lora_and_qlora_steps_on_cpu(tiny_dir, tmp_path):
    """`--allow-cpu` with a tiny architecture: the GPU bench's code path (build, NF4, batch, step, report)."""
    config = json.loads((tiny_dir / "config.json").read_text())
    config["text_config"]["num_key_value_heads"] = 4  # bitsandbytes 4-bit needs layers >= 64 wide
    (tmp_path / "wide.json").write_text(json.dumps(config))
    row, lines = run_bench(
        "gpu_step.py",
        "--allow-cpu",
        "--model-config",
        str(tmp_path / "wide.json"),
        "--video-seconds",
        "2",
        "--size",
        "56",
        "--rounds",
        "1",
    )
    assert set(row["variants"]) == {"lora", "qlora"} and row["device"] == "cpu"
    assert row["variants"]["qlora"]["weights_gib"] < row["variants"]["lora"]["weights_gib"]  # 4-bit linears
    assert row["audio_frames"] == 1500 and row["tokens_per_sample"] > 750  # 30 s of audio per sample
    assert lines[-1].startswith("qlora / lora")


def test_ar_overhead_times_predict_rows_of_a_dcr_run(tiny_dir, syn_dir, tmp_path):
    """`--predict`: per-sample AR's cost inside `predict_rows` of a trained DCR run (its first pass is the
    heads' own audio and video passes there); `--predict` without a run is refused."""
    run = tmp_path / "run"
    check(run_finetune([*base_args(tiny_dir, syn_dir, run, tmp_path / "cache"), "dcr.enabled=true",
                        "train.max_steps=2", "train.save_every=0"]))
    row, lines = run_bench("ar_overhead.py", "--run", str(run), "--data", str(syn_dir / "test.jsonl"), "--predict",
                           "--rounds", "1", "--batch-size", "2", "ar.target_mode=paths", "ar.strength=0.8")
    assert row["timed"] == "predict_rows" and row["new_tokens"] is None and row["batch_size"] == 2
    assert row["ar"]["target_mode"] == "paths" and all(v > 0 for v in row["median_cpu_s"].values())
    assert lines[-1].startswith("AR on / AR off predict_rows time") and float(RATIO.search(lines[-1]).group(1)) > 0
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ar_overhead.py"), "--predict"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "give --run" in proc.stderr
