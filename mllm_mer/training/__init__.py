"""Training pieces used by `scripts/finetune.py` (the script owns the loop; see DESIGN.md).

`checkpoint` (loop position, atomic checkpoints, resume), `run_dir` (config, run info, data report, final
weights), `loop` (accelerator, optimizer and schedule, NaN / time guard, epochs, step logging) and
`evaluate` (dev metrics). The loaders live in `mllm_mer.data.loading`.
"""
