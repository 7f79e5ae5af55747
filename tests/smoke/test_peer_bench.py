"""bench/peer_epoch_time.py without the peers: it says how to set them up, and measures mllm_mer alone.

The peers' venvs (about 7 GB each) are never created here; their figures are not checked (no timed tests):
only that the bench writes the clips in every framework's format from one source, trains the number of
epochs it says, and reports the marginal epoch from the runs it made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "peer_epoch_time.py"

pytestmark = pytest.mark.smoke


def run_bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(BENCH), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_peers_missing_says_how_to_set_them_up(tmp_path):
    proc = run_bench("--root", str(tmp_path / "peers"), "--only", "llamafactory,swift", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "['llamafactory', 'swift']" in out and "--setup" in out and "apt-get install -y ffmpeg" in out
    assert "--only ours" in out
    assert not (tmp_path / "peers" / "llamafactory" / "venv").exists()  # nothing installed without --setup


@pytest.mark.slow  # two real runs of ours (~90 s CPU): the bench tier
def test_ours_only_measures_the_marginal_epoch(tiny_dir, tmp_path):
    root, report = tmp_path / "peers", tmp_path / "report.json"
    proc = run_bench(
        "--root",
        str(root),
        "--only",
        "ours",
        "--clips",
        "toy",
        "--samples",
        "2",
        "--epochs",
        "1",
        "2",
        "--rounds",
        "1",
        "--model",
        str(tiny_dir),
        "--keep-runs",
        "--json",
        str(report),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    row = json.loads(report.read_text())
    assert [(r["row"], r["epochs"]) for r in row["runs"]] == [("ours", 1), ("ours", 2)]
    cpu = {r["epochs"]: r["cpu"] for r in row["runs"]}
    assert all(c > 0 for c in cpu.values())
    ours = row["results"]["toy"]["ours"]
    assert ours["epoch_cpu_s"] == pytest.approx(cpu[2] - cpu[1]) and ours["run_cpu_s"] == cpu[1]
    # each run trained exactly its epochs: 2 clips, batch 1
    for epochs in (1, 2):
        final = json.loads(
            (root / "runs" / f"toy-ours-e{epochs}-r0" / "out" / "final_metrics.json").read_text()
        )
        assert final["step"] == 2 * epochs
    # one clip set, written in each framework's format with the same clips and answers
    (clip_set,) = (root / "data").iterdir()
    ours_rows = [json.loads(x) for x in (clip_set / "train.jsonl").read_text().splitlines()]
    sharegpt = json.loads((clip_set / "train.sharegpt.json").read_text())
    swift = [json.loads(x) for x in (clip_set / "train.swift.jsonl").read_text().splitlines()]
    assert [r["id"] for r in sharegpt] == [r["id"] for r in swift] == [r["id"] for r in ours_rows]
    for src, lf, sw in zip(ours_rows, sharegpt, swift, strict=True):
        assert (
            lf["videos"] == lf["audios"] == [src["video"]]
        )  # the video's own track, as LLaMA-Factory takes it
        assert lf["messages"][0]["content"].startswith("<video><audio>")
        assert Path(sw["videos"][0]) == (clip_set / src["video"]).resolve()
        assert lf["messages"][1]["content"] == sw["messages"][2]["content"] == src["explanation"]
        assert (
            lf["messages"][0]["content"][len("<video><audio>") :]
            == sw["messages"][1]["content"][len("<video>") :]
        )
    info = json.loads((clip_set / "dataset_info.json").read_text())
    assert info["mer_bench"]["file_name"] == "train.sharegpt.json"
    assert "mllm_mer default" in proc.stdout and "differences that remain" in proc.stdout
