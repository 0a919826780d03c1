"""Process faults on real DeepSpeed engines, 2 CPU ranks (gloo), injected through PERFORMER_FAULTS
(launcher/faults.py) or real signals; each test asserts the figure docs/reliability.md reports.

Every job runs in its own process group, killed in a `finally` whatever happened (Job.close)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from faultjobs import Job, checkpoint_tensors, reference_run, wait_until_gone
from jobs import run_pretrain

from launcher.checkpoint import COMPLETE_MARKER, resolve_resume_tag, verification_problems
from launcher.dist import Topology

pytestmark = pytest.mark.slow

ONE_RANK = Topology(rank=0, world_size=1, local_rank=0)


@pytest.fixture
def reference(prepared_data, tmp_path_factory):
    return reference_run(prepared_data, tmp_path_factory)


def _latest(directory: Path) -> str:
    return (directory / "checkpoints" / "latest").read_text().strip()


def _resume_and_compare(data: Path, directory: Path, reference, expected_tag: str) -> None:
    """Resume with --resume auto: from `expected_tag`, and every later loss bitwise the reference's."""
    step = int(expected_tag.removeprefix("step"))
    (directory / "metrics.jsonl").rename(directory / "metrics-before-resume.jsonl")
    resumed = run_pretrain(data, directory, "zero.stage=1", resume="auto")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert f"resumed from {expected_tag} at step {step}" in resumed.output
    assert resumed.losses() == {s: loss for s, loss in reference.losses().items() if s > step}  # bitwise
    assert _latest(directory) == "step00000008"


def _logged_steps(directory: Path, name: str = "metrics.jsonl") -> list[int]:
    lines = (directory / name).read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


# ------------------------------------------------------------------------------ 1. kill -9 of a rank


def test_kill9_of_one_rank_ends_the_job_and_resume_is_exact(prepared_data, tmp_path, reference):
    """Rank 1 gets SIGKILL as it starts step 7 (checkpoint at 4): the job exits non-zero within 30 s,
    the steps since that checkpoint (5, 6) are all that is lost, and the resumed losses equal the
    uninterrupted run's bit for bit."""
    directory = tmp_path / "run"
    job = Job(prepared_data, directory, "zero.stage=1", faults="kill@step=7,rank=1")
    try:
        killed_at = float(job.wait_for_fault("kill at step 7")["time"])
        returncode = job.wait(timeout=60)
    finally:
        job.close()
    seconds_to_exit = job.ended_at - killed_at
    print(f"FIGURE kill9: exit {returncode} {seconds_to_exit:.1f} s after SIGKILL")
    assert returncode != 0, job.output[-4000:]
    assert seconds_to_exit < 30
    assert "another rank died" in job.output
    assert _latest(directory) == "step00000004"
    logged = _logged_steps(directory)
    assert logged == [1, 2, 3, 4, 5, 6]
    lost = max(logged) - 4
    print(f"FIGURE kill9: steps lost {lost} (checkpoint interval 4)")
    assert lost <= 4
    _resume_and_compare(prepared_data, directory, reference, "step00000004")


# ------------------------------------------------------------------------------ 2. kill -9 during a save


def test_kill9_during_a_save_never_commits_it_and_resume_takes_the_last_complete(prepared_data, tmp_path, reference):
    """Rank 1 is held inside DeepSpeed's write of the step-8 checkpoint (slow_save) and killed there:
    `latest` still names step 4, the torn step-8 directory has no COMPLETE marker, --resume auto
    takes step 4, re-saves step 8 over the leftover, and the losses equal the reference's."""
    directory = tmp_path / "run"
    job = Job(prepared_data, directory, "zero.stage=1", faults="slow_save@save=2,rank=1")
    try:
        fault = job.wait_for_fault("slow_save at save 2")
        assert _latest(directory) == "step00000004"  # read while the save is in flight
        os.kill(int(fault["pid"]), signal.SIGKILL)
        killed_at = time.time()
        returncode = job.wait(timeout=60)
    finally:
        job.close()
    print(f"FIGURE kill9-save: exit {returncode} {job.ended_at - killed_at:.1f} s after SIGKILL")
    assert returncode != 0 and job.ended_at - killed_at < 30, job.output[-4000:]
    checkpoints = directory / "checkpoints"
    torn = checkpoints / "step00000008"
    assert torn.is_dir() and not (torn / COMPLETE_MARKER).exists() and any(torn.iterdir())
    assert _latest(directory) == "step00000004"
    assert verification_problems(checkpoints / "step00000004", ONE_RANK) == []
    assert resolve_resume_tag(checkpoints, "auto", ONE_RANK) == "step00000004"
    _resume_and_compare(prepared_data, directory, reference, "step00000004")
    written = sorted(p.name for p in torn.iterdir())
    assert written == sorted(p.name for p in (reference.directory / "checkpoints" / "step00000008").iterdir())
    assert verification_problems(torn, ONE_RANK) == []


# ------------------------------------------------------------------------------ 4. SIGTERM


def test_sigterm_saves_at_the_next_step_boundary_exits_75_and_loses_nothing(prepared_data, tmp_path, reference):
    """SIGTERM to both ranks (what srun does to a job step) while rank 0 is held 1 s into step 3 (so
    the signal lands mid-run): both stop at the next step boundary, save that step, exit 75; the
    resumed run continues at the following step with the uninterrupted run's losses, bit for bit,
    so zero steps are lost."""
    directory = tmp_path / "run"
    job = Job(prepared_data, directory, "zero.stage=1", faults="hang@step=3,rank=0,seconds=1")
    try:
        job.wait_for_fault("hang at step 3")
        pids = job.rank_pids()
        assert sorted(pids) == [0, 1], pids
        signalled_at = time.time()
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)
        returncode = job.wait(timeout=60)
    finally:
        job.close()
    seconds = job.ended_at - signalled_at
    assert returncode == 75, job.output[-4000:]
    saved = _latest(directory)
    step = int(saved.removeprefix("step"))
    lost = max(_logged_steps(directory)) - step
    print(
        f"FIGURE sigterm: stopped at step {step}, steps lost {lost}, exit {returncode} {seconds:.1f} s after "
        "SIGTERM (up to 1 s of it the injected delay)"
    )
    assert f"stopping at step {step} (SIGTERM)" in job.output
    assert 3 <= step < 8 and _logged_steps(directory) == list(range(1, step + 1))  # zero steps lost
    assert seconds < 30
    _resume_and_compare(prepared_data, directory, reference, saved)


# ------------------------------------------------------------------------------ 5. a hung rank


@pytest.mark.parametrize("hung", [1, 0])
def test_a_hung_rank_ends_every_rank_within_the_collective_timeout(prepared_data, tmp_path, hung):
    """One rank sleeps at step 3: the other's collective times out and posts an abort in the
    rendezvous store, which ends the hung rank too (its watchdog), both within dist.timeout_s + 10%
    of the hang; the messages name the hang and the knob. Rank 0 hung is the case where the store's
    host is the hung process; rank 1 hung, the one where the store goes away with rank 0."""
    timeout_s = 15
    job = Job(
        prepared_data,
        tmp_path / "run",
        "zero.stage=1",
        f"dist.timeout_s={timeout_s}",
        faults=f"hang@step=3,rank={hung}",
    )
    try:
        hung_at = float(job.wait_for_fault("hang at step 3")["time"])
        pids = job.rank_pids()
        assert sorted(pids) == [0, 1], pids
        gone = wait_until_gone(pids, timeout=4 * timeout_s)
        returncode = job.wait(timeout=60)
    finally:
        job.close()
    after = {rank: round(at - hung_at, 1) for rank, at in sorted(gone.items())}
    print(
        f"FIGURE hang of rank {hung}: ranks gone after {after} s (dist.timeout_s={timeout_s}); launcher exit "
        f"{returncode} after {job.ended_at - hung_at:.1f} s"
    )
    assert returncode != 0, job.output[-4000:]
    assert sorted(gone) == [0, 1] and max(after.values()) <= 1.1 * timeout_s, (after, job.output[-4000:])
    waiter = next(line for line in job.output.splitlines() if line.startswith(f"[rank {1 - hung}] error"))
    assert f"a collective waited longer than dist.timeout_s={timeout_s} s for another rank" in waiter
    stuck = next(line for line in job.output.splitlines() if line.startswith(f"[rank {hung}] error"))
    assert "while this rank was still inside step 3" in stuck and f"dist.timeout_s={timeout_s}" in stuck


# ------------------------------------------------------------------------------ 6. non-finite losses


@pytest.mark.parametrize(
    "stage,precision,fault",
    [(0, "bf16", "nonfinite_loss"), (1, "bf16", "inf_loss"), (1, "fp32", "inf_loss"), (2, "bf16", "nonfinite_loss")],
)
def test_nonfinite_losses_leave_weights_and_optimizer_state_bitwise_untouched(
    prepared_data, tmp_path, stage, precision, fault
):
    """Losses of forward attempts 3-5 (the first three tries at step 3) are made non-finite:
    each is skipped on both ranks and counted, the third in a row stops the run with exit 3 and a
    checkpoint, and that checkpoint's every tensor (weights, fp32 master copies, Adam moments)
    equals a clean 2-step run's bit for bit: the skipped attempts changed nothing."""
    common = [f"zero.stage={stage}", f"precision={precision}"]
    faulty = run_pretrain(
        prepared_data,
        tmp_path / "faulty",
        *common,
        "train.max_consecutive_nonfinite=3",
        extra_env={"PERFORMER_FAULTS": f"{fault}@3,4,5"},
    )
    assert faulty.returncode == 3, faulty.output[-4000:]
    assert "3 non-finite losses in a row at step 2; the last good weights are checkpointed" in faulty.output
    skips = [(r["step"], r["skipped_total"]) for r in faulty.records("event") if "nonfinite_loss" in r]
    assert skips == [(2, 1), (2, 2), (2, 3)]
    assert _latest(faulty.directory) == "step00000002"
    saved = torch.load(
        faulty.directory / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )  # our own test file
    assert saved["skipped_nonfinite"] == 3  # the count survives a resume
    clean = run_pretrain(prepared_data, tmp_path / "clean", *common, "train.max_steps=2", "checkpoint.interval=2")
    assert clean.returncode == 0, clean.output[-4000:]
    assert all(math.isfinite(v) for v in clean.losses().values())
    got = checkpoint_tensors(faulty.directory / "checkpoints" / "step00000002")
    want = checkpoint_tensors(clean.directory / "checkpoints" / "step00000002")
    assert got.keys() == want.keys() and len(want) > 0
    differing = [key for key in want if not torch.equal(got[key], want[key])]
    print(f"FIGURE nonfinite ZeRO-{stage} {precision} {fault}: {len(want)} tensors compared, {len(differing)} differ")
    assert differing == []


# ------------------------------------------------------------------------------ 11. disk full


def test_enospc_during_a_save_is_a_clear_error_and_the_previous_checkpoint_is_resumed(
    prepared_data, tmp_path, reference
):
    """Rank 1's first write of the step-8 checkpoint fails with ENOSPC after half its bytes:
    every rank stops with exit 1 and the same message, the torn step-8 files are removed, step 4
    stays `latest`, verifies, and is what --resume auto continues from, exactly."""
    directory = tmp_path / "run"
    failed = run_pretrain(
        prepared_data, directory, "zero.stage=1", extra_env={"PERFORMER_FAULTS": "enospc@save=2,rank=1"}
    )
    assert failed.returncode == 1, failed.output[-4000:]
    message = "checkpoint step00000008 could not be written"
    assert failed.output.count(message) == 2, failed.output[-4000:]  # both ranks say it
    print("FIGURE enospc injected:", next(line for line in failed.output.splitlines() if "[rank 0] error" in line))
    assert "No space left on device" in failed.output and "step00000004, is untouched" in failed.output
    checkpoints = directory / "checkpoints"
    assert not (checkpoints / "step00000008").exists()
    assert _latest(directory) == "step00000004"
    assert verification_problems(checkpoints / "step00000004", ONE_RANK) == []
    _resume_and_compare(prepared_data, directory, reference, "step00000004")


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return mounted.returncode == 0


def test_a_really_full_disk_during_a_save_keeps_the_previous_checkpoint(prepared_data, tmp_path):
    """The same on a real 7 MB tmpfs under checkpoints/ (one test checkpoint is 4.7 MB): the second
    save runs out of space for real. Skipped where mounting is not allowed."""
    directory = tmp_path / "run"
    checkpoints = directory / "checkpoints"
    if not _mount_tmpfs(checkpoints, "7m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); the injected ENOSPC test covers it")
    try:
        failed = run_pretrain(prepared_data, directory, "zero.stage=1")
        assert failed.returncode == 1, failed.output[-4000:]
        assert "checkpoint step00000008 could not be written" in failed.output
        print("FIGURE enospc tmpfs:", next(line for line in failed.output.splitlines() if "[rank 0] error" in line))
        assert _latest(directory) == "step00000004"
        assert verification_problems(checkpoints / "step00000004", ONE_RANK) == []
        assert not (checkpoints / "step00000008").exists()
        assert resolve_resume_tag(checkpoints, "auto", ONE_RANK) == "step00000004"  # (resumed in the test above)
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)], capture_output=True)
