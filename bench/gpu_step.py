"""One training step of a random-init Qwen2.5-Omni-7B thinker on a GPU: LoRA vs QLoRA, side by side.

    python bench/gpu_step.py                      # needs CUDA; elsewhere prints a skip line and exits 0
    python bench/gpu_step.py --batch-size 2 --video-seconds 30 --size 336 --rounds 5

The thinker is built from `configs/model_configs/qwen2_5_omni_7b_thinker.json` (published architecture, random
weights, bf16). Two variants are held on the device together and stepped alternately (A B A B, after one
warm-up each):

    lora    bf16 base, LoRA r=8 on the language model's q/k/v/o (peft), towers frozen
    qlora   the same with the language model's linear layers in 4-bit NF4 (bitsandbytes; towers and lm_head
            stay bf16), as `model.quantization=nf4` loads it

Each sample is one video (`--video-seconds` at `--fps`, `--size` pixels square: T/2 x size/14 x size/14
patches) and 30 s of audio (3000 mel frames -> 750 audio tokens), laid out as
`<vision_bos><VIDEO>xN<vision_eos><audio_bos><AUDIO>xM<audio_eos>` + a short text, with an LM loss on the
text. Gradient checkpointing is on (off with --no-checkpointing).

Reported per variant: step time (median), language-model tokens/s, model FLOPs utilisation and peak memory.
Model FLOPs per step (hardware recompute not counted): language model 4 N T (forward + activation gradients;
the frozen weights get no weight gradients) + causal attention 2 L T^2 d (forward + backward), towers
forward only 2 N_tower x (audio frames after the conv stem, video patches). MFU = model FLOPs / step time /
peak bf16 FLOP/s (H100 / H200 dense: 989 TFLOP/s; `--peak-tflops` for others). Peak memory = the largest
allocation during the variant's steps minus the other variant's resident weights. Prints one JSON line,
then `qlora / lora` step-time and peak-memory ratios as the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}
LM_TARGETS = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


def build(config_file: Path, device: torch.device, quantize: bool, checkpointing: bool) -> torch.nn.Module:
    """Random-init thinker in bf16 on `device` (language-model linears in NF4 when `quantize`) + LoRA r=8."""
    import peft
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    config = Qwen2_5OmniThinkerConfig.from_json_file(str(config_file))
    config.text_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.requires_grad_(False)
    if quantize:
        quantize_language_model_(model, device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LM_TARGETS, bias="none")
    return peft.get_peft_model(model, lora)


def quantize_language_model_(model: torch.nn.Module, device: torch.device) -> None:
    """Replace every nn.Linear of the language model by a bitsandbytes NF4 Linear4bit (in place)."""
    import bitsandbytes as bnb

    lm = model.model.language_model
    for module in list(lm.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
                device="cpu",
            )
            q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.cpu(), requires_grad=False)
            setattr(module, child_name, q.to(device))  # quantizes on the move to the device
            del child
    torch.cuda.empty_cache() if device.type == "cuda" else None


def make_batch(
    config, batch_size: int, video_seconds: float, fps: float, size: int, device: torch.device
) -> dict:
    """Random features and the token layout for `batch_size` samples (one video + 30 s audio each)."""
    v = config.vision_config
    frames = max(
        v.temporal_patch_size,
        int(round(video_seconds * fps)) // v.temporal_patch_size * v.temporal_patch_size,
    )
    grid = (frames // v.temporal_patch_size, size // v.patch_size, size // v.patch_size)
    patches = grid[0] * grid[1] * grid[2]
    video_tokens = patches // v.spatial_merge_size**2
    mel_frames = 3000  # 30 s at 100 frames/s (Whisper window)
    audio_tokens = ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1
    text = list(range(10, 61))  # ordinary (non-special) token ids: a short prompt + answer stand-in
    ids = (
        text[:3]
        + [config.vision_start_token_id]
        + [config.video_token_id] * video_tokens
        + [config.vision_end_token_id, config.audio_start_token_id]
        + [config.audio_token_id] * audio_tokens
        + [config.audio_end_token_id]
        + text[3:]
    )
    input_ids = torch.tensor([ids] * batch_size, device=device)
    labels = torch.full_like(input_ids, -100)
    labels[:, -48:] = input_ids[:, -48:]
    width = v.in_channels * v.temporal_patch_size * v.patch_size**2
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values_videos": torch.randn(batch_size * patches, width, device=device, dtype=torch.bfloat16),
        "video_grid_thw": torch.tensor([grid] * batch_size, device=device),
        "video_second_per_grid": torch.full((batch_size,), v.temporal_patch_size / fps, device=device),
        "input_features": torch.randn(
            batch_size, config.audio_config.num_mel_bins, mel_frames, device=device, dtype=torch.bfloat16
        ),
        "feature_attention_mask": torch.ones(batch_size, mel_frames, dtype=torch.long, device=device),
        "_counts": {
            "tokens": input_ids.numel(),
            "seq": input_ids.shape[1],
            "video_patches": batch_size * patches,
            "audio_frames": batch_size * mel_frames // 2,
        },
    }


def model_flops(config, counts: dict, n_lm: int, n_audio: int, n_vision: int) -> float:
    """Model FLOPs of one LoRA training step (module docstring)."""
    t = config.text_config
    lm = 4.0 * n_lm * counts["tokens"]
    attention = 2.0 * t.num_hidden_layers * counts["tokens"] * counts["seq"] * t.hidden_size
    towers = 2.0 * n_audio * counts["audio_frames"] + 2.0 * n_vision * counts["video_patches"]
    return lm + attention + towers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model-config", default=str(REPO / "configs" / "model_configs" / "qwen2_5_omni_7b_thinker.json")
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--video-seconds", type=float, default=30.0)
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--size", type=int, default=336, help="video frame side in pixels (multiple of 28)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 dense peak of the GPU (default: by name)"
    )
    p.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run on CPU anyway (a functional check with a tiny "
        "--model-config; the figures mean nothing there)",
    )
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_step: skipped (no CUDA device here; run it on a GPU machine)")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    models = {
        name: build(Path(args.model_config), device, name == "qlora", not args.no_checkpointing)
        for name in ("lora", "qlora")
    }
    for m in models.values():
        m.train()
    config = models["lora"].get_base_model().config
    batch = make_batch(config, args.batch_size, args.video_seconds, args.fps, args.size, device)
    counts = batch.pop("_counts")
    base = models["lora"].get_base_model().model
    n_lm = sum(p.numel() for n, p in base.language_model.named_parameters() if "embed_tokens" not in n)
    n_lm += models["lora"].get_base_model().lm_head.weight.numel()
    flops = model_flops(
        config,
        counts,
        n_lm,
        sum(p.numel() for p in base.audio_tower.parameters()),
        sum(p.numel() for p in base.visual.parameters()),
    )
    resident = {n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in models.items()}
    opts = {
        n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for n, m in models.items()
    }

    def step(name: str) -> tuple[float, int]:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = models[name](**batch)
        out.loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        return time.perf_counter() - start, peak

    step("lora"), step("qlora")  # warm-up
    times: dict[str, list[float]] = {"lora": [], "qlora": []}
    peaks: dict[str, int] = {"lora": 0, "qlora": 0}
    for _ in range(args.rounds):
        for name in ("lora", "qlora"):
            t, peak = step(name)
            times[name].append(t)
            other = "qlora" if name == "lora" else "lora"
            peaks[name] = max(peaks[name], peak - resident[other])
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    report = {}
    for name in ("lora", "qlora"):
        median = statistics.median(times[name])
        report[name] = {
            "step_s": median,
            "tokens_per_s": counts["tokens"] / median,
            "mfu": (flops / median / (peak_tflops * 1e12)) if peak_tflops else None,
            "peak_memory_gib": peaks[name] / 2**30,
            "weights_gib": resident[name] / 2**30,
        }
    print(
        json.dumps(
            {
                "bench": "gpu_step",
                "device": gpu,
                "model_config": args.model_config,
                "batch_size": args.batch_size,
                "tokens_per_sample": counts["seq"],
                "video_patches": counts["video_patches"],
                "audio_frames": counts["audio_frames"],
                "checkpointing": not args.no_checkpointing,
                "model_tflops_per_step": flops / 1e12,
                "peak_tflops": peak_tflops,
                "rounds": args.rounds,
                "variants": report,
            }
        )
    )
    ratio_t = statistics.median(q / lo for q, lo in zip(times["qlora"], times["lora"], strict=True))
    ratio_m = peaks["qlora"] / peaks["lora"] if peaks["lora"] else float("nan")
    print(f"qlora / lora: step time {ratio_t:.2f}, peak memory {ratio_m:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
