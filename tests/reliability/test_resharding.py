"""World-size change: a ZeRO-1/2 checkpoint saved by 2 ranks resumes on 1 rank with --reshard
(converted to DeepSpeed's universal checkpoint), real engines on CPU (gloo)."""

from __future__ import annotations

import shutil

import pytest
import torch
from faultjobs import reference_run, run_job
from jobs import run_pretrain

pytestmark = pytest.mark.slow


def _client_state(directory, tag):
    path = directory / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)  # our own test files


def _saved_on_two_ranks(reference, directory):
    """The reference run as if stopped after its step-4 checkpoint (2 ranks x 4 rows)."""
    shutil.copytree(reference.directory, directory)
    shutil.rmtree(directory / "checkpoints" / "step00000008")
    (directory / "metrics.jsonl").unlink()
    (directory / "checkpoints" / "latest").write_text("step00000004\n")
    return directory


@pytest.fixture
def saved_on_two_ranks(prepared_data, tmp_path_factory, tmp_path):
    return _saved_on_two_ranks(reference_run(prepared_data, tmp_path_factory), tmp_path / "run")


@pytest.mark.parametrize("stage", [1, 2])
def test_a_two_rank_checkpoint_resumes_on_one_rank_with_reshard(prepared_data, tmp_path_factory, tmp_path, stage):
    """1 rank x 4 rows x grad_accum 2 (the same 8-row global batch) from the 2-rank step-4 checkpoint:
    weights, fp32 master copies and Adam moments carry over whole, the data cursor continues at the
    same row (none repeated or skipped), and the losses of steps 5-8 equal the 2-rank run's bit for
    bit (two gradient halves, each scaled by 1/2, summed in either order give the same float).
    Under ZeRO-1 the 1-rank run's step-6 checkpoint then goes back to 2 ranks: steps 7-8 again
    equal the reference's."""
    reference = reference_run(prepared_data, tmp_path_factory, stage)
    directory = _saved_on_two_ranks(reference, tmp_path / "run")
    resumed = run_job(
        prepared_data,
        directory,
        f"zero.stage={stage}",
        "train.grad_accum=2",
        "checkpoint.interval=2",
        ranks=1,
        resume="auto",
        extra_args=["--reshard"],
    )
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "resumed from step00000004 at step 4, resharded from 2 to 1 rank(s)" in resumed.output
    assert not (directory / "checkpoints" / "universal").exists()  # the converted copy is removed
    want, got = reference.losses(), resumed.losses()
    differences = {step: abs(got[step] - want[step]) for step in sorted(got)}
    print(f"FIGURE reshard ZeRO-{stage} 2->1: |loss difference| per step {differences}")
    assert got == {step: loss for step, loss in want.items() if step > 4}  # bitwise
    # The data cursor after step 8 is where the 2-rank run's was: the same rows, each once.
    mine, theirs = _client_state(directory, "step00000008"), _client_state(reference.directory, "step00000008")
    assert mine["data"] == theirs["data"] and mine["samples"] == theirs["samples"]
    assert mine["world_size"] == 1
    if stage != 1:
        return
    # And back: the 1-rank step-6 checkpoint on 2 ranks.
    shutil.rmtree(directory / "checkpoints" / "step00000008")
    (directory / "metrics.jsonl").unlink()
    back = run_job(prepared_data, directory, "zero.stage=1", resume="auto", extra_args=["--reshard"])
    assert back.returncode == 0, back.output[-4000:]
    assert "resumed from step00000006 at step 6, resharded from 1 to 2 rank(s)" in back.output
    print(f"FIGURE reshard ZeRO-1 1->2: steps 7-8 {back.losses()} vs {dict(list(want.items())[6:])}")
    assert back.losses() == {step: loss for step, loss in want.items() if step > 6}  # bitwise
    assert _client_state(directory, "step00000008")["data"] == theirs["data"]


def test_a_world_size_change_without_reshard_is_refused_with_the_fix(prepared_data, saved_on_two_ranks):
    refused = run_pretrain(
        prepared_data, saved_on_two_ranks, "zero.stage=1", "train.grad_accum=2", ranks=1, resume="auto"
    )
    assert refused.returncode == 2, refused.output[-4000:]
    assert "holds ZeRO-1 shards of 2 rank(s), this job has 1" in refused.output and "--reshard" in refused.output


def test_reshard_keeps_the_global_batch(prepared_data, saved_on_two_ranks):
    refused = run_job(
        prepared_data, saved_on_two_ranks, "zero.stage=1", ranks=1, resume="auto", extra_args=["--reshard"]
    )
    assert refused.returncode == 2, refused.output[-4000:]
    assert "--reshard keeps the global batch" in refused.output and "set train.grad_accum=2" in refused.output
