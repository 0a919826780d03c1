"""Config faults through the real command line: each fails before step 1 with exit code 2 and a
message that names the key and the fix; no step runs, no checkpoint is written.

Most runs stop while the config is read (one process, a couple of seconds each); the batch triad
needs the world size (2 ranks under the deepspeed launcher) and the model mismatch a checkpoint.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from jobs import BIN, REPO, TEST_SETTINGS, launch_environment, run_pretrain


def pretrain(data: Path, output_dir: Path, *settings: str, configs: tuple = (), resume: str | None = None):
    """`performer pretrain` (one process) with the test settings; returns the completed process."""
    overrides = [*TEST_SETTINGS, f"data.manifest={data / 'train'}", f"train.output_dir={output_dir}", *settings]
    command = [str(BIN / "performer"), "pretrain", "--config", str(REPO / "configs" / "tiny.yaml")]
    for extra in configs:
        command += ["--config", str(extra)]
    command += ["--set", *overrides] + (["--resume", resume] if resume else [])
    return subprocess.run(command, cwd=REPO, env=launch_environment(), capture_output=True, text=True, timeout=300)


def assert_nothing_ran(output_dir: Path) -> None:
    assert not (output_dir / "metrics.jsonl").exists() and not (output_dir / "checkpoints").exists()


CASES = {
    # name: (settings, overlay file text or None, what the message must say)
    "unknown top-level key": (["trian.max_steps=5"], None, "unknown config key 'trian'; did you mean 'train'"),
    "unknown nested key": (
        ["train.max_step=5"],
        None,
        "unknown config key 'train.max_step'; did you mean 'train.max_steps'",
    ),
    "unknown model override": (
        ["model.d_modle=32"],
        None,
        "unknown config key 'model.d_modle'; did you mean 'model.d_model'",
    ),
    "unknown key in an overlay": (
        [],
        "optimizer:\n  lr: 1.0e-3\n  weight_decai: 0.1\n",
        "unknown config key 'optimizer.weight_decai'; did you mean 'optimizer.weight_decay'",
    ),
    "wrong type": (["train.max_steps=ten"], None, "train.max_steps must be of type int, got str: 'ten'"),
    "wrong type in an override": (["model.num_heads=[4]"], None, "model.num_heads must be of type int"),
    "wrong choice": (["zero.stage=4"], None, "zero.stage=4; choose one of 0, 1, 2, 3"),
    "impossible model": (["model.num_heads=3"], None, "must be divisible by model.num_heads=3"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_config_error_exits_2_before_any_work(prepared_data, tmp_path, name):
    settings, overlay, message = CASES[name]
    configs = ()
    if overlay is not None:
        (tmp_path / "overlay.yaml").write_text(overlay)
        configs = (tmp_path / "overlay.yaml",)
    completed = pretrain(prepared_data, tmp_path / "run", *settings, configs=configs)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert completed.stderr.splitlines()[-1].startswith("error: ") and message in completed.stderr, completed.stderr
    assert "Traceback" not in completed.stderr
    assert_nothing_ran(tmp_path / "run")


@pytest.mark.slow
def test_impossible_batch_triad_exits_2_on_every_rank(prepared_data, tmp_path):
    run = run_pretrain(prepared_data, tmp_path / "run", "train.global_batch_size=12")  # 4 x 1 x 2 = 8
    assert run.returncode == 2, run.output[-3000:]
    for rank in (0, 1):
        assert (
            f"[rank {rank}] error: train.global_batch_size=12 but train.micro_batch_size (4) x "
            "train.grad_accum (1) x ranks (2) = 8; change one of them"
        ) in run.output
    assert "Traceback" not in run.output
    assert_nothing_ran(tmp_path / "run")


@pytest.mark.parametrize(
    "settings, message",
    [
        (["model.d_model=32"], "was trained with another model: model.d_model differs (saved 64, now 32)"),
        (["zero.stage=1"], "was saved with zero.stage=0, now 1: resume with the same stage"),
    ],
)
def test_resume_with_another_model_exits_2_and_leaves_the_run_alone(prepared_data, run_copy, settings, message):
    checkpoints = run_copy / "checkpoints"
    before = {p.relative_to(run_copy): p.stat().st_mtime_ns for p in run_copy.rglob("*") if p.is_file()}
    completed = pretrain(prepared_data, run_copy, "train.max_steps=6", "eval.interval=0", *settings, resume="auto")
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert message in completed.stderr and "Traceback" not in completed.stderr
    assert "use the saved model settings" in completed.stderr or "same stage" in completed.stderr
    after = {p.relative_to(run_copy): p.stat().st_mtime_ns for p in run_copy.rglob("*") if p.is_file()}
    assert after == before  # no step, no checkpoint, not even the metrics file touched
    assert (checkpoints / "latest").read_text().strip() == "step00000004"
