"""Attention alone, forward + backward, against sequence length: our FAVOR+ vs performer-pytorch, SDPA and
flash-linear-attention.

    python benchmarks/attention.py                  # CPU, fp32: the README's table and plot
    python benchmarks/attention.py --device cuda --dtype bf16 --name attention-gpu --lengths 4096,16384,65536
    python benchmarks/attention.py --device cuda --dtype bf16 --impls ours-causal,ours-causal@c64w4s2  # plans

B=1, H=8, D=64, M=256 random features unless told otherwise (--batch, --heads, --head-dim,
--nb-features). fla-causal needs flash-linear-attention installed (a GPU baseline: its kernels are
Triton); it gets our features ready-made, so its time leaves out the feature map ours includes.
Each (implementation, length) runs in its own process: median time of forward + backward over
several repeats after a warm-up, and the memory the op itself adds (CPU: peak resident set minus
the resident set once the inputs exist; CUDA: peak allocated minus allocated before). The
machine's dense matmul rate is measured in the same run, and our kernels' achieved rate is given
against it, from an analytical count of the flops the chunk-parallel algorithm needs
(recomputation in the backward not counted).
An implementation named with "@" runs another plan: "@C" forces the chunk length, "@c64w4s2" the
Triton kernels' chunk, num_warps and num_stages (m: the feature tile); the summary then names the
fastest plan per length (the GPU check's tune phase).
A configuration predicted (from the previous length) to take longer than --budget-s is skipped
and recorded as such, never silently dropped.

Writes benchmarks/results/<name>.json, <name>.md and <name>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

IMPLEMENTATIONS = {
    "ours-causal": "our fused causal FAVOR+ (the Triton kernels on CUDA, the torch op on CPU)",
    "ours-bidirectional": "our fused bidirectional FAVOR+ (likewise)",
    "ours-torch-causal": "our fused causal FAVOR+ in torch ops (on CUDA: the op before the Triton kernels)",
    "ours-torch-bidirectional": "our fused bidirectional FAVOR+ in torch ops",
    "fla-causal": "flash-linear-attention's chunk_linear_attn (normalised), given our features precomputed",
    "ours-causal-bf16-logits": "our causal Triton kernels, logits from one bf16 part (not two): what the split costs",
    "ours-unfused-causal": "feature map + chunk-parallel causal FAVOR+ through autograd (before fusing)",
    "performer-pytorch-causal": "performer-pytorch 1.1 FastAttention(causal=True), its CPU path",
    "performer-pytorch-bidirectional": "performer-pytorch 1.1 FastAttention(causal=False)",
    "sdpa-causal": "torch scaled_dot_product_attention(is_causal=True)",
    "sdpa": "torch scaled_dot_product_attention",
}
QUADRATIC = ("sdpa-causal", "sdpa")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- flop counts


def favor_flops(length: int, head_dim: int, nb_features: int, chunk: int, causal: bool) -> float:
    """Flops of one (batch, head) slice, forward + backward, recomputation not counted.

    E = D + 1 value columns (the normaliser rides along as a column of ones). Forward: two feature
    maps (2 L D M each); causal adds per chunk q k^T (2 L C M), its product with V (2 L C E), the
    chunk states k^T V (2 L M E) and q times the prefix state (2 L M E). The backward is the
    transposed products: A = dN V^T (2 L C E), A k and A^T q (2 x 2 L C M), P^T dN (2 L C E),
    four state products (4 x 2 L M E), and the feature-map gradients (2 x 2 L M D).
    """
    e = head_dim + 1
    features = 2 * 2 * length * head_dim * nb_features
    if not causal:
        return features + 2 * 2 * length * nb_features * e + 4 * 2 * length * nb_features * e + features
    forward = features + 2 * length * chunk * (nb_features + e) + 2 * 2 * length * nb_features * e
    backward = 2 * 2 * length * chunk * e + 2 * 2 * length * chunk * nb_features + 4 * 2 * length * nb_features * e
    return forward + backward + features


# ----------------------------------------------------------------------------- one configuration (worker)


# "ours-causal@c64w4s2": our Triton kernels under that plan (performer.attention.triton.parse_plan:
# chunk, warps, stages, m features per tile; the rest make_plan's, PERFORMER_FAVOR_PLAN ignored);
# "@128" alone is a chunk length (of any op with chunks).
TRITON_IMPLEMENTATIONS = ("ours-causal", "ours-bidirectional", "ours-causal-bf16-logits")


def plan_text(suffix: str) -> str:
    """An implementation's "@..." suffix as a plan's short form: "128" (a chunk alone) -> "c128"."""
    return f"c{suffix}" if suffix.isdigit() else suffix


def plan_overrides(suffix: str) -> dict[str, int]:
    """What an implementation's "@..." suffix forces: "" -> {}, "128" -> {"chunk": 128},
    "c64w4s2" -> {"chunk": 64, "num_warps": 4, "num_stages": 2} ("m16": block_m)."""
    from performer.attention.triton import parse_plan

    return parse_plan(plan_text(suffix), source=f"the implementation's @{suffix}")


def build(
    implementation: str, length: int, heads: int, head_dim: int, nb_features: int, device: str, dtype: torch.dtype
):
    """For one implementation: the attention (inputs...) -> out, the chunk length it takes if any,
    and ``prepare`` (q, k, v) -> the inputs it takes, made before the timing (leaves with gradients)."""
    from performer.attention.fused import default_chunk_size, favor_attention, favor_attention_torch
    from performer.attention.naive import causal_linear_attention
    from performer.feature_maps import favor_features, gaussian_orthogonal_projection

    projection = gaussian_orthogonal_projection(nb_features, head_dim, seed=0).to(device)
    implementation, _, suffix = implementation.partition("@")
    forced = plan_overrides(suffix)
    kernel_fields = set(forced) - {"chunk"}
    in_triton = implementation in TRITON_IMPLEMENTATIONS
    if kernel_fields and not in_triton:
        raise ValueError(
            f"@{suffix} sets the Triton kernels' plan: only {', '.join(TRITON_IMPLEMENTATIONS)} take it "
            f"(@C alone forces the chunk of {implementation})"
        )
    # A named plan runs the kernels under it (on the CPU: in the interpreter); None: make_plan's own
    # plan, with PERFORMER_FAVOR_PLAN if set, as users get it.
    named_plan = plan_text(suffix) if in_triton and forced and (device == "cuda" or kernel_fields) else None
    if in_triton and (device == "cuda" or named_plan):
        from performer.attention import triton as favor_triton

        # The chunk the kernels will take (make_plan rounds it and caps it for the dtype).
        shape_only = torch.empty(1, heads, length, head_dim, dtype=dtype, device="meta")
        chunk = favor_triton.make_plan(shape_only, shape_only, shape_only, nb_features, None, named_plan).chunk
    else:
        chunk = forced.get("chunk") or default_chunk_size(nb_features)

    def unchanged(q, k, v):
        return q, k, v

    if named_plan or implementation == "ours-causal-bf16-logits":
        import dataclasses

        from performer.attention import triton as favor_triton

        changes = {"split_logits": False} if implementation == "ours-causal-bf16-logits" else {}
        causal = implementation != "ours-bidirectional"

        def planned(q, k, v):
            plan = favor_triton.make_plan(q, k, v, nb_features, None, named_plan)
            plan = dataclasses.replace(plan, **changes)
            return favor_triton.favor_attention_planned(q, k, v, projection, None, causal, None, plan)

        return planned, chunk, unchanged
    if implementation in ("ours-causal", "ours-bidirectional", "ours-torch-causal", "ours-torch-bidirectional"):
        causal = implementation.endswith("-causal")
        op = favor_attention_torch if "-torch-" in implementation else favor_attention
        return (lambda q, k, v: op(q, k, v, projection, causal=causal, chunk_size=chunk)), chunk, unchanged
    if implementation == "fla-causal":
        from fla.ops.linear_attn import chunk_linear_attn

        def features_first(q, k, v):
            # fla takes (B, L, H, K) features and (B, L, H, D) values; scale 1: phi already carries it.
            with torch.no_grad():
                phi_q, phi_k = favor_features(q, projection, True), favor_features(k, projection, False)
            return tuple(x.transpose(1, 2).to(v.dtype).contiguous().requires_grad_() for x in (phi_q, phi_k, v))

        def fla(phi_q, phi_k, v):
            return chunk_linear_attn(phi_q, phi_k, v, scale=1.0, normalize=True)[0]

        return fla, None, features_first
    if implementation == "ours-unfused-causal":

        def unfused(q, k, v):
            phi_q, phi_k = favor_features(q, projection, True), favor_features(k, projection, False)
            return causal_linear_attention(phi_q, phi_k, v, chunk)

        return unfused, chunk, unchanged
    if implementation.startswith("performer-pytorch"):
        from performer_pytorch import FastAttention

        attention = FastAttention(dim_heads=head_dim, nb_features=nb_features, causal=implementation.endswith("causal"))
        return attention.to(device), None, unchanged
    if implementation in QUADRATIC:
        causal = implementation == "sdpa-causal"
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)), None, unchanged
    raise ValueError(f"unknown implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}")


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = args.device, DTYPES[args.dtype]
    attention, chunk, prepare = build(
        args.impl, args.length, args.heads, args.head_dim, args.nb_features, device, dtype
    )
    shape = (args.batch, args.heads, args.length, args.head_dim)
    inputs = prepare(*(torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(3)))
    upstream = torch.randn_like(attention(*inputs))

    def step():
        for tensor in inputs:
            tensor.grad = None
        attention(*inputs).backward(upstream)

    if device == "cpu":
        before = common.resident_bytes()
    else:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    first = common.median_seconds(step, repeats=1, device=device, warmup=0)["median_s"]
    # On a GPU the first call also compiles (Triton) or autotunes (fla): a second one says how long a call takes.
    typical = first if device == "cpu" else common.median_seconds(step, repeats=1, device=device, warmup=0)["median_s"]
    # Slow baselines (performer-pytorch's causal path takes minutes at 16k) get fewer repeats.
    repeats = args.repeats if typical < args.slow_call_s else max(1, args.repeats // 3)
    timing = common.median_seconds(step, repeats=repeats, device=device, warmup=0)
    added = (common.peak_resident_bytes() if device == "cpu" else torch.cuda.max_memory_allocated()) - before
    record = {"impl": args.impl, "length": args.length, "first_call_s": first, **timing, "memory_bytes": added}
    base, _, suffix = args.impl.partition("@")
    forced = plan_overrides(suffix)
    if forced:
        record["forced_plan"] = forced
    if base in TRITON_IMPLEMENTATIONS and not forced:
        from performer.attention.triton import PLAN_ENV

        if os.environ.get(PLAN_ENV):
            record["environment_plan"] = os.environ[PLAN_ENV]
    if device == "cuda" and base in ("ours-causal", "ours-bidirectional"):
        # favor_attention falls back to the torch op where the Triton kernels cannot run: say which
        # ran (a named plan calls the kernels themselves).
        from performer.attention.fused import triton_kernels_for

        by_kernels = bool(forced) or triton_kernels_for(inputs[0], inputs[1]) is not None
        record["kernels"] = "triton" if by_kernels else "torch op"
    if args.impl.startswith("ours") and chunk is not None:
        record["chunk"] = chunk
        causal = "bidirectional" not in args.impl
        flops = args.batch * args.heads * favor_flops(args.length, args.head_dim, args.nb_features, chunk, causal)
        record["flops"] = flops
        record["flop_rate"] = flops / timing["median_s"]
    return record


# ----------------------------------------------------------------------------- the sweep (driver)


def predicted_seconds(previous: dict | None, implementation: str, length: int) -> float | None:
    """Time of one call at ``length`` extrapolated from the previous length (quadratic or linear)."""
    if not previous or "median_s" not in previous:
        return None
    ratio = length / previous["length"]
    return previous["median_s"] * (ratio**2 if implementation in QUADRATIC else ratio)


def sweep(args, progress: Callable[[dict], None] | None = None) -> dict:
    """Every implementation at every length; ``progress`` gets the results so far after each
    implementation (settings.complete false until the last)."""
    script = Path(__file__).resolve()
    shared = [
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--batch",
        str(args.batch),
        "--heads",
        str(args.heads),
        "--head-dim",
        str(args.head_dim),
        "--nb-features",
        str(args.nb_features),
    ]
    dtype = DTYPES[args.dtype]
    settings = {
        key: getattr(args, key)
        for key in ("device", "dtype", "threads", "repeats", "batch", "heads", "head_dim", "nb_features")
    }
    machine, gemm_flop_rate = common.machine(), common.gemm_rate(args.device, dtype)
    records = []

    def results(complete: bool) -> dict:
        return {
            "settings": {**settings, "complete": complete},
            "machine": machine,
            "gemm_flop_rate": gemm_flop_rate,
            "records": records,
            "summary": summarise(records),
        }

    for implementation in args.impls.split(","):
        if progress is not None and records:
            progress(results(complete=False))
        if args.device == "cuda":
            # One process per implementation: on a GPU the start-up, not the memory accounting
            # (peak statistics are reset per length), is what separate processes would cost.
            records += _cuda_lengths(script, shared, implementation, args)
            continue
        previous = None
        for length in (int(n) for n in args.lengths.split(",")):
            if implementation.startswith("performer-pytorch") and length > args.max_baseline_length:
                record = {
                    "impl": implementation,
                    "length": length,
                    "skipped": f"above --max-baseline-length {args.max_baseline_length}",
                }
                if previous:  # what it would need: an estimate, not a measurement, and recorded as one
                    record["estimated_memory_bytes"] = previous["memory_bytes"] * length // previous["length"]
                    record["estimated_from"] = f"memory_bytes at n={previous['length']}, taken as linear in length"
                records.append(record)
                continue
            predicted = predicted_seconds(previous, implementation, length)
            # The worker gives slow calls a third of the repeats (see measure).
            calls = 1 + (args.repeats if (predicted or 0) < args.slow_call_s else max(1, args.repeats // 3))
            if predicted is not None and predicted * calls > args.budget_s:
                records.append(
                    {"impl": implementation, "length": length, "skipped": f"predicted {predicted:.0f} s per call"}
                )
                continue
            record = common.run_isolated(
                script, [*shared, "--impl", implementation, "--length", str(length)], timeout_s=args.budget_s * 3
            )
            record.update(impl=implementation, length=length)
            print(json.dumps(record), flush=True)
            records.append(record)
            previous = record if "median_s" in record else previous
            if "error" in record:
                break  # out of memory or time at this length: longer ones will fail too
    return results(complete=True)


def _cuda_lengths(script: Path, shared: list[str], implementation: str, args) -> list[dict]:
    """Every length of one implementation in one worker process (``--worker-lengths``), shortest first;
    the worker stops at the first length that runs out of memory or predicts past the budget."""
    command = [
        sys.executable,
        str(script),
        "--worker",
        *shared,
        "--impl",
        implementation,
        "--worker-lengths",
        args.lengths,
        "--budget-s",
        str(args.budget_s),
    ]
    # Each length stops within about the budget; the first call also compiles (and fla autotunes).
    limit_s = args.budget_s * (2 + len(args.lengths.split(",")))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit_s, cwd=ROOT)
        output, failure = done.stdout, None if done.returncode == 0 else f"exit {done.returncode}"
        tail = done.stderr[-600:]
    except subprocess.TimeoutExpired as timeout:
        output, failure, tail = (timeout.stdout or b"").decode(), f"over the {limit_s:.0f} s limit", ""
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    for record in records:
        print(json.dumps(record), flush=True)
    done_lengths = {record["length"] for record in records}
    missing = [int(n) for n in args.lengths.split(",") if int(n) not in done_lengths]
    if failure and missing:
        records.append({"impl": implementation, "length": missing[0], "error": failure, "stderr_tail": tail})
    return records


def _worker_lengths(args) -> None:
    """The worker side of ``_cuda_lengths``: measure each length in turn, one JSON line each."""
    previous = None
    for length in (int(n) for n in args.worker_lengths.split(",")):
        predicted = predicted_seconds(previous, args.impl, length)
        if predicted is not None and predicted * (1 + args.repeats) > args.budget_s:
            print(json.dumps({"impl": args.impl, "length": length, "skipped": f"predicted {predicted:.2f} s per call"}))
            break
        args.length = length
        torch.cuda.empty_cache()
        try:
            record = measure(args)
        except torch.cuda.OutOfMemoryError:
            print(json.dumps({"impl": args.impl, "length": length, "error": "out of GPU memory"}), flush=True)
            break
        print(json.dumps(record), flush=True)
        previous = record


def _lookup(records: list[dict], implementation: str, length: int) -> dict | None:
    for record in records:
        if record["impl"] == implementation and record["length"] == length and "median_s" in record:
            return record
    return None


def summarise(records: list[dict]) -> dict:
    """The issue's target ratios, from records of the same run."""
    summary: dict[str, object] = {}
    lengths = sorted({record["length"] for record in records})
    for length in lengths:
        ours = _lookup(records, "ours-causal", length)
        if not ours:
            continue
        for baseline in (
            "performer-pytorch-causal",
            "sdpa-causal",
            "ours-unfused-causal",
            "ours-torch-causal",
            "fla-causal",
        ):
            other = _lookup(records, baseline, length)
            if other:
                summary[f"speedup_vs_{baseline}@{length}"] = other["median_s"] / ours["median_s"]
                if other["memory_bytes"] > 0:
                    summary[f"memory_ratio_vs_{baseline}@{length}"] = ours["memory_bytes"] / other["memory_bytes"]
    for length in lengths:
        ours, sdpa = _lookup(records, "ours-bidirectional", length), _lookup(records, "sdpa", length)
        if ours and sdpa:
            summary[f"speedup_bidirectional_vs_sdpa@{length}"] = sdpa["median_s"] / ours["median_s"]
    for base in ("ours-causal", "ours-bidirectional"):
        for length in lengths:
            # Plans tried at this length (--impls ours-causal@c64w4s2,...): the fastest, against the default's.
            tried = [
                r for r in records if r["impl"].partition("@")[0] == base and r["length"] == length and "median_s" in r
            ]
            if len(tried) < 2:
                continue
            best = min(tried, key=lambda record: record["median_s"])
            summary[f"fastest_plan_{base}@{length}"] = best["impl"]
            default = _lookup(records, base, length)
            if default:
                summary[f"fastest_plan_speedup_{base}@{length}"] = default["median_s"] / best["median_s"]
    crossover = None
    for length in lengths:
        ours, sdpa = _lookup(records, "ours-causal", length), _lookup(records, "sdpa-causal", length)
        if ours and sdpa:
            if ours["median_s"] < sdpa["median_s"]:
                crossover = length if crossover is None else crossover
            else:
                crossover = None
    summary["causal_crossover_vs_sdpa"] = crossover
    for half, whole in zip(lengths, lengths[1:]):
        small, large = _lookup(records, "ours-causal", half), _lookup(records, "ours-causal", whole)
        if small and large and whole == 2 * half and small["memory_bytes"] > 0:
            summary[f"memory_growth_ours-causal@{half}->{whole}"] = large["memory_bytes"] / small["memory_bytes"]
    return summary


# ----------------------------------------------------------------------------- reports


def markdown(results: dict) -> str:
    settings, records, gemm = results["settings"], results["records"], results["gemm_flop_rate"]
    lengths = sorted({record["length"] for record in records})
    implementations = list(dict.fromkeys(record["impl"] for record in records))
    lines = [
        f"Forward + backward, B={settings.get('batch', 1)}, H={settings['heads']}, D={settings['head_dim']}, "
        f"M={settings['nb_features']}, "
        f"{settings['dtype']} on {settings['device']} ({settings['threads']} threads); median of {settings['repeats']} "
        f"after a warm-up; memory = what the op adds. Dense matmul rate measured in the same run: "
        f"{gemm / 1e9:,.0f} GFLOP/s."
        + ("" if settings.get("complete", True) else " **Incomplete: the run was stopped or is still going.**")
        + "\n",
    ]
    header = ["implementation", *(f"n={n}" for n in lengths)]
    rows = []
    for implementation in implementations:
        cells = []
        for length in lengths:
            record = next((r for r in records if r["impl"] == implementation and r["length"] == length), None)
            if record is None:
                cells.append("")
            elif "estimated_memory_bytes" in record:
                cells.append(
                    f"skipped ({record['skipped']}; estimated {common.mebibytes(record['estimated_memory_bytes'])})"
                )
            elif "skipped" in record:
                cells.append(f"skipped ({record['skipped']})")
            elif "error" in record:
                cells.append(record["error"])
            else:
                cell = f"{common.seconds(record['median_s'])}, {common.mebibytes(record['memory_bytes'])}"
                if "flop_rate" in record:
                    cell += f", {record['flop_rate'] / gemm:.0%} of GEMM"
                cells.append(cell)
        rows.append([implementation, *cells])
    lines.append(common.table(header, rows))
    lines.append("\nRatios from this run:\n")
    for key, value in results["summary"].items():
        shown = "none" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append(f"- {key}: {shown}")
    machine = results["machine"]
    lines.append(
        f"\nMachine: {machine.get('gpu') or machine['cpu']}, torch {machine['torch']}, "
        f"load average {machine['load_average_1m']}.\n"
    )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for implementation in dict.fromkeys(record["impl"] for record in results["records"]):
        measured = [r for r in results["records"] if r["impl"] == implementation and "median_s" in r]
        if not measured:
            continue
        lengths = [r["length"] for r in measured]
        time_axis.plot(lengths, [r["median_s"] for r in measured], marker="o", label=implementation)
        memory_axis.plot(
            lengths, [max(r["memory_bytes"], 1) / 2**20 for r in measured], marker="o", label=implementation
        )
    settings = results["settings"]
    for axis, label in ((time_axis, "forward + backward (s)"), (memory_axis, "memory added by the op (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    time_axis.legend(fontsize=8)
    figure.suptitle(
        f"Attention, {settings['dtype']} on {settings['device']}, "
        f"H={settings['heads']} D={settings['head_dim']} M={settings['nb_features']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-lengths", help=argparse.SUPPRESS)
    parser.add_argument(
        "--impls",
        default=",".join(IMPLEMENTATIONS),
        help="comma-separated: "
        + ", ".join(IMPLEMENTATIONS)
        + "; ours-causal@C forces chunk length C, ours-causal@c64w4s2 the Triton kernels' chunk, "
        "num_warps and num_stages (m: block_m)",
    )
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,65536")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--nb-features", type=int, default=256)
    parser.add_argument(
        "--slow-call-s", type=float, default=10.0, help="calls slower than this get a third of the repeats"
    )
    parser.add_argument("--budget-s", type=float, default=240.0, help="skip a configuration predicted to take longer")
    parser.add_argument(
        "--max-baseline-length",
        type=int,
        default=16384,
        help="performer-pytorch is not run above this length (its memory there is recorded as an estimate)",
    )
    parser.add_argument("--name", default="attention", help="results file stem under benchmarks/results/")
    args = parser.parse_args(argv)
    if args.worker and args.worker_lengths:
        _worker_lengths(args)
        return 0
    if args.worker:
        print(json.dumps(measure(args)))
        return 0
    results = sweep(args, lambda partial: common.write_results(args.name, partial, markdown(partial)))
    common.publish(args.name, results, markdown(results), plot)
    # A failed run of our op fails the command (the GPU check reports the phase); the baselines'
    # errors (out of memory, a missing package; the torch op and the unfused one among them) are results.
    ours = ("ours-causal", "ours-bidirectional", "ours-causal-bf16-logits")
    failures = [r for r in results["records"] if r["impl"].partition("@")[0] in ours and "error" in r]
    for failure in failures:
        print(f"FAILED: {failure['impl']} at {failure['length']}: {failure['error']}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
