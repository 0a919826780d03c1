"""The README's main job, end to end: `make pretrain` on a fresh run directory.

Prepares the stdlib corpus, trains configs/tiny.yaml on 2 CPU ranks with DeepSpeed, exports and
generates: what a new user runs, through the Makefile's own recipe. The test trains 200 steps
instead of the config's 600 (`SET=`, the recipe's override hook; the schedule decays over the 200),
with checkpoints every 50 so that pruning to `checkpoint.keep` runs too: more steps would run the
same loop, and the full job's figures come from `benchmarks/main_job.py`. Slow (about two and a half
minutes), and part of the suite on purpose.
"""

import json
import subprocess

import pytest
from jobs import BIN, REPO

pytestmark = pytest.mark.slow


STEPS, CHECKPOINT_INTERVAL, EVAL_INTERVAL, KEEP = 200, 50, 100, 2


def test_make_pretrain_trains_exports_and_generates(tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    overrides = (
        f"train.max_steps={STEPS} checkpoint.interval={CHECKPOINT_INTERVAL} checkpoint.keep={KEEP} "
        f"eval.interval={EVAL_INTERVAL}"
    )
    completed = subprocess.run(
        ["make", "--no-print-directory", "pretrain", f"RUN={run}", f"DATA={data}", f"SET={overrides}"],
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
    assert train[-1]["step"] == STEPS
    assert train[-1]["loss"] < train[0]["loss"] - 2.0
    assert [r["step"] for r in evals] == [EVAL_INTERVAL, STEPS] and evals[-1]["loss"] < evals[0]["loss"]
    kept = sorted(p.name for p in (run / "checkpoints").glob("step*"))
    assert kept == [
        f"step{step:08d}" for step in range(STEPS - (KEEP - 1) * CHECKPOINT_INTERVAL, STEPS + 1, CHECKPOINT_INTERVAL)
    ]
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
