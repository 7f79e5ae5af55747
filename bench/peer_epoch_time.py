"""Per-epoch CPU time of LoRA fine-tuning: mllm_mer side by side with LLaMA-Factory and ms-swift.

    python bench/peer_epoch_time.py --root .cache/peers --setup         # once: the peers' venvs (~7 GB each)
    python bench/peer_epoch_time.py --root .cache/peers                 # toy + camera clips, all frameworks
    python bench/peer_epoch_time.py --root .cache/peers --only ours --clips toy --samples 4 --epochs 1 2

What is measured. Every framework trains the same tiny random Qwen2.5-Omni thinker
(`mllm_mer.backbone.tiny.ensure_tiny_thinker`) with LoRA (r 8, alpha 16, dropout 0.05) on the language
model's attention projections (q/k/v/o), batch 1, gradient accumulation 1, lr 1e-3 with 5 % linear
warmup and a cosine decay, fp32, one torch thread (`OMP_NUM_THREADS=1`), no evaluation, no checkpoint
before the end, on the same clips: one synthetic set (`mllm_mer.data.synthetic`, 40 train clips,
H.264 + AAC mp4 with the audio in the video file) written once per clip geometry and described to each
framework in its own format:

- toy clips: 64 px, 8 fps, 2 s; camera clips: 360 px, 25 fps, 4 s;
- LLaMA-Factory: a sharegpt file (`train.sharegpt.json` + `dataset_info.json`), `template: qwen2_omni`,
  `use_audio_in_video: true`; mllm_mer reads this same file (`data.format=sharegpt`);
- ms-swift: a messages JSONL (`train.swift.jsonl`, absolute media paths), `USE_AUDIO_IN_VIDEO=true`,
  `SWIFT_AUDIO_LOAD_BACKEND=soundfile_pyav`; ms-swift loads only a full Omni checkpoint, so the thinker is
  wrapped once in `Qwen2_5OmniForConditionalGeneration` without a talker (`enable_audio_output=False`)
  plus an empty `spk_dict.pt`, built with ms-swift's own transformers;
- the same prompt text: the user turn is our `explain` template (rendered with an empty subtitle, which is
  what `data.format=sharegpt` gives us), the system turn our system prompt, the answer the clip's
  explanation; video sampled at 4 fps into 56x56 frames (the tiny processor's pixel limits), audio at
  16 kHz from the video's own track.

Runs. Each framework trains N and M epochs (`--epochs N M`, default 1 and 4) as a fresh process tree,
one run at a time; within a round the frameworks alternate (A B C D for N epochs, then for M), and every
run starts cold: its own output folder, its own `datasets` cache (`HF_DATASETS_CACHE`) and, for mllm_mer,
its own decode cache and feature cache, so nothing computed by an earlier run is reused.
CPU time = user + sys of the whole process tree (`resource.getrusage(RUSAGE_CHILDREN)` around each
subprocess: the launcher, every Python it starts, DataLoader workers, ffmpeg); wall time beside it.
The per-epoch figure is the marginal epoch, (CPU of the M-epoch run - CPU of the N-epoch run) / (M - N),
taken per round; the table shows its median over rounds with the min-max, the ratio ours / peer (taken
per round, pairing the runs of one round, then the median over rounds), and the whole N-epoch run's CPU
and wall time. Rows:

- `llamafactory`: `llamafactory-cli train <yaml>`;
- `swift`: `swift sft ...`;
- `ours`: `python scripts/finetune.py` with the default config as a user runs it on one device (one
  process, as `llamafactory-cli train` trains on one device): every tower and projector is frozen, so the
  frozen-encoder cache is on (`data.feature_cache` unset = auto); the cache lives in the run's own folder and
  starts empty, so its fill (decoding and running the towers once per clip) is part of every run;
- `ours_launch`: the same run started through `accelerate launch` (the README's command; needed for
  several processes): the launcher is a second Python that imports accelerate and torch;
- `ours_nocache`: `ours` with `data.feature_cache=false` (decode cache only: feature extraction and the
  towers run in every step, as in the peers).

Differences that remain (also printed under the table):
- mllm_mer also trains its fused classification head (a linear layer on pooled states, a cross-entropy
  beside the LM loss) and appends "\\nEmotion: <label>" to the answer (our `explain` template; about five
  tokens); the peers train the LM loss on the explanation alone.
- Start-up and end: mllm_mer checks every row and every clip before the model loads, fills its
  frozen-encoder cache (the default row: each clip decoded and run through the towers once, before the
  first epoch) and writes a final checkpoint (accelerate state) besides the adapter; LLaMA-Factory
  tokenizes the whole set (running its media processors) before training and saves the adapter; ms-swift
  tokenizes lazily (in every step) and, with `--save_strategy no`, saves nothing.
- DataLoader workers: each framework's default. mllm_mer's default config (`configs/tiny_cpu.yaml`) has
  `data.num_workers: 1`, used by the decoding loader (`ours_nocache`); the frozen-encoder cache's loader
  (`ours`) reads the stored tensors in the main process. LLaMA-Factory: 0; ms-swift: its default. Worker
  CPU is in the process tree either way.
- Versions: each framework runs with the transformers / peft / accelerate its own pins resolve to
  (printed from each venv), all with torch 2.14.1.
- Start-up: `accelerate launch` starts two Pythons (the launcher alone imports accelerate and torch;
  `ours_launch`); `llamafactory-cli train` trains in its own process on one device; `swift sft` starts a
  second Python. mllm_mer runs in the interpreter that runs this script: in the project's dev venv the
  `qlora` and `deepspeed` extras are installed; `scripts/finetune.py` keeps bitsandbytes out of a run
  without quantization (`mllm_mer.startup`), as it is absent from the peers' venvs.

Without the peers' venvs (no `--setup` yet) the script says how to create them and measures the rows it
can (`--only ours` skips the peers on purpose). Venvs, clips and runs live under `--root` (default
`.cache/peers`), never in the repository's tracked files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCH_PINS: tuple[str, ...] = ("torch==2.14.1", "torchvision==0.29.1")
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}
LR, WARMUP = 1e-3, 0.05
VIDEO_FPS = 4.0
"""Frames sampled per second of video by every framework (mllm_mer's `data.fps` default)."""
CLIPS: dict[str, dict] = {
    "toy": {"frame_size": 64, "fps": 8, "clip_seconds": 2.0},
    "camera": {"frame_size": 360, "fps": 25, "clip_seconds": 4.0},
}
"""Clip geometries: synthetic-set fields (side in pixels, frames per second in the file, duration)."""
ROWS: tuple[str, ...] = ("llamafactory", "swift", "ours", "ours_launch", "ours_nocache")


@dataclass(frozen=True)
class Peer:
    """A peer framework: its display name, the pip requirements of its venv and its training CLI."""

    key: str
    display: str
    requirements: tuple[str, ...]
    cli: str


PEERS: dict[str, Peer] = {
    "llamafactory": Peer(
        "llamafactory",
        "LLaMA-Factory 0.9.5",
        ("llamafactory==0.9.5", "torchcodec==0.17.0"),
        "llamafactory-cli",
    ),
    "swift": Peer(
        "swift",
        "ms-swift 4.6.0",
        ("ms-swift==4.6.0", "qwen-omni-utils", "torchcodec==0.17.0", "soundfile"),
        "swift",
    ),
}
DISPLAY = {
    **{k: p.display for k, p in PEERS.items()},
    "ours": "mllm_mer default (feature cache auto)",
    "ours_launch": "mllm_mer default, accelerate launch",
    "ours_nocache": "mllm_mer data.feature_cache=false",
}


# ---------------------------------------------------------------------------------------------- setup
def venv_dir(root: Path, peer: Peer) -> Path:
    return root / peer.key / "venv"


def ready_marker(root: Path, peer: Peer) -> Path:
    """Written last by the setup: a venv without it is incomplete."""
    return root / peer.key / "ready.json"


def peer_ready(root: Path, peer: Peer) -> bool:
    return ready_marker(root, peer).is_file() and (venv_dir(root, peer) / "bin" / peer.cli).is_file()


def ffmpeg_libs_present() -> bool:
    """True when the system FFmpeg shared libraries (torchcodec's dependency) are installed."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    return "libavutil.so" in out


def setup_hint(root: Path) -> str:
    return (
        f"create the peers' venvs once (about 7 GB each, under {root}):\n"
        f"    apt-get install -y ffmpeg        # torchcodec needs the system FFmpeg libraries\n"
        f"    python bench/peer_epoch_time.py --root {root} --setup"
    )


def setup_peer(root: Path, peer: Peer) -> None:
    """Create `<root>/<peer>/venv` and install the peer with torch/torchvision pinned (once)."""
    if peer_ready(root, peer):
        print(f"[setup] {peer.display}: ready ({venv_dir(root, peer)})", flush=True)
        return
    venv = venv_dir(root, peer)
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    print(f"[setup] {peer.display}: creating {venv} (about 7 GB, several minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input"]
    subprocess.run([*pip, *TORCH_PINS, *peer.requirements], check=True)
    freeze = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    ready_marker(root, peer).write_text(
        json.dumps({"requirements": peer.requirements, "freeze": freeze}, indent=1)
    )
    print(f"[setup] {peer.display}: done", flush=True)


def setup(root: Path, peers: list[Peer]) -> None:
    """Install the system FFmpeg libraries if missing (as root, via apt-get) and every peer's venv."""
    if not ffmpeg_libs_present():
        if os.geteuid() == 0 and shutil.which("apt-get"):
            print("[setup] installing the system FFmpeg libraries for torchcodec: apt-get install -y ffmpeg")
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "ffmpeg"], check=True)
        else:
            raise SystemExit(
                "torchcodec needs the system FFmpeg libraries: run `apt-get install -y ffmpeg` first"
            )
    for peer in peers:
        setup_peer(root, peer)


def peer_versions(root: Path, peer: Peer) -> dict[str, str]:
    """Versions of the packages that decide the step's cost, from the peer's venv (setup's pip freeze)."""
    freeze = json.loads(ready_marker(root, peer).read_text())["freeze"]
    wanted = {
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "llamafactory",
        "ms-swift",
        "ms_swift",
        "torchcodec",
    }
    out = {}
    for line in freeze:
        name, _, version = line.partition("==")
        if name.lower() in wanted:
            out[name.lower()] = version
    return out


# ----------------------------------------------------------------------------------------------- data
def write_clip_set(root: Path, clips: str, samples: int) -> dict[str, Path]:
    """The clip set `clips` ("toy" / "camera") with `samples` train clips, in every framework's format.

    Returns:
        {"dir": the set's folder, "sharegpt": LLaMA-Factory's file (also read by mllm_mer),
        "dataset_info": its folder's dataset_info.json, "swift": ms-swift's JSONL}.
    """
    from mllm_mer.data.synthetic import SyntheticConfig, ensure_synthetic_set
    from mllm_mer.prompts import load_prompt

    cfg = SyntheticConfig(seed=0, train_size=samples, dev_size=0, test_size=0, **CLIPS[clips])
    out = ensure_synthetic_set(root / "data" / f"{clips}-{samples}-{cfg.config_hash()[:10]}", cfg)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines() if line.strip()]
    instruction = load_prompt("explain").render(subtitle="", labels=", ".join(cfg.labels))
    system = load_prompt("system", kind="free").text
    sharegpt, swift = [], []
    for r in rows:
        answer = r["explanation"]
        sharegpt.append(  # LLaMA-Factory takes the video's own track as a second <audio> item of the same file
            {
                "id": r["id"],
                "system": system,
                "messages": [
                    {"role": "user", "content": "<video><audio>" + instruction},
                    {"role": "assistant", "content": answer},
                ],
                "videos": [r["video"]],
                "audios": [r["video"]],
            }
        )
        swift.append(
            {
                "id": r["id"],
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": "<video>" + instruction},
                    {"role": "assistant", "content": answer},
                ],
                "videos": [str((out / r["video"]).resolve())],
            }
        )
    paths = {
        "dir": out,
        "sharegpt": out / "train.sharegpt.json",
        "dataset_info": out / "dataset_info.json",
        "swift": out / "train.swift.jsonl",
    }
    paths["sharegpt"].write_text(json.dumps(sharegpt, indent=1))
    paths["swift"].write_text("".join(json.dumps(r) + "\n" for r in swift))
    info = {
        "mer_bench": {
            "file_name": paths["sharegpt"].name,
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "system": "system", "videos": "videos", "audios": "audios"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    paths["dataset_info"].write_text(json.dumps(info, indent=1))
    return paths


def tiny_thinker(root: Path) -> Path:
    from mllm_mer.backbone.tiny import ensure_tiny_thinker

    return ensure_tiny_thinker(root / "models" / "tiny-qwen2_5-omni")


_WRAP_OMNI = textwrap.dedent(
    """
    import sys, torch
    from transformers import (AutoProcessor, Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration,
                              Qwen2_5OmniThinkerForConditionalGeneration)
    src, dst = sys.argv[1], sys.argv[2]
    thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(src)
    config = Qwen2_5OmniConfig(thinker_config=thinker.config.to_dict(), enable_audio_output=False)
    model = Qwen2_5OmniForConditionalGeneration(config)
    missing, unexpected = model.thinker.load_state_dict(thinker.state_dict(), strict=True), None
    assert not model.has_talker
    model.save_pretrained(dst)
    AutoProcessor.from_pretrained(src).save_pretrained(dst)
    torch.save({}, dst + "/spk_dict.pt")
    print("wrapped", src, "->", dst)
    """
)


def omni_wrapper(root: Path, thinker: Path) -> Path:
    """The full-Omni wrapper ms-swift loads (built once with ms-swift's own transformers)."""
    dst = root / "models" / f"{thinker.name}-full"
    if (dst / "spk_dict.pt").is_file():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    python = venv_dir(root, PEERS["swift"]) / "bin" / "python"
    subprocess.run(
        [str(python), "-c", _WRAP_OMNI, str(thinker), str(tmp)], check=True, env=run_env(root, tmp)
    )
    os.replace(tmp, dst)
    return dst


# ----------------------------------------------------------------------------------------------- runs
def run_env(root: Path, work: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every run: one thread, offline, CPU, caches inside `root` / the run's folder."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(root / "hf_home"),
        "HF_DATASETS_CACHE": str(work / "hf_datasets"),
        "MODELSCOPE_CACHE": str(root / "modelscope"),
        "WANDB_DISABLED": "true",
        "DISABLE_VERSION_CHECK": "1",
        **(extra or {}),
    }
    env.pop("PYTHONPATH", None)
    return env


def llamafactory_command(
    root: Path, work: Path, data: dict[str, Path], model: Path, epochs: int
) -> list[str]:
    cfg = {
        "model_name_or_path": str(model),
        "trust_remote_code": False,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": LORA["r"],
        "lora_alpha": LORA["alpha"],
        "lora_dropout": LORA["dropout"],
        "lora_target": "q_proj,k_proj,v_proj,o_proj",
        "freeze_vision_tower": True,
        "freeze_multi_modal_projector": True,
        "disable_gradient_checkpointing": True,
        "dataset": "mer_bench",
        "dataset_dir": str(data["dir"]),
        "template": "qwen2_omni",
        "use_audio_in_video": True,
        "video_fps": VIDEO_FPS,
        "video_maxlen": 128,
        "video_max_pixels": 56 * 56,
        "video_min_pixels": 56 * 56,
        "cutoff_len": 8192,
        "overwrite_cache": True,
        "preprocessing_num_workers": None,
        "dataloader_num_workers": 0,
        "output_dir": str(work / "out"),
        "logging_steps": 10,
        "save_strategy": "no",
        "plot_loss": False,
        "overwrite_output_dir": True,
        "report_to": "none",
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": LR,
        "num_train_epochs": float(epochs),
        "lr_scheduler_type": "cosine",
        "warmup_ratio": WARMUP,
        "bf16": False,
        "ddp_timeout": 180000000,
        "seed": 0,
    }
    path = work / "llamafactory.yaml"
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return [str(venv_dir(root, PEERS["llamafactory"]) / "bin" / "llamafactory-cli"), "train", str(path)]


def swift_command(root: Path, work: Path, data: dict[str, Path], model: Path, epochs: int) -> list[str]:
    return [
        str(venv_dir(root, PEERS["swift"]) / "bin" / "swift"),
        "sft",
        "--model",
        str(model),
        "--model_type",
        "qwen2_5_omni",
        "--dataset",
        str(data["swift"]),
        "--split_dataset_ratio",
        "0",
        "--tuner_type",
        "lora",
        "--lora_rank",
        str(LORA["r"]),
        "--lora_alpha",
        str(LORA["alpha"]),
        "--lora_dropout",
        str(LORA["dropout"]),
        # the language model's attention (transformers < 5.20 names it thinker.model, not .language_model)
        "--target_regex",
        r"thinker\.model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
        "--freeze_vit",
        "true",
        "--freeze_aligner",
        "true",
        "--torch_dtype",
        "float32",
        "--gradient_checkpointing",
        "false",
        "--per_device_train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "1",
        "--learning_rate",
        str(LR),
        "--lr_scheduler_type",
        "cosine",
        "--warmup_ratio",
        str(WARMUP),
        "--num_train_epochs",
        str(epochs),
        "--max_length",
        "8192",
        "--logging_steps",
        "10",
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--report_to",
        "none",
        "--dataset_num_proc",
        "1",
        "--output_dir",
        str(work / "out"),
        "--seed",
        "0",
    ]


SWIFT_ENV = {
    "SWIFT_AUDIO_LOAD_BACKEND": "soundfile_pyav",
    "USE_AUDIO_IN_VIDEO": "true",
    "FPS": str(VIDEO_FPS),
    "FPS_MAX_FRAMES": "128",
    "VIDEO_MAX_TOKEN_NUM": "4",  # qwen-omni-utils' frame size in merged 28x28 tokens: 4 = 56x56
    "VIDEO_MIN_TOKEN_NUM": "4",
}


def ours_command(
    work: Path, data: dict[str, Path], model: Path, epochs: int, feature_cache: bool, launcher: bool = False
) -> list[str]:
    """`python scripts/finetune.py ...` (one process), or through `accelerate launch` with `launcher`."""
    overrides = [
        f"model.path={model}",
        "model.build_tiny=false",
        "data.synthetic_dir=null",
        "data.format=sharegpt",
        f"data.train={data['sharegpt']}",
        "data.dev=",
        f"data.cache_dir={work / 'decoded'}",
        f"lora.r={LORA['r']}",
        f"lora.alpha={LORA['alpha']}",
        f"lora.dropout={LORA['dropout']}",
        f"train.lr={LR}",
        f"train.warmup_ratio={WARMUP}",
        "train.batch_size=1",
        f"train.epochs={epochs}",
        "train.save_every=0",
        "train.log_every=10",
        "train.torch_threads=1",
        f"train.output_dir={work / 'out'}",
    ]
    # the default leaves data.feature_cache unset (auto: on, every tower frozen); its cache starts empty
    overrides.append(f"data.feature_cache_dir={work / 'features'}")
    if not feature_cache:
        overrides.append("data.feature_cache=false")
    script = [str(REPO / "scripts" / "finetune.py"), *overrides]
    if not launcher:
        return [sys.executable, *script]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    return [*launch, "--mixed_precision", "no", "--dynamo_backend", "no", *script]


@dataclass
class RunResult:
    row: str
    clips: str
    epochs: int
    cpu: float
    wall: float


def run_one(
    root: Path,
    row: str,
    clips: str,
    data: dict[str, Path],
    models: dict[str, Path],
    epochs: int,
    round_no: int,
    keep: bool,
) -> RunResult:
    """Train `row` for `epochs` epochs in a fresh folder; (user+sys CPU of the process tree, wall) seconds."""
    work = root / "runs" / f"{clips}-{row}-e{epochs}-r{round_no}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    extra: dict[str, str] = {}
    if row == "llamafactory":
        cmd = llamafactory_command(root, work, data, models["thinker"], epochs)
    elif row == "swift":
        cmd, extra = swift_command(root, work, data, models["omni"], epochs), SWIFT_ENV
    else:
        cmd = ours_command(
            work, data, models["thinker"], epochs, feature_cache=row != "ours_nocache", launcher=row == "ours_launch"
        )
    log = work / "log.txt"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(
            cmd,
            cwd=REPO if row.startswith("ours") else work,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=run_env(root, work, extra),
            check=False,
        )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(
            f"{row} ({clips}, {epochs} epochs) failed with exit code {proc.returncode}; log {log}:\n{tail}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if not keep:  # keep the log; drop weights, caches and checkpoints
        for child in work.iterdir():
            if child != log:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    print(f"  {clips:6s} {row:12s} {epochs} epoch(s): cpu {cpu:7.2f} s  wall {wall:7.2f} s", flush=True)
    return RunResult(row, clips, epochs, cpu, wall)


# --------------------------------------------------------------------------------------------- report
def summarize(results: list[RunResult], rows: list[str], clip_sets: list[str], n: int, m: int) -> dict:
    """Per clip set and row: marginal epochs per round, their median/min/max, and the N-epoch run's times."""
    out: dict = {}
    for clips in clip_sets:
        out[clips] = {}
        for row in rows:
            short = [r for r in results if (r.row, r.clips, r.epochs) == (row, clips, n)]
            long = [r for r in results if (r.row, r.clips, r.epochs) == (row, clips, m)]
            marginal = [(b.cpu - a.cpu) / (m - n) for a, b in zip(short, long, strict=False)]
            if not marginal:
                continue
            out[clips][row] = {
                "epoch_cpu_s": statistics.median(marginal),
                "epoch_cpu_s_min_max": [min(marginal), max(marginal)],
                "epoch_cpu_s_rounds": marginal,
                "run_cpu_s": statistics.median(r.cpu for r in short),
                "run_wall_s": statistics.median(r.wall for r in short),
                "run_wall_s_min_max": [min(r.wall for r in short), max(r.wall for r in short)],
                f"run{m}_cpu_s": statistics.median(r.cpu for r in long),
            }
        for row in [r for r in rows if r.startswith("ours") and r in out[clips]]:
            mine = out[clips][row]["epoch_cpu_s_rounds"]
            ratios = {  # paired: each round's ours / the same round's peer, then the median
                p: [a / b for a, b in zip(mine, out[clips][p]["epoch_cpu_s_rounds"], strict=False)]
                for p in PEERS
                if p in out[clips]
            }
            out[clips][row]["epoch_ratio_to"] = {p: statistics.median(r) for p, r in ratios.items()}
            out[clips][row]["epoch_ratio_to_rounds"] = ratios
            runs = {p: [r for r in results if (r.row, r.clips, r.epochs) == (p, clips, n)] for p in [row, *ratios]}
            out[clips][row]["run_ratio_to"] = {  # the whole N-epoch run's CPU, paired per round the same way
                p: statistics.median(a.cpu / b.cpu for a, b in zip(runs[row], runs[p], strict=False)) for p in ratios
            }
    return out


DIFFERENCES = (
    "mllm_mer also trains its fused classification head and appends '\\nEmotion: <label>' to the answer "
    "(about five tokens); the peers train the LM loss on the explanation alone",
    "mllm_mer checks every clip before loading the model, fills its frozen-encoder cache (default row: every "
    "clip decoded and encoded once, in the N-epoch run's time, not in the marginal epoch) and writes a final "
    "accelerate checkpoint besides the adapter; LLaMA-Factory tokenizes the whole set (running its media "
    "processors) before training and saves the adapter; ms-swift tokenizes lazily (each step) and, with "
    "--save_strategy no, saves nothing",
    "DataLoader workers: each framework's default (mllm_mer's default config: 1 for the decoding loader, "
    "ours_nocache; the frozen-encoder cache's loader, ours, reads in the main process; LLaMA-Factory: 0; "
    "ms-swift: its default); worker CPU is in the process tree",
    "each peer runs with the transformers / peft / accelerate its own pins resolve to (see 'versions')",
    "start-up: `python scripts/finetune.py` (ours) and `llamafactory-cli train` train in one process on one "
    "device; `accelerate launch` (ours_launch) and `swift sft` start a second Python",
    "mllm_mer runs in the interpreter that runs this script: in the project's dev venv bitsandbytes and "
    "deepspeed are installed too (the qlora / deepspeed extras); finetune.py keeps bitsandbytes out of a run "
    "without quantization (mllm_mer.startup), as in the peers' venvs, which have neither",
)


def print_table(summary: dict, rows: list[str], n: int, m: int) -> None:
    peers = [r for r in rows if r in PEERS]
    ours = [r for r in rows if r.startswith("ours")]
    for clips, by_row in summary.items():
        geo = CLIPS[clips]
        print(
            f"\n{clips} clips ({geo['frame_size']} px, {geo['fps']} fps, {geo['clip_seconds']:g} s): "
            f"marginal epoch = (CPU of {m} epochs - CPU of {n}) / {m - n}, median over rounds; "
            "'/ peer' = median over rounds of (ours / that peer in the same round); 'run / peer': the same for "
            f"the whole {n}-epoch run's CPU"
        )
        head = f"{'row':36s} {'CPU s/epoch':>12s} {'(min-max)':>15s} {f'{n}-ep run CPU s':>16s} {f'{n}-ep wall s':>13s}"
        head += "".join(f" {'/ ' + p:>16s}" for p in peers)
        head += "".join(f" {f'{n}-ep run / ' + p:>24s}" for p in peers)
        print(head)
        for row in rows:
            if row not in by_row:
                continue
            s = by_row[row]
            lo, hi = s["epoch_cpu_s_min_max"]
            line = (
                f"{DISPLAY[row]:36s} {s['epoch_cpu_s']:12.2f} {f'({lo:.2f}-{hi:.2f})':>15s} "
                f"{s['run_cpu_s']:16.2f} {s['run_wall_s']:13.2f}"
            )
            if row in ours:
                for key, width in (("epoch_ratio_to", 15), ("run_ratio_to", 23)):
                    for p in peers:
                        if p in s.get(key, {}):
                            line += f" {s[key][p]:{width}.2f}x"
            print(line)
    print("\ndifferences that remain:")
    for d in DIFFERENCES:
        print(f"  - {d}")


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".cache/peers", help="venvs, clips, models and runs live here")
    p.add_argument("--setup", action="store_true", help="create the peers' venvs first (once; ~7 GB each)")
    p.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows of {list(ROWS)}")
    p.add_argument("--clips", default="toy,camera", help=f"comma-separated clip sets of {list(CLIPS)}")
    p.add_argument("--samples", type=int, default=40, help="training clips")
    p.add_argument("--epochs", type=int, nargs=2, default=(1, 4), metavar=("N", "M"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default=None, help="a tiny thinker directory (default: built under --root)")
    p.add_argument(
        "--keep-runs", action="store_true", help="keep every run's outputs (default: its log only)"
    )
    p.add_argument("--json", default=None, help="also write the summary JSON here")
    args = p.parse_args()
    root = Path(args.root).resolve()
    rows = [r.strip() for r in args.only.split(",") if r.strip()]
    clip_sets = [c.strip() for c in args.clips.split(",") if c.strip()]
    bad = [r for r in rows if r not in ROWS] + [c for c in clip_sets if c not in CLIPS]
    n, m = args.epochs
    if bad or not rows or not clip_sets or not 0 < n < m:
        p.error(f"unknown rows/clip sets {bad}, or epochs not 0 < N < M ({n}, {m})")
    if args.setup:
        setup(root, [PEERS[r] for r in rows if r in PEERS])
    missing = [r for r in rows if r in PEERS and not peer_ready(root, PEERS[r])]
    if missing:
        print(
            f"peers not set up under {root}: {missing}; measuring the other rows.\n{setup_hint(root)}\n"
            f"(or pass --only ours,ours_nocache to measure mllm_mer alone)",
            flush=True,
        )
        rows = [r for r in rows if r not in missing]
        if not rows:
            raise SystemExit(1)
    root.mkdir(parents=True, exist_ok=True)
    models = {"thinker": Path(args.model).resolve() if args.model else tiny_thinker(root)}
    if "swift" in rows:
        models["omni"] = omni_wrapper(root, models["thinker"])
    data = {c: write_clip_set(root, c, args.samples) for c in clip_sets}
    versions = {PEERS[r].display: peer_versions(root, PEERS[r]) for r in rows if r in PEERS}
    import accelerate
    import peft
    import torch
    import transformers

    versions["mllm_mer"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }
    print(f"rows {rows}, clips {clip_sets}, {args.samples} clips, epochs {n} and {m}, {args.rounds} round(s)")
    print("versions: " + json.dumps(versions))
    results: list[RunResult] = []
    for round_no in range(args.rounds):
        print(f"round {round_no + 1}/{args.rounds}", flush=True)
        for clips in clip_sets:
            for epochs in (n, m):
                order = rows if round_no % 2 == 0 else rows[::-1]
                for row in order:
                    results.append(
                        run_one(root, row, clips, data[clips], models, epochs, round_no, args.keep_runs)
                    )
    summary = summarize(results, rows, clip_sets, n, m)
    report = {
        "bench": "peer_epoch_time",
        "samples": args.samples,
        "epochs": [n, m],
        "rounds": args.rounds,
        "batch_size": 1,
        "lora": LORA,
        "clips": {c: CLIPS[c] for c in clip_sets},
        "versions": versions,
        "results": summary,
        "runs": [r.__dict__ for r in results],
        "differences": list(DIFFERENCES),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print_table(summary, rows, n, m)


if __name__ == "__main__":
    main()
