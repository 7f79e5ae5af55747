"""A newcomer's first run: quiet output, the summary and its commands, no settings left behind, --verbose."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.smoke.conftest import REPO, base_args, check

pytestmark = pytest.mark.smoke

NOISE = ("Warning", "INFO", "Saving current state", "were not passed to `accelerate launch`",
         "Setting accelerator to CPU", "Loading weights", "Writing model shards")
"""Text that only third-party noise prints (warnings, INFO lines, accelerate's banner, library bars)."""

IN_PROCESS = """
import json, sys
sys.path.insert(0, {scripts!r})
import accelerate.utils, datasets, matplotlib.backends.backend_agg, peft, transformers  # noqa: import-time state
if accelerate.utils.is_deepspeed_available():
    import deepspeed  # noqa: accelerate imports it during the run; its own import-time logger setup is not ours
import finetune
import mllm_mer.cache, mllm_mer.generation
from mllm_mer.logs import library_state

def state():
    return {{k: repr(v) for k, v in library_state().items()}}

before = state()
rc = finetune.main({argv!r})
after = state()
print(json.dumps({{"rc": rc, "changed": {{k: [before[k], after[k]] for k in before if before[k] != after[k]}}}}))
"""


def run_in_process(argv: list[str], tmp_path) -> tuple[dict, str]:
    """`scripts/finetune.py`'s `main(argv)` inside one fresh Python process that compares every output setting
    of the libraries (warning filters, loggers, progress bars) before and after; (result, full output)."""
    code = IN_PROCESS.format(scripts=str(REPO / "scripts"), argv=argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "verbose", [pytest.param(False, marks=pytest.mark.slow), True], ids=["quiet", "verbose"]
)  # quiet output: test_quiet_run_prints_our_lines_and_a_summary_whose_commands_work
def test_no_setting_leaks_after_a_run_and_verbose_restores_the_full_log(tiny_dir, syn_dir, tmp_path, verbose):
    args = [*base_args(tiny_dir, syn_dir, tmp_path / "run", tmp_path / "c"), "train.max_steps=2",
            "train.save_every=1"]
    result, out = run_in_process(["--verbose", *args] if verbose else args, tmp_path)
    assert result == {"rc": 0, "changed": {}}  # warnings.filters, loggers, transformers/datasets bars: as before
    verbose_only = ("Saving current state to", "is_gradient_checkpointing", "INFO mllm_mer.backbone.loader")
    for text in verbose_only:  # accelerate's save lines, the peft/transformers FutureWarning, our INFO lines
        assert (text in out) == verbose, text
    assert out.count("saved checkpoint ") == 2 and "next:" in out


def test_quiet_run_prints_our_lines_and_a_summary_whose_commands_work(trained_run, tmp_path):
    run, out = trained_run  # a quiet 6-step run, checkpoints at 2, 4, 6
    for text in NOISE:
        assert text not in out, (text, out[-3000:])
    assert out.count("saved checkpoint ") == 3 and "[dev step 6] accuracy=" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["feature_cache"] is True  # the default
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert [json.loads(line)["step"] for line in (run / "dev_log.jsonl").read_text().splitlines()][-1] == 6
    summary = out[out.index(f"run {run} finished at step 6; frozen-encoder cache on"):]
    assert "best (step" in summary and "chance" in summary and f"curves: {run / 'curves.png'}" in summary
    commands = dict(line.split(maxsplit=1) for line in summary.split("next:\n")[1].splitlines()[:3])
    assert set(commands) == {"generate", "evaluate", "export"}
    copy = tmp_path / "run"  # the session's run is shared: the printed commands run on a copy
    shutil.copytree(run, copy)
    for what in ("generate", "evaluate", "export"):
        cmd = shlex.split(commands[what].replace(str(run), str(copy)))
        check(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600))
    assert (copy / "preds_dev.jsonl").is_file() and (copy / "eval_dev.json").is_file()
    assert (copy / "export" / "config.json").is_file()


def test_summary_explanations_hook_generates_for_dev_clips_beside_their_cues(trained_run, syn_dir):
    """`train.summary_explanations=N` (off by default until the backbone can speak): N dev clips' answers."""
    from mllm_mer.config import load_run_config
    from mllm_mer.data.jsonl import read_jsonl
    from mllm_mer.training.summary import sample_explanations

    run, _ = trained_run
    cfg = load_run_config(run, ["generate.max_new_tokens=6"])
    dev = read_jsonl(syn_dir / "dev.jsonl", cfg.data.labels)
    lines = sample_explanations(cfg, dev, 2).splitlines()
    assert lines[0] == "explanations of 2 dev clip(s) (prompt explain):" and len(lines) == 5
    for sample, (head, said) in zip(dev[:2], (lines[1:3], lines[3:5]), strict=True):
        cues = ", ".join(f"{k}={v}" for k, v in sample.cues.items())
        assert head.startswith(f"  {sample.id} [{sample.subset}] true {sample.label} (cues: {cues}) -> answered ")
        assert said.startswith('    "') and said.endswith('"')
