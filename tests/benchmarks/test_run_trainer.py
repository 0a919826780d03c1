"""benchmarks/common.run_trainer returns the metrics of its own launch, also when it resumes a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402


def test_a_resumed_run_reports_only_the_records_its_launch_appended(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    launches = iter([range(1, 9), range(9, 11)])  # a first run of 8 steps, then a resume to 10

    def trainer(command, **kwargs):
        # What the trainer does to metrics.jsonl: create it, or append to the run it resumes.
        assert f"train.output_dir={run_dir}" in command
        run_dir.mkdir(exist_ok=True)
        with (run_dir / "metrics.jsonl").open("a") as metrics:
            for step in next(launches):
                metrics.write(json.dumps({"kind": "train", "step": step}) + "\n")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(common.subprocess, "run", trainer)
    first = common.run_trainer(["configs/tiny.yaml"], [], run_dir, 1, 1, 60)
    resumed = common.run_trainer(["configs/tiny.yaml"], [], run_dir, 1, 1, 60, arguments=["--resume", "auto"])

    assert [r["step"] for r in first["metrics"]] == list(range(1, 9))
    assert [r["step"] for r in resumed["metrics"]] == [9, 10]
