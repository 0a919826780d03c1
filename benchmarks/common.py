"""What every benchmark here shares: isolated measurements, timing, the machine's GEMM rate, results files.

Each measured configuration runs in its own Python process (``run_isolated``), so that its peak
memory is its own and one configuration's allocator state cannot slow the next. Times are medians
of several repeats after a warm-up; figures worth comparing are ratios against a baseline
measured in the same run, because the machines are shared and noisy.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from launcher.dist import free_port
from launcher.memory import peak_resident_bytes, resident_bytes  # noqa: F401 - the benchmarks' own names

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _git(*arguments: str) -> str:
    done = subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def commit() -> str:
    """The commit the numbers come from, with "+dirty" when the working tree had changes."""
    head, dirty = _git("rev-parse", "--short=12", "HEAD") or "unknown", tree_dirty()
    return head + ("+dirty" if dirty else "")


def tree_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None when git cannot tell).

    Results files are what the benchmarks write: they do not make the code dirty.
    """
    done = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return bool(done.stdout.strip()) if done.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9654 ..."), or the architecture where the OS does not say."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where the numbers come from: the commit, whether the tree was dirty, the command and the machine.

    benchmarks/readme/core.py reads "commit", "dirty", "command", "cpu_model", "cpu_count", "gpu"
    and "torch" for the line under each README table.
    """
    script = Path(sys.argv[0]).resolve()
    info = {
        "commit": _git("rev-parse", "--short=12", "HEAD") or None,
        "dirty": tree_dirty(),
        "command": " ".join(
            ["python", str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else script.name, *sys.argv[1:]]
        ),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    return info


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], repeats: int, device: str = "cpu", warmup: int = 1) -> dict:
    """Median and spread of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def gemm_rate(
    device: str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None, repeats: int = 5
) -> float:
    """The machine's dense matmul rate in FLOP/s for ``dtype`` (square ``size`` x ``size`` products)."""
    size = size or (2048 if device == "cpu" else 8192)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = median_seconds(lambda: a @ b, repeats, device, warmup=2)
    return 2 * size**3 / timing["median_s"]


def run_isolated(script: Path, arguments: list[str], timeout_s: float) -> dict:
    """Run ``script --worker ...`` in a fresh process and return the JSON it prints last.

    A worker that fails, runs out of memory or overruns ``timeout_s`` yields a record saying so
    instead of stopping the whole benchmark.
    """
    command = [sys.executable, str(script), "--worker", *arguments]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout_s:.0f} s limit"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if done.returncode in (-9, 137) else f"exit {done.returncode}"
        return {"error": reason, "stderr_tail": done.stderr[-600:]}
    return json.loads(lines[-1])


# Trainer settings every benchmark run of the trainer shares: no checkpoints, evaluation,
# TensorBoard or progress bar in the timed steps, a metrics record every step.
QUIET_TRAINER_SETTINGS = [
    "data.verify_sha256=false",
    "schedule.warmup_steps=1",
    "log.interval=1",
    "log.progress=false",
    "log.tensorboard=false",
    "log.peak_flops_per_rank=1.0e10",
    "checkpoint.interval=1000000",
    "eval.interval=0",
]


def run_trainer(
    configs: list[str],
    settings: list[str],
    run_dir: Path,
    ranks: int,
    threads_per_rank: int,
    timeout_s: float,
    environment: dict[str, str] | None = None,
    arguments: list[str] | None = None,
) -> dict:
    """The real trainer under the deepspeed launcher on ``ranks`` ranks (CPU ranks or GPUs), writing
    into ``run_dir``; ``arguments`` go to launcher.pretrain after the settings (--resume auto).

    Returns {"returncode", "wall_s", "metrics" (the records this launch added to the run's
    metrics.jsonl: a resumed run appends to the file of the run it resumes), "output_tail"}, or
    {"error": ...} when it overran ``timeout_s``.
    """
    metrics_file = run_dir / "metrics.jsonl"
    records_before = len(metrics_file.read_text().splitlines()) if metrics_file.is_file() else 0
    port = free_port()
    command = [
        # The `deepspeed` launcher through this interpreter: also where deepspeed has no script on PATH.
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port),
        "--module",
        "launcher.pretrain",
        *(part for config in configs for part in ("--config", config)),
        "--set",
        f"train.output_dir={run_dir}",
        *QUIET_TRAINER_SETTINGS,
        *settings,
        *(arguments or []),
    ]
    extra = environment or {}
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment.update(OMP_NUM_THREADS=str(threads_per_rank), PYTHONUNBUFFERED="1", **extra)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout_s:.0f} s limit"}
    lines = metrics_file.read_text().splitlines()[records_before:] if metrics_file.is_file() else []
    metrics = [json.loads(line) for line in lines]
    return {
        "returncode": done.returncode,
        "wall_s": time.perf_counter() - started,
        "metrics": metrics,
        "output_tail": (done.stdout + done.stderr)[-1500:],
    }


def write_results(name: str, results: dict, markdown: str, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """benchmarks/results/<name>.json and <name>.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    markdown_path.write_text(markdown)
    return json_path, markdown_path


def publish(name: str, results: dict, markdown: str, plot: Callable[[dict, Path], None] | None = None) -> Path:
    """Write <name>.json and <name>.md (and <name>.png with ``plot``), print the markdown; returns its path."""
    _, markdown_path = write_results(name, results, markdown)
    if plot is not None:
        plot(results, markdown_path.with_suffix(".png"))
    print(markdown_path.read_text())
    return markdown_path


def table(header: list[str], rows: list[list[object]], align: str | None = None) -> str:
    """A markdown table; ``align`` gives each column's alignment, "l" or "r" ("lrr": numbers right)."""
    rules = ["---:" if side == "r" else "---" for side in align] if align else ["---"] * len(header)
    if len(rules) != len(header):
        raise ValueError(f"align {align!r} does not have one letter per column of {header}")
    lines = ["| " + " | ".join(header) + " |", "|" + "".join(rule + "|" for rule in rules)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1e3:.2f} ms" if value < 0.01 else f"{value * 1e3:.0f} ms"


def mebibytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"
