"""`performer slurm`: the shipped scripts with their #SBATCH header filled in, nothing else changed;
a bad config or cluster shape fails before anything is written. No Slurm needed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from launcher.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def body(script: str) -> list[str]:
    """The lines after the #SBATCH header, minus the rendered `set --` line and its comment."""
    lines = script.splitlines()
    last = max(i for i, line in enumerate(lines) if re.match(r"^#{1,2}SBATCH", line))
    return [line for line in lines[last + 1 :] if not line.startswith(("set -- ", "# The run:")) and line]


@pytest.mark.parametrize(
    "launcher, template", [("srun", "pretrain.sbatch"), ("deepspeed", "pretrain-deepspeed.sbatch")]
)
def test_renders_the_requested_header_over_the_shipped_body(tmp_path, monkeypatch, launcher, template):
    monkeypatch.chdir(REPO)
    out = tmp_path / "job.sbatch"
    code = main(
        [
            "slurm",
            "configs/small.yaml",
            "--config",
            "configs/zero2.yaml",
            "--nodes",
            "4",
            "--gpus-per-node",
            "8",
            "--partition",
            "gpu",
            "--account",
            "proj-1",
            "--time",
            "1-00:00:00",
            "--job-name",
            "small-z2",
            "--launcher",
            launcher,
            "--out",
            str(out),
            "--set",
            "train.max_steps=100",
            "train.output_dir=runs/small z2",
        ]
    )
    assert code == 0
    script = out.read_text()
    subprocess.run(["bash", "-n", str(out)], check=True)
    lines = sbatch_lines(script)
    for expected in (
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--account=proj-1",
        "--time=1-00:00:00",
        "--job-name=small-z2",
        f"--chdir={REPO}",
    ):
        assert f"#SBATCH {expected}" in lines, lines
    # the template's own options are kept, each option once
    for kept in ("--signal=B:USR1@120", "--requeue", "--open-mode=append", "--output=%x-%j.out"):
        assert f"#SBATCH {kept}" in lines
    names = [line.split("=")[0] for line in lines]
    assert len(names) == len(set(names)), lines
    # config and overrides become the script's first arguments (quoted), before any given to sbatch
    assert (
        "set -- configs/small.yaml --config configs/zero2.yaml --set train.max_steps=100 "
        "'train.output_dir=runs/small z2' \"$@\""
    ) in script
    template_text = (REPO / "slurm" / template).read_text()
    assert body(script) == body(template_text)


def test_cpu_nodes_keep_the_gpu_line_disabled(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["slurm", "configs/tiny.yaml", "--nodes", "2", "--tasks-per-node", "2"]) == 0
    script = capsys.readouterr().out
    lines = sbatch_lines(script)
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=2" in lines
    assert not any("gpus" in line for line in lines)
    assert "##SBATCH --gpus-per-node=1" in script
    path = tmp_path / "cpu.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["configs/tiny.yaml", "--set", "train.max_stepz=5"], "max_stepz"),
        (["configs/nope.yaml"], "does not exist"),
        (["configs/tiny.yaml", "--gpus-per-node", "4", "--tasks-per-node", "2"], "ranks per node = GPUs per node"),
        (["configs/tiny.yaml", "--nodes", "0"], "--nodes"),
        (["configs/tiny.yaml", "--partition", "a b"], "one word"),
    ],
)
def test_bad_input_fails_before_writing(tmp_path, monkeypatch, capsys, arguments, message):
    monkeypatch.chdir(REPO)
    out = tmp_path / "job.sbatch"
    assert main(["slurm", *arguments, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error, error
    assert not out.exists()
