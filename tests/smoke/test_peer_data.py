"""A run trained on LLaMA-Factory sharegpt / ms-swift data (converted from the synthetic set) trains and predicts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.smoke.conftest import REPO, base_args, check, run_finetune

pytestmark = pytest.mark.smoke


def to_sharegpt(rows: list[dict]) -> list[dict]:
    return [{"id": r["id"], "messages": [
        {"role": "user", "content": f"<video>Subtitle: {r['subtitle']} What is the emotion?"},
        {"role": "assistant", "content": f"{r['explanation']} Emotion: {r['label']}"}],
        "videos": [r["video"]]} for r in rows]


@pytest.mark.parametrize("fmt", ["sharegpt", pytest.param("swift", marks=pytest.mark.slow)])  # readers: unit tests
def test_train_and_generate_on_peer_format(fmt, tiny_dir, syn_dir, tmp_path):
    shutil.copytree(syn_dir / "media", tmp_path / "media")  # the peer files live in tmp_path, beside the clips
    files = {}
    for split in ("train", "dev"):
        rows = [json.loads(line) for line in (syn_dir / f"{split}.jsonl").read_text().splitlines()][:8]
        records = to_sharegpt(rows)
        path = tmp_path / f"{split}.{fmt}.{'json' if fmt == 'sharegpt' else 'jsonl'}"
        if fmt == "sharegpt":
            path.write_text(json.dumps(records))
        else:
            path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        files[split] = path
    out = tmp_path / "run"
    args = [*base_args(tiny_dir, syn_dir, out, tmp_path / "cache"), f"data.format={fmt}",
            f"data.train={files['train']}", f"data.dev={files['dev']}", "train.max_steps=2"]
    log = check(run_finetune(args))
    assert "[dev step 2] accuracy=" in log
    preds = tmp_path / "preds.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), "--run", str(out), "--data",
                           str(files["dev"]), "--prompt", "label", "--output", str(preds), "--max-new-tokens", "2"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(preds.read_text().splitlines()) == 8


def test_llamafactory_file_with_media_in_a_sibling_folder_trains_with_media_root(tiny_dir, syn_dir, tmp_path):
    clips, ann = tmp_path / "clips", tmp_path / "annotations"  # LLaMA-Factory's media_dir beside the data folder
    shutil.copytree(syn_dir / "media", clips / "media")
    ann.mkdir()
    files = {}
    for split in ("train", "dev"):
        rows = [json.loads(line) for line in (syn_dir / f"{split}.jsonl").read_text().splitlines()][:8]
        files[split] = ann / f"{split}.json"
        files[split].write_text(json.dumps(to_sharegpt(rows)))
    args = [*base_args(tiny_dir, syn_dir, tmp_path / "run", tmp_path / "cache"), "data.format=sharegpt",
            f"data.train={files['train']}", f"data.dev={files['dev']}", "train.max_steps=1"]
    proc = run_finetune(args)  # relative to the file's own folder, the clips are not there
    # the script exits 2; accelerate's single-process launcher reports a failed child as 1
    assert proc.returncode in (1, 2) and "not found" in proc.stderr, proc.stderr[-2000:]
    log = check(run_finetune([*args, f"data.media_root={clips}"]))
    assert "[dev step 1] accuracy=" in log
    outside = tmp_path / "elsewhere" / "x.mp4"  # a real clip, but outside the named root
    outside.parent.mkdir()
    shutil.copy(clips / "media" / f"{json.loads(files['train'].read_text())[0]['id']}.mp4", outside)
    records = json.loads(files["train"].read_text())
    records[0]["videos"] = ["../elsewhere/x.mp4"]
    records[1]["videos"] = [str(outside)]
    bad = ann / "escaping.json"
    bad.write_text(json.dumps(records))
    proc = run_finetune([*args, f"data.media_root={clips}", f"data.train={bad}",
                         f"train.output_dir={tmp_path / 'run_escaping'}"])  # the first run owns tmp_path/run
    assert proc.returncode in (1, 2) and "escapes dataset root" in proc.stderr, proc.stderr[-2000:]
