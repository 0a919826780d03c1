"""The README's main job, end to end: `make pretrain` on a fresh run directory.

Prepares the stdlib corpus, trains configs/tiny.yaml on 2 CPU ranks with DeepSpeed, exports and
generates: exactly what a new user runs. Slow (a few minutes), and part of the suite on purpose.
"""

import json
import subprocess

import pytest
from jobs import BIN, REPO

pytestmark = pytest.mark.slow


def test_make_pretrain_trains_exports_and_generates(tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    completed = subprocess.run(
        ["make", "--no-print-directory", "pretrain", f"RUN={run}", f"DATA={data}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert train[-1]["step"] == 600
    assert train[-1]["loss"] < train[0]["loss"] - 2.0
    assert evals and evals[-1]["loss"] < evals[0]["loss"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    export = run / "export"
    assert {"model.safetensors", "config.json", "README.md", "tokenizer"} <= {p.name for p in export.iterdir()}
    # make echoes the recipe (prompt included), so the generation is checked on its own: the same
    # command again, its output printed by make, and an answer that starts with sentinel 0.
    prompt = "def read_config(path):\n    with open(<extra_id_0>) as handle:\n        return <extra_id_1>(handle)"
    again = subprocess.run(
        [str(BIN / "performer"), "generate", "--model", str(export), "--max-new-tokens", "32", "--prompt", prompt],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    answer = again.stdout.strip()
    assert answer.startswith("<extra_id_0>") and len(answer) > len("<extra_id_0>")
    assert completed.stdout.rstrip().endswith(again.stdout.rstrip())  # what make printed last
