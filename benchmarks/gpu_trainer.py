"""The real trainer on one GPU: configs/medium.yaml, bf16, ZeRO-2 on NCCL; part of gpu_check.sh.

    python benchmarks/gpu_trainer.py --data runs/data [--steps 40]

Three runs of `deepspeed --num_gpus 1 --module launcher.pretrain` with configs/medium.yaml (the
guide's `medium` encoder-decoder, FAVOR++, 16 x 1024 tokens per step):
1. --steps steps with zero.bucket_elements = 5e7, a checkpoint at half way and at the end:
   tokens/s and MFU (against the bf16 matmul rate measured here, passed as log.peak_flops_per_rank)
   over the steps after the first few, peak GPU memory;
2. a resume of run 1 for a quarter more steps: it must start where run 1 ended;
3. --steps / 2 steps with DeepSpeed's default buckets (5e8): the step time and memory the bucket
   size costs, from which the shipped GPU configs' zero.bucket_elements is chosen;
then `performer export` of run 1's last checkpoint. Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

SMALL_BUCKET = 50_000_000
WARMUP_RECORDS = 5


def _train_records(result: dict) -> list[dict]:
    return [r for r in result.get("metrics", []) if r.get("kind") == "train"]


def _summary(result: dict) -> dict:
    """Median tokens/s and MFU after the first records, last step, peak GPU memory of one trainer run."""
    train = _train_records(result)
    steady = train[WARMUP_RECORDS:] or train
    memory = [r for r in result.get("metrics", []) if r.get("kind") == "memory"]
    return {
        "returncode": result.get("returncode"),
        "error": result.get("error"),
        "first_step": train[0]["step"] if train else None,
        "last_step": train[-1]["step"] if train else None,
        "last_loss": train[-1]["loss"] if train else None,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
        "mfu": statistics.median(r["mfu"] for r in steady) if steady else None,
        "device_peak_bytes": max((r.get("device_peak_bytes", 0) for r in memory), default=None),
        "wall_s": result.get("wall_s"),
        "output_tail": None if result.get("returncode") == 0 else result.get("output_tail"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--name", default="gpu_trainer")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_trainer needs a CUDA GPU")
    peak = common.gemm_rate("cuda", torch.bfloat16)
    workdir = Path(tempfile.mkdtemp(prefix="gpu-trainer-"))
    shared = [
        f"data.manifest={args.data / 'train'}",
        "data.num_workers=4",
        f"log.peak_flops_per_rank={peak:.4e}",
        "log.interval=1",
    ]

    def trainer(run_dir: Path, settings: list[str], arguments: list[str] | None = None) -> dict:
        result = common.run_trainer(
            ["configs/medium.yaml"], [*shared, *settings], run_dir, 1, 8, args.timeout_s, arguments=arguments
        )
        summary = _summary(result)
        print(json.dumps({"run": run_dir.name, **summary}), flush=True)
        return summary

    half = max(1, args.steps // 2)
    main_run = workdir / "medium"
    first = trainer(
        main_run,
        [f"train.max_steps={args.steps}", f"checkpoint.interval={half}", f"zero.bucket_elements={SMALL_BUCKET}"],
    )
    resumed = trainer(
        main_run,
        [f"train.max_steps={args.steps + max(1, args.steps // 4)}", f"zero.bucket_elements={SMALL_BUCKET}"],
        ["--resume", "auto"],
    )
    default_buckets = trainer(workdir / "default-buckets", [f"train.max_steps={half}"])
    export = subprocess.run(
        [sys.executable, "-m", "launcher", "export", "--checkpoint", str(main_run), "--out", str(workdir / "export")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    exported = sorted(p.name for p in (workdir / "export").glob("*")) if export.returncode == 0 else []
    results = {
        "settings": {"steps": args.steps, "config": "configs/medium.yaml", "small_bucket": SMALL_BUCKET},
        "machine": common.machine(),
        "gemm_flop_rate": peak,
        "runs": {"first": first, "resumed": resumed, "default_buckets": default_buckets},
        "export": {"returncode": export.returncode, "files": exported, "output_tail": export.stderr[-800:]},
        "checks": {
            "resumed_where_it_stopped": resumed["first_step"] == args.steps + 1,
            "exported": export.returncode == 0 and "model.safetensors" in exported,
        },
    }
    common.publish(args.name, results, markdown(results))
    return 0 if all(results["checks"].values()) and first["returncode"] == 0 else 1


def markdown(results: dict) -> str:
    runs = results["runs"]
    rows = []
    for label, run in (
        (f"{results['settings']['steps']} steps, buckets {SMALL_BUCKET:.0e}", runs["first"]),
        ("resumed", runs["resumed"]),
        ("default buckets (5e8)", runs["default_buckets"]),
    ):
        rows.append(
            [
                label,
                f"{run['first_step']}-{run['last_step']}" if run["first_step"] else run.get("error") or "failed",
                f"{run['tokens_per_s']:,.0f}" if run["tokens_per_s"] else "",
                f"{run['mfu']:.1%}" if run["mfu"] else "",
                common.mebibytes(run["device_peak_bytes"]) if run["device_peak_bytes"] else "",
            ]
        )
    checks = ", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in results["checks"].items())
    return (
        f"The trainer on one GPU ({results['machine'].get('gpu')}): configs/medium.yaml, bf16, ZeRO-2 on NCCL, "
        f"16 x 1024 tokens per step; MFU against the bf16 matmul rate measured in the same run, "
        f"{results['gemm_flop_rate'] / 1e12:,.0f} TFLOP/s.\n\n"
        + common.table(["run", "steps", "tokens/s", "MFU", "peak GPU memory"], rows, align="llrrr")
        + f"\nChecks: {checks}. Export files: {', '.join(results['export']['files']) or 'none'}.\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
