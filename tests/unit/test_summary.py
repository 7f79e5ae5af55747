"""The end-of-run summary pieces (`mllm_mer.training.summary`): logs, chance, best step, curves, commands."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mllm_mer.config import load_config
from mllm_mer.data.schema import Sample
from mllm_mer.training import summary as S


def sample(i: int, label: str, subset: str) -> Sample:
    return Sample(id=f"s{i}", video=None, audio=None, label=label, subset=subset)


def dev_metrics(acc: float, **subsets: float) -> dict:
    return {"accuracy": acc, "weighted_f1": acc - 0.1, "loss": 1.0,
            "per_subset": {k: {"accuracy": v} for k, v in subsets.items()}}


def test_dev_log_keeps_the_last_row_of_a_repeated_step_and_finds_the_best(tmp_path):
    S.append_dev_row(tmp_path, 10, dev_metrics(0.5, consistent=0.6))
    S.append_dev_row(tmp_path, 20, dev_metrics(0.9, consistent=1.0))
    S.append_dev_row(tmp_path, 20, dev_metrics(0.8, consistent=0.9))  # a resumed run evaluated step 20 again
    (tmp_path / S.DEV_LOG).open("a").write('{"step": 30, "accur')  # killed mid-write
    rows = S.read_log(tmp_path / S.DEV_LOG)
    assert [r["step"] for r in rows] == [10, 20] and rows[1]["accuracy"] == 0.8
    assert S.best_dev(rows)["step"] == 20
    assert S.best_dev([{"step": 5, "accuracy": 0.7}, {"step": 9, "accuracy": 0.7}])["step"] == 5
    assert S.best_dev([]) is None


def test_chance_is_the_most_frequent_label_overall_and_per_subset():
    dev = [sample(0, "happy", "consistent"), sample(1, "happy", "consistent"), sample(2, "sad", "consistent"),
           sample(3, "sad", "audio_aligned"), sample(4, "angry", "audio_aligned")]
    assert S.chance_levels(dev) == {"all": 0.4, "consistent": 2 / 3, "audio_aligned": 0.5}


def test_summary_table_curves_and_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("dev", "test"):
        (data / f"{split}.jsonl").write_text("")
    with (run / S.TRAIN_LOG).open("w") as fh:
        for step in (1, 2, 3, 4):
            fh.write(json.dumps({"step": step, "loss": 2.0 / step, "lm_loss": 1.5 / step, "cls_loss": 0.5}) + "\n")
    S.append_dev_row(run, 2, dev_metrics(0.75, consistent=1.0, audio_aligned=0.5))
    S.append_dev_row(run, 4, dev_metrics(0.5, consistent=0.5, audio_aligned=0.5))
    cfg = load_config(None, ["train.output_dir=runs/r", f"data.train={data / 'dev.jsonl'}",
                             f"data.dev={data / 'dev.jsonl'}", f"data.test={data / 'test.jsonl'}"])
    dev = [sample(0, "happy", "consistent"), sample(1, "sad", "consistent"), sample(2, "sad", "audio_aligned"),
           sample(3, "angry", "audio_aligned")]
    final = {"dev": dev_metrics(0.5, consistent=0.5, audio_aligned=0.5), "step": 4}
    text = S.write_summary(cfg, final, dev, scripts_dir=tmp_path / "scripts")
    assert (run / S.CURVES).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = text.splitlines()
    assert lines[0] == "run runs/r finished at step 4; frozen-encoder cache on (.cache/mllm_mer/features)"
    assert "best (step 2)" in lines[1] and "chance" in lines[1]
    acc = next(line for line in lines if line.strip().startswith("accuracy")).split()
    assert acc[1:] == ["0.500", "0.750", "0.500"]  # final, best, chance
    consistent = next(line for line in lines if line.strip().startswith("consistent")).split()
    assert consistent[1:] == ["0.500", "1.000", "0.500"]
    assert "curves: runs/r/curves.png" in lines
    commands = dict(S.next_commands(cfg, tmp_path / "scripts", python="python"))
    assert commands["generate"] == ("python scripts/generate.py --run runs/r --data data/test.jsonl --prompt explain "
                                    "--output runs/r/preds_test.jsonl")
    assert "synthetic --run runs/r --predictions runs/r/preds_test.jsonl --references data/test.jsonl" in (
        commands["evaluate"])
    assert commands["export"].endswith("--out runs/r/export")
    (run / "export").mkdir()  # export refuses an existing folder: the command names a new one
    assert dict(S.next_commands(cfg, tmp_path / "scripts"))["export"].endswith("--out runs/r/export-2")
    assert all(f"  {what}" in text for what in ("generate", "evaluate", "export"))
    label_run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prompt="label"))
    assert " --prompt label --output " in dict(S.next_commands(label_run, tmp_path / "scripts"))["generate"]


def test_curves_without_logs_is_none(tmp_path):
    assert S.write_curves(Path(tmp_path)) is None


def test_sample_explanations_spread_over_subsets():
    samples = [Sample(id=f"{sub}{i}", video=None, audio=None, label="happy", subset=sub)
               for sub in ("consistent", "video_aligned", "audio_aligned") for i in range(3)]
    assert [s.id for s in S.spread_by_subset(samples, 4)] == ["consistent0", "video_aligned0", "audio_aligned0",
                                                            "consistent1"]
    assert [s.id for s in S.spread_by_subset(samples[:2], 5)] == ["consistent0", "consistent1"]
    assert S.spread_by_subset([], 3) == []
