"""Memory per rank under ZeRO 0, 1, 2, 3 and 3 + CPU offload: DeepSpeed's estimates vs what the ranks hold.

    python benchmarks/zero_memory.py          # `small` preset, bf16, 2 CPU ranks (a few minutes)

zero3-sized is ZeRO-3 with zero.bucket_elements=65536 (d_model^2) and zero.persistence_threshold=2560
(10 x d_model) instead of DeepSpeed's defaults (5e8 and 1e5).

Each stage is one real 2-rank job of the trainer (`deepspeed --num_gpus 2 --module
launcher.pretrain --config configs/small.yaml --config configs/zeroN.yaml --set ...`), a few steps
long, in its own processes. The trainer's "memory" record (launcher/memory.py) gives, per rank, at
the last step after the backward and before the optimizer step (weights, gradients and optimizer
state all alive): the bytes of the tensors the engine holds, by role (parameters, gradients,
optimizer = fp32 master weights + Adam moments, buffers = reduce buckets and other staging
tensors; deduplicated by storage, counted at storage size), and the rank's peak resident set.

Beside them, DeepSpeed's own estimators (deepspeed.runtime.zero.stage_1_and_2 /
stage3.estimate_zero{2,3}_model_states_mem_needs, the functions behind the *_all_live printers),
for the same parameter count and 2 ranks on one node. DeepSpeed has none for stages 0 and 1: the
table uses the same accounting (2 bytes of 16-bit weights, 2 of 16-bit gradients, 4 + 4 + 4 of fp32
master weights, gradients and Adam moments... as its comment spells out: "2 = params_16bit, 18 =
2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit"), unpartitioned for
stage 0 and with only the 16 optimizer bytes partitioned for stage 1.

The issue's target: ZeRO-3's per-rank model-state bytes at most 0.55 x ZeRO-0's on 2 ranks.

Writes benchmarks/results/<name>.json and <name>.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

STAGES = {
    "zero0": ([], ["zero.stage=0"]),
    "zero1": (["configs/zero1.yaml"], []),
    "zero2": (["configs/zero2.yaml"], []),
    "zero3": (["configs/zero3.yaml"], []),
    "zero3-offload": (["configs/zero3-offload.yaml"], []),
    # ZeRO-3 with DeepSpeed's buckets sized to the model (d_model^2 elements, as Hugging Face's
    # "auto" values do) and the persistence threshold at 10 x d_model, so that only norms stay whole.
    "zero3-sized": (["configs/zero3.yaml"], ["zero.bucket_elements=65536", "zero.persistence_threshold=2560"]),
}
ROLES = ("parameters", "gradients", "optimizer", "buffers")
TARGET_RATIO = 0.55


def run_stage(name: str, args, out_dir: Path) -> dict:
    """One 2-rank job of the trainer; its last "memory" record and its tokens/s."""
    overlays, sets = STAGES[name]
    settings = [
        f"data.manifest={args.data}",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch}",
        f"data.input_length={args.length}",
        "data.num_workers=0",
        f"precision={args.precision}",
        *sets,
        *args.set,
    ]
    run = common.run_trainer(
        ["configs/small.yaml", *overlays], settings, out_dir / name, args.ranks, args.threads_per_rank, args.budget_s
    )
    if "error" in run:
        return {"stage": name, "error": run["error"]}
    record: dict = {"stage": name, "wall_s": run["wall_s"]}
    memory = [r for r in run["metrics"] if r["kind"] == "memory"]
    if run["returncode"] != 0 or not memory:
        return {**record, "error": f"exit {run['returncode']}", "output_tail": run["output_tail"]}
    last = memory[-1]
    record.update(step=last["step"], per_rank=last["per_rank"])
    train = [r for r in run["metrics"] if r["kind"] == "train" and r["step"] > 1]
    if train:
        record["tokens_per_s"] = sorted(r["tokens_per_s"] for r in train)[len(train) // 2]
    return record


def parameter_counts(args) -> dict:
    """Total parameters (tied embeddings once) and the largest module's own, of the trainer's model."""
    from data.shards import Manifest
    from launcher.config import load_config
    from launcher.engine import build_model_config
    from performer.models import build_model

    config = load_config([str(ROOT / "configs" / "small.yaml")], [f"data.manifest={args.data}", *args.set])
    model = build_model(config.model.kind, build_model_config(config, Manifest.load(args.data).special))
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied matrix once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    persistent = sum(p.numel() for p in model.parameters() if p.numel() < args.persistence_threshold)
    return {"parameters": total, "largest_layer_parameters": largest, "below_stage3_persistence_threshold": persistent}


def estimates(counts: dict, ranks: int) -> dict[str, int]:
    """DeepSpeed's per-GPU model-state estimates (bytes) for each configuration, ranks on one node."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = counts["parameters"], counts["largest_layer_parameters"]
    (
        _,
        zero2,
    ) = estimate_zero2_model_states_mem_needs(total, ranks, 1, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(
        total, largest, ranks, 1, cpu_offload=False, cpu_offload_params=False, zero_init=False
    )
    offload_cpu, offload_gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, ranks, 1, cpu_offload=True, cpu_offload_params=True, zero_init=False
    )
    return {
        # Stages 0 and 1 with DeepSpeed's accounting (no estimator of its own): 2 + 18 per parameter
        # whole, and 2 + 2 whole + 16 partitioned.
        "zero0": 20 * total,
        "zero1": 4 * total + 16 * total // ranks,
        "zero2": zero2,
        "zero3": zero3,
        "zero3-sized": zero3,
        "zero3-offload": offload_gpu,
        "zero3-offload_cpu_per_node": offload_cpu,
    }


def summarise(records: list[dict], counts: dict) -> dict:
    held = {
        r["stage"]: max(rank["total"] - rank["buffers"] for rank in r["per_rank"]) for r in records if "per_rank" in r
    }
    summary: dict = {}
    for stage, value in held.items():
        summary[f"bytes_per_parameter@{stage}"] = value / counts["parameters"]
    if "zero0" in held:
        for stage, value in held.items():
            summary[f"ratio_vs_zero0@{stage}"] = value / held["zero0"]
    if "zero0" in held and "zero3" in held:
        summary["zero3_target_met"] = held["zero3"] / held["zero0"] <= TARGET_RATIO
    return summary


def markdown(results: dict) -> str:
    settings, counts, estimate = results["settings"], results["counts"], results["estimates"]
    rows = []
    for record in results["records"]:
        stage = record["stage"]
        if "per_rank" not in record:
            rows.append([stage, "-", record.get("error", ""), *[""] * 8])
            continue
        ranks = record["per_rank"]
        worst = max(ranks, key=lambda rank: rank["total"] - rank["buffers"])
        states = worst["total"] - worst["buffers"]
        ratio = results["summary"].get(f"ratio_vs_zero0@{stage}")
        rows.append(
            [
                stage,
                common.mebibytes(estimate[stage]),
                common.mebibytes(states),
                f"{states / counts['parameters']:.2f}",
                *(common.mebibytes(worst[role]) for role in ROLES),
                "-" if ratio is None else f"{ratio:.3f}",
                " / ".join(common.mebibytes(rank["peak_rss_bytes"]) for rank in ranks),
            ]
        )
    summary = results["summary"]
    held0, held3 = (
        max((r["total"] - r["buffers"] for r in record["per_rank"]), default=None)
        for record in (
            next((x for x in results["records"] if x["stage"] == stage and "per_rank" in x), {"per_rank": []})
            for stage in ("zero0", "zero3")
        )
    )
    buffers3 = max(
        (r["buffers"] for x in results["records"] if x["stage"] == "zero3" for r in x.get("per_rank", [])), default=0
    )
    persistent_elements = counts["below_stage3_persistence_threshold"]
    persistent_bytes = persistent_elements * (2 if settings["precision"] != "fp32" else 4)
    lines = [
        f"`small` preset seq2seq ({counts['parameters'] / 1e6:.2f}M parameters, tied embeddings counted once), "
        f"{settings['precision']}, {settings['ranks']} CPU ranks (gloo, {settings['threads_per_rank']} thread each), "
        f"micro batch {settings['micro_batch']} x {settings['length']} input tokens, {settings['steps']} steps, "
        "figures of the last step after its backward (before the optimizer step); the rank holding most:\n",
        common.table(
            [
                "ZeRO",
                "DeepSpeed estimate / rank",
                "model states held / rank",
                "bytes / param",
                *ROLES,
                "vs ZeRO-0",
                "peak RSS per rank",
            ],
            rows,
        ),
        "",
        "- model states = parameters + gradients + optimizer (fp32 master weights and Adam moments), the "
        "quantity DeepSpeed's estimators describe; `buffers` (reduce buckets and other staging tensors, "
        "counted at their allocated size) are listed apart and not in the ratio.",
        f"- target: ZeRO-3 model states <= {TARGET_RATIO} x ZeRO-0 on {settings['ranks']} ranks: "
        + ("met" if summary.get("zero3_target_met") else "missed" if "zero3_target_met" in summary else "not measured")
        + (f" ({summary['ratio_vs_zero0@zero3']:.3f})" if "ratio_vs_zero0@zero3" in summary else ""),
        f"- parameters below ZeRO-3's persistence threshold ({settings['persistence_threshold']:,} elements, kept "
        f"whole on every rank as well as partitioned: at d_model 256 every attention matrix, 65,536 elements): "
        f"{counts['below_stage3_persistence_threshold'] / 1e6:.2f}M, "
        f"{common.mebibytes(persistent_bytes)}"
        " per rank of ZeRO-3's parameters column; without them (a wider model, or a lower threshold) ZeRO-3 would "
        + (
            f"hold {(held3 - persistent_bytes) / held0:.3f} x ZeRO-0."
            if held0 and held3
            else "hold about 0.5 x ZeRO-0."
        ),
        "- buffers: ZeRO-3 keeps DeepSpeed's reduce bucket for good, reduce_bucket_size = 5e8 elements by default "
        f"(the trainer does not set it), {common.mebibytes(buffers3)} here whatever the model's size"
        + (f", {buffers3 / held3:.0f} x the model states " if held3 and buffers3 else " ")
        + "(on a CPU its pages are only touched as far as gradients are written, so it barely shows in RSS; on a GPU "
        "it is allocated whole). ZeRO-1/2 allocate a bucket of the same size at each backward and release it after "
        "the reduction, so it is absent from the after-backward figure but counts in a GPU's peak. Sizing "
        "reduce_bucket_size (and stage3_prefetch_bucket_size) to the model removes both: zero.bucket_elements "
        "and zero.persistence_threshold (the zero3-sized row).",
        "- DeepSpeed estimates: estimate_zero2_model_states_mem_needs / estimate_zero3_model_states_mem_needs "
        "(GPU column, cpu_offload off; zero3-offload: offload_optimizer and offload_param on); ZeRO-0 = 20 bytes "
        "x parameters, ZeRO-1 = 4 + 16 / ranks bytes x parameters, in the estimators' accounting.",
        '- CPU offload on a CPU-only machine moves nothing (the "device" is host memory): the offload row shows what '
        "the ranks hold in all; on a GPU the optimizer state and the parameter partitions would live in host memory.",
        "- peak RSS includes the Python, torch and DeepSpeed runtime (about 0.4-0.5 GiB per rank here) and the "
        "activations of one micro batch.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--data", default="runs/data/train", help="train manifest ('performer data prepare')")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--steps", type=int, default=3, help="Adam's moments exist from the first step on")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument(
        "--persistence-threshold",
        type=int,
        default=100_000,
        help="DeepSpeed's stage3_param_persistence_threshold (its default; for the report)",
    )
    parser.add_argument("--set", nargs="*", default=[], help="extra trainer overrides for every stage")
    parser.add_argument("--budget-s", type=float, default=600.0)
    parser.add_argument("--name", default="zero_memory")
    args = parser.parse_args(argv)
    counts = parameter_counts(args)
    records = []
    with tempfile.TemporaryDirectory(prefix="zero_memory-") as out_dir:
        for stage in args.stages.split(","):
            record = run_stage(stage, args, Path(out_dir))
            print(json.dumps(record), flush=True)
            records.append(record)
    settings = {
        key: getattr(args, key)
        for key in (
            "ranks",
            "threads_per_rank",
            "precision",
            "steps",
            "micro_batch",
            "length",
            "persistence_threshold",
            "set",
        )
    }
    results = {
        "settings": settings,
        "machine": common.machine(),
        "counts": counts,
        "estimates": estimates(counts, args.ranks),
        "records": records,
    }
    results["summary"] = summarise(records, counts)
    common.publish(args.name, results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
