"""Per-step overhead: every collective of an optimizer step, counted, and what the small ones cost.

    python benchmarks/step_overhead.py --data runs/data [--steps 16] [--name step_overhead]

1. Profile: the real trainer (configs/tiny.yaml) on 2 CPU ranks for ZeRO 0-3, with every
   torch.distributed collective of each rank counted (benchmarks/collective_counter, loaded through
   sitecustomize): kind, payload, wall time and where it was called from (the trainer's function
   and DeepSpeed's). Collectives are grouped by when they run: every micro-step and optimizer step
   ("step"), every log interval ("log"), at a save ("checkpoint"), once ("setup"). The step time
   comes from the run's own train records (the first window left out).
2. Latency: a 2-rank gloo all-reduce on this machine, payloads of 4 B to 4 MiB (median of many).
3. Share: the small collectives of one step (payload under 64 KiB, so latency-bound, and
   synchronous: ZeRO-3's asynchronous parameter gathers are prefetched beside compute and counted
   with the weights' traffic in scale_on_paper; a group of one rank reaches nobody), times their
   measured latency, over the measured step time; and, from the latency model of
   benchmarks/scale_on_paper.py (a tree of log2 N hops at --hop-latency-us each, NCCL-like), over
   the step time that scale_on_paper projects for its `large` model at 64 / 512 / 4,096 GPUs.

Writes benchmarks/results/<name>.json and <name>.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common, scale_on_paper  # noqa: E402

SMALL_BYTES = 64 * 1024
STAGES = (0, 1, 2, 3)
PROJECTED_GPUS = (64, 512, 4096)
LATENCY_BYTES = (4, 64, 1024, 16384, 262144, 4194304)
COUNTER = ROOT / "benchmarks" / "collective_counter"
# The trainer's functions that run at every micro-step or optimizer step; the others run at a log
# interval, a save or once.
PER_STEP = ("launcher/trainer.py:micro_step", "launcher/trainer.py:at_boundary", "launcher/trainer.py:_skip_nonfinite")
PER_LOG = ("log_window", "log_memory", "report_lost_documents", "evaluate", "source_tokens")
CHECKPOINT = ("launcher/checkpoint.py", "save", "verify_projections")


def phase(row: dict) -> str:
    ours = row["ours"]
    if ours in PER_STEP:
        return "step"
    if ours.rsplit(":", 1)[-1] in PER_LOG:
        return "log"
    if ours.startswith(CHECKPOINT[0]) or ours.rsplit(":", 1)[-1] in CHECKPOINT[1:]:
        return "checkpoint"
    return "setup"


def profile(
    stage: int, data: Path, scratch: Path, steps: int, log_interval: int, timeout_s: float, overlap: bool = False
) -> dict:
    name = f"zero{stage}" + ("-overlap" if overlap else "")
    counts = scratch / f"counts-{name}"
    shutil.rmtree(counts, ignore_errors=True)
    counts.mkdir(parents=True)
    python_path = os.pathsep.join(filter(None, [str(COUNTER), str(ROOT), os.environ.get("PYTHONPATH")]))
    run = common.run_trainer(
        [str(ROOT / "configs" / "tiny.yaml")],
        [
            f"data.manifest={data / 'train'}",
            f"zero.stage={stage}",
            f"train.max_steps={steps}",
            f"log.interval={log_interval}",
            "train.micro_batch_size=8",
            *(["zero.overlap_comm=true"] if overlap else []),
        ],
        scratch / f"run-{name}",
        ranks=2,
        threads_per_rank=1,
        timeout_s=timeout_s,
        environment={"PERFORMER_COLLECTIVES_DIR": str(counts), "PYTHONPATH": python_path},
    )
    if "error" in run or run["returncode"] != 0:
        error = run.get("error") or f"exit {run['returncode']}"
        return {"stage": stage, "overlap_comm": overlap, "error": error, "tail": run.get("output_tail")}
    ranks = [json.loads(path.read_text()) for path in sorted(counts.glob("rank*-*.json"))]
    if len(ranks) != 2:
        error = f"{len(ranks)} ranks' counts, not 2"
        return {"stage": stage, "overlap_comm": overlap, "error": error, "tail": run.get("output_tail")}
    train = [r for r in run["metrics"] if r["kind"] == "train"]
    step_seconds = []
    for previous, record in zip(train, train[1:]):  # the first window (warm-up) is left out
        window_tokens = record["tokens"] - previous["tokens"]
        step_seconds.append(window_tokens / record["tokens_per_s"] / log_interval)
    rows = [{**row, "phase": phase(row)} for row in ranks[0]]  # rank 0's; the others' are compared

    def shape(rank: list[dict]) -> list[tuple]:  # payloads aside: pickled objects differ in size by rank
        return sorted(
            collections.Counter((r["kind"], r["ours"], r["deepspeed"]) for r in rank for _ in range(r["count"])).items()
        )

    same_on_every_rank = all(shape(rank) == shape(ranks[0]) for rank in ranks[1:])
    return {
        "stage": stage,
        "overlap_comm": overlap,
        "steps": steps,
        "log_interval": log_interval,
        "step_s": statistics.median(step_seconds),
        "rows": rows,
        "same_on_every_rank": same_on_every_rank,
    }


def per_step(record: dict) -> list[dict]:
    """The collectives of one optimizer step: kind, payload, calls per step, measured seconds per step."""
    grouped: dict[tuple, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for row in record["rows"]:
        if row["phase"] != "step":
            continue
        site = row["deepspeed"] or row["ours"]
        key = (row["kind"], row["bytes"], site, row["async"], row["ranks"])
        grouped[key][0] += row["count"] / record["steps"]
        grouped[key][1] += row["seconds"] / record["steps"]
    return [
        {"kind": k, "bytes": b, "site": s, "async": a, "ranks": n, "per_step": c, "seconds_per_step": t}
        for (k, b, s, a, n), (c, t) in sorted(grouped.items(), key=lambda item: (-item[1][0], item[0][1]))
    ]


def phase_counts(record: dict) -> dict[str, float]:
    totals = collections.Counter()
    for row in record["rows"]:
        totals[row["phase"]] += row["count"]
    logs = record["steps"] // record["log_interval"]
    return {
        "per_step": totals["step"] / record["steps"],
        "per_log": totals["log"] / max(logs, 1),
        "per_checkpoint": totals["checkpoint"],  # one save, at the end
        "setup": totals["setup"],
    }


# ----------------------------------------------------------------------------- latency


def _latency_rank(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    medians = {}
    for size in LATENCY_BYTES:
        tensor = torch.zeros(max(1, size // 4))
        repeats = 400 if size <= 16384 else 40
        for _ in range(20):
            dist.all_reduce(tensor)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - started)
        medians[size] = statistics.median(times)
    if rank == 0:
        Path(out).write_text(json.dumps(medians))
    dist.destroy_process_group()


def measure_latency(scratch: Path) -> dict[int, float]:
    import torch.multiprocessing as mp

    out = scratch / "latency.json"
    mp.spawn(_latency_rank, args=(common.free_port(), str(out)), nprocs=2, join=True)
    return {int(size): seconds for size, seconds in json.loads(out.read_text()).items()}


def latency_at(latency: dict[int, float], payload: int) -> float:
    """Interpolated (log-log) measured latency for a payload."""
    sizes = sorted(latency)
    payload = min(max(payload, sizes[0]), sizes[-1])
    for low, high in zip(sizes, sizes[1:]):
        if payload <= high:
            f = math.log(payload / low) / math.log(high / low)
            return latency[low] * (latency[high] / latency[low]) ** f
    return latency[sizes[-1]]


# ----------------------------------------------------------------------------- share


def shares(records: list[dict], latency: dict[int, float]) -> list[dict]:
    """Per stage: the small collectives per step, their time at 2 ranks, and their share of the
    step at 64 / 512 / 4,096 GPUs (scale_on_paper's latency model and projected step times)."""
    gpus = ",".join(map(str, PROJECTED_GPUS))
    arguments = scale_on_paper.parser().parse_args(["--gpus", gpus, "--step-overhead", "", "--checkpoint-io", ""])
    projected = scale_on_paper.compute(arguments)["projections"]
    out = []
    for record in records:
        if "error" in record or record.get("overlap_comm"):
            continue
        small = [
            row
            for row in per_step(record)
            if row["bytes"] < SMALL_BYTES and not row["async"] and row["ranks"] > 1  # a group of one is local
        ]
        count = sum(row["per_step"] for row in small)
        modelled = sum(row["per_step"] * latency_at(latency, max(row["bytes"], 4)) for row in small)
        row = {
            "stage": record["stage"],
            "small_per_step": count,
            "small_s_2_ranks_modelled": modelled,
            "small_s_2_ranks_measured": sum(row["seconds_per_step"] for row in small),
            "step_s_2_ranks": record["step_s"],
            "share_2_ranks": modelled / record["step_s"],
        }
        stage_name = f"zero{record['stage']}"
        for gpus in PROJECTED_GPUS:
            projection = next(p for p in projected if p["stage"] == stage_name and p["gpus"] == gpus)
            seconds = count * arguments.hop_latency_us * 1e-6 * math.log2(gpus)
            row[f"small_s_{gpus}"] = seconds
            row[f"step_s_{gpus}"] = projection["step_s_measured"]
            row[f"share_{gpus}"] = seconds / projection["step_s_measured"]
        out.append(row)
    return out


# ----------------------------------------------------------------------------- report


def size_text(payload: int) -> str:
    if payload >= 2**20:
        return f"{payload / 2**20:.1f} MiB"
    return f"{payload / 2**10:.1f} KiB" if payload >= 2**10 else f"{payload} B"


def collectives_table(results: dict) -> str:
    lines = []
    for record in results["records"]:
        if record.get("overlap_comm"):
            continue
        if "error" in record:
            lines.append(f"ZeRO-{record['stage']}: {record['error']}\n")
            continue
        rows = [
            [
                row["kind"] + (" (async)" if row["async"] else "") + (" (group of 1)" if row["ranks"] == 1 else ""),
                size_text(row["bytes"]),
                row["site"],
                f"{row['per_step']:g}",
                common.seconds(row["seconds_per_step"]),
            ]
            for row in per_step(record)
        ]
        counts = phase_counts(record)
        lines.append(
            f"**ZeRO-{record['stage']}** (step {common.seconds(record['step_s'])}; besides these, "
            f"{counts['per_log']:g} per log interval, {counts['per_checkpoint']} per save, "
            f"{counts['setup']} at start-up):\n\n"
            + common.table(["collective", "payload", "called from", "per step", "time per step"], rows, "llllr")
        )
    return "\n".join(lines)


def share_table(results: dict) -> str:
    rows = []
    for row in results["shares"]:
        cells = [
            f"ZeRO-{row['stage']}",
            f"{row['small_per_step']:g}",
            f"{common.seconds(row['small_s_2_ranks_modelled'])} of {common.seconds(row['step_s_2_ranks'])} "
            f"({row['share_2_ranks'] * 100:.2f}%)",
        ]
        cells += [
            f"{common.seconds(row[f'small_s_{gpus}'])} of {common.seconds(row[f'step_s_{gpus}'])} "
            f"({row[f'share_{gpus}'] * 100:.2f}%)"
            for gpus in PROJECTED_GPUS
        ]
        rows.append(cells)
    header = ["stage", "small collectives per step", "2 CPU ranks (measured)"]
    header += [f"{gpus:,} GPUs (`large`, projected)" for gpus in PROJECTED_GPUS]
    return common.table(header, rows, "lr" + "r" * (len(header) - 2))


def latency_table(results: dict) -> str:
    rows = [[size_text(int(size)), common.seconds(seconds)] for size, seconds in results["latency_s"].items()]
    return common.table(["payload", "all-reduce, 2 ranks (gloo)"], rows, "lr")


def overlap_table(results: dict) -> str:
    """Step time with DeepSpeed's overlap_comm off (the default) and on, per stage measured both ways."""
    by_stage = collections.defaultdict(dict)
    for record in results["records"]:
        if "error" not in record:
            by_stage[record["stage"]][bool(record.get("overlap_comm"))] = record["step_s"]
    rows = [
        [f"ZeRO-{stage}", common.seconds(off), common.seconds(on), f"{on / off:.3f}"]
        for stage, (off, on) in sorted((stage, (t[False], t[True])) for stage, t in by_stage.items() if len(t) == 2)
    ]
    return common.table(["stage", "overlap_comm off", "on", "on / off"], rows, "lrrr")


def comparison_table(results: dict, before: dict) -> str:
    """Before and after the fold, per stage: the small collectives of a step and of a log interval,
    and their share of the step now, measured on 2 CPU ranks and projected for `large`."""
    earlier = {row["stage"]: row for row in before["shares"]}
    logs_before = {r["stage"]: phase_counts(r)["per_log"] for r in before["records"] if "error" not in r}
    logs_now = {
        r["stage"]: phase_counts(r)["per_log"]
        for r in results["records"]
        if "error" not in r and not r.get("overlap_comm")
    }
    rows = []
    for row in results["shares"]:
        stage = row["stage"]
        rows.append(
            [
                f"ZeRO-{stage}",
                f"{earlier[stage]['small_per_step']:g} -> {row['small_per_step']:g}",
                f"{logs_before[stage]:g} -> {logs_now[stage]:g}",
                f"{earlier[stage]['share_2_ranks'] * 100:.2f}% -> {row['share_2_ranks'] * 100:.2f}%",
                " / ".join(f"{row[f'share_{gpus}'] * 100:.3f}%" for gpus in PROJECTED_GPUS),
            ]
        )
    header = ["stage", "small collectives per step", "per log interval", "share of the step, 2 CPU ranks"]
    header.append("share, " + " / ".join(f"{gpus:,}" for gpus in PROJECTED_GPUS) + " GPUs (`large`, measured MFU)")
    return common.table(header, rows, "lrrrr")


def markdown(results: dict) -> str:
    overlap = overlap_table(results)
    return (
        "# Per-step overhead\n\n"
        "## Small collectives' share of the step\n\n"
        + share_table(results)
        + ("\n## overlap_comm (2 CPU ranks, tiny config)\n\n" + overlap if overlap.count("\n") > 2 else "")
        + "\n## Every collective of an optimizer step (2 CPU ranks, tiny config, rank 0)\n\n"
        + collectives_table(results)
        + "\n## Latency on this machine\n\n"
        + latency_table(results)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--log-interval", type=int, default=4)
    parser.add_argument("--stages", default=",".join(map(str, STAGES)))
    parser.add_argument("--overlap-stages", default="2,3", help="stages also run with zero.overlap_comm=true")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--name", default="step_overhead")
    args = parser.parse_args()
    scratch = ROOT / "runs" / "bench-step-overhead"
    scratch.mkdir(parents=True, exist_ok=True)
    latency = measure_latency(scratch)
    records = []
    for stage in (int(stage) for stage in args.stages.split(",")):
        record = profile(stage, args.data, scratch, args.steps, args.log_interval, args.timeout)
        print(json.dumps({k: v for k, v in record.items() if k != "rows"}), flush=True)
        records.append(record)
    for stage in (int(stage) for stage in filter(None, args.overlap_stages.split(","))):
        record = profile(stage, args.data, scratch, args.steps, args.log_interval, args.timeout, overlap=True)
        print(json.dumps({k: v for k, v in record.items() if k != "rows"}), flush=True)
        records.append(record)
    results = {
        "machine": common.machine(),
        "settings": {"steps": args.steps, "log_interval": args.log_interval, "small_bytes": SMALL_BYTES},
        "latency_s": {str(size): seconds for size, seconds in latency.items()},
        "records": records,
    }
    results["shares"] = shares(records, latency)
    common.publish(args.name, results, markdown(results))


if __name__ == "__main__":
    main()
