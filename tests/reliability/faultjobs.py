"""Watched trainer jobs for the process-fault tests (tests/launcher/jobs.py launches, this watches).

`Job` starts `launcher.pretrain` under the deepspeed launcher (or as one process) in its own
session, reads its output as it comes, finds each rank's pid, and kills the whole process group
when the test ends, whatever happened. `reference_run` is the uninterrupted 2-rank ZeRO-1 fp32
run (8 steps, checkpoints at 4 and 8) that faulty runs are compared with, made once per session.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from jobs import BIN, REPO, TEST_SETTINGS, Run, free_port, launch_environment, run_pretrain

FAULT_LINE = re.compile(r"fault: (?P<what>.*) rank=(?P<rank>\d+) pid=(?P<pid>\d+) time=(?P<time>[0-9.]+)")


class Job:
    """One trainer job, watched: output lines as they arrive, rank pids, exit time."""

    def __init__(
        self,
        data: Path,
        output_dir: Path,
        *settings: str,
        ranks: int = 2,
        resume: str | None = None,
        faults: str | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        overrides = [*TEST_SETTINGS, f"data.manifest={data / 'train'}", f"train.output_dir={output_dir}", *settings]
        arguments = ["--config", str(REPO / "configs" / "tiny.yaml"), "--set", *overrides]
        if resume is not None:
            arguments += ["--resume", resume]
        arguments += list(extra_args)
        if ranks == 1:
            command = [sys.executable, "-m", "launcher.pretrain", *arguments]
        else:
            command = [
                str(BIN / "deepspeed"),
                "--num_gpus",
                str(ranks),
                "--master_port",
                str(free_port()),
                "--module",
                "launcher.pretrain",
                *arguments,
            ]
        environment = launch_environment(**({"PERFORMER_FAULTS": faults} if faults else {}))
        self.directory = output_dir
        self.lines: list[tuple[float, str]] = []
        self.ended_at: float | None = None
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for_fault(self, what: str, timeout: float = 120) -> re.Match:
        """The first `fault:` line whose description starts with `what`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, line in list(self.lines):
                match = FAULT_LINE.search(line)
                if match and match["what"].startswith(what):
                    return match
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no 'fault: {what}' line; output:\n{self.output[-4000:]}")

    def wait_for_line(self, text: str, timeout: float = 120) -> float:
        """When a line containing `text` arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if text in line:
                    return at
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r}; output:\n{self.output[-4000:]}")

    def rank_pids(self) -> dict[int, int]:
        """rank -> pid of the trainer processes (the launcher's children, or the process itself)."""
        launcher = psutil.Process(self.process.pid)
        ranks = {}
        for process in [launcher, *launcher.children(recursive=True)]:
            try:
                if "launcher.pretrain" in " ".join(process.cmdline()) and process.name().startswith("python"):
                    ranks[int(process.environ().get("RANK", 0))] = process.pid
            except psutil.Error:
                continue
        return ranks

    def wait(self, timeout: float = 120) -> int:
        try:
            self.process.wait(timeout=timeout)
        finally:
            self.ended_at = self.ended_at or time.time()
        self._reader.join(timeout=10)
        return self.process.returncode

    def run(self) -> Run:
        return Run(self.process.returncode, self.output, self.directory)

    def close(self) -> None:
        """Kill whatever is left of the job (the launcher and every rank share one process group)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


def run_job(data: Path, output_dir: Path, *settings: str, timeout: float = 300, **options) -> Run:
    """A Job run to its end (run_pretrain with Job's options, e.g. extra_args)."""
    job = Job(data, output_dir, *settings, **options)
    try:
        job.wait(timeout=timeout)
    finally:
        job.close()
    return job.run()


def wait_until_gone(pids: dict[int, int], timeout: float) -> dict[int, float]:
    """rank -> time.time() at which its process had exited (a zombie counts as exited)."""
    gone: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(gone) < len(pids) and time.monotonic() < deadline:
        for rank, pid in pids.items():
            if rank in gone:
                continue
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    gone[rank] = time.time()
            except psutil.NoSuchProcess:
                gone[rank] = time.time()
        time.sleep(0.05)
    return gone


_REFERENCE: dict[tuple[Path, int], Run] = {}


def reference_run(data: Path, tmp_path_factory, stage: int = 1) -> Run:
    """The uninterrupted 2-rank ZeRO-`stage` fp32 run (steps 1-8, checkpoints at 4 and 8), made once."""
    if (data, stage) not in _REFERENCE:
        run = run_pretrain(data, tmp_path_factory.mktemp(f"reference-zero{stage}") / "run", f"zero.stage={stage}")
        assert run.returncode == 0, run.output[-4000:]
        _REFERENCE[data, stage] = run
    return _REFERENCE[data, stage]


def checkpoint_tensors(tag_directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every file of a checkpoint tag, by file and key path (our own test files)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            tensors[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{prefix}/{index}", item)

    for path in sorted(tag_directory.glob("*.pt")):
        walk(path.name, torch.load(path, map_location="cpu", weights_only=False))
    return tensors
