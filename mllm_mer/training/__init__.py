"""Training pieces used by `scripts/finetune.py` (the script owns the loop; see DESIGN.md).

`checkpoint` (loop position, atomic checkpoints, verified resume), `run_dir` (config, run info, data report,
final weights), `ownership` (the output directory's lock, refusing another run's directory), `identity` (what
makes two configs the same run), `loop` (accelerator, optimizer and schedule, NaN / time guard, epochs, step
logging) and `evaluate` (dev metrics). The loaders live in `mllm_mer.data.loading`.
"""
