"""Compile the Triton FAVOR+ kernels for a GPU without one, and report what each costs a multiprocessor.

    python benchmarks/kernel_resources.py [--arch 90] [--head-dims 64,128] [--name kernel_resources]
    python benchmarks/kernel_resources.py --quick --head-dims 64   # bf16 only, nothing written: what the tests compile
    python benchmarks/kernel_resources.py --chunk 128   # another chunk than the plan's: kernel_resources-chunk128
    python benchmarks/kernel_resources.py --arch 80     # an A100's compile of the same plans: kernel_resources-sm80

Triton compiles to a cubin for any NVIDIA architecture on a CPU machine (its wheel carries
ptxas and cuobjdump); cuobjdump then reads each kernel's registers per thread, spilled bytes
(STACK) and shared memory. A kernel at 255 registers with a STACK above 0 spills to local memory,
which on a GPU costs far more than its flops: this is how the block sizes of
``performer.attention.triton.make_plan`` were chosen before any GPU ran them. Compile errors
show here too (the interpreter the tests use does not compile). Writes
benchmarks/results/<name>.{json,md} unless --quick (the default chunks of ``default_chunk`` were
chosen from kernel_resources, -chunk128 and -chunk32). Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks import common  # noqa: E402
from performer.attention import triton as favor_triton  # noqa: E402
from performer.attention import triton_kernels as kernels  # noqa: E402

# Pointer arguments holding tl.dot operands (the plan's operand dtype) and outputs (the input dtype).
OPERAND_POINTERS = {"q_ptr", "k_ptr", "v_ptr", "x_ptr", "y_ptr", "value_grad_ptr", "w_hi_ptr", "w_lo_ptr", "local_ptr"}
OUTPUT_POINTERS = {"out_ptr", "centred_out_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "grad_ptr"}
FLOAT_SCALARS = {"feature_scale", "sq_scale", "denominator_floor"}
TRITON_TYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def variants(head_dims, dtypes, plan_changes, length=16384, nb_features=256):
    """(kernel name, description, constexpr flags, plan) for every kernel and flag combination a call launches."""
    for dtype in dtypes:
        for head_dim in head_dims:
            q = torch.empty(1, 1, length, head_dim, dtype=dtype, device="meta")
            # plan="": make_plan's own plan, whatever PERFORMER_FAVOR_PLAN says (changes come from the flags).
            plan = dataclasses.replace(favor_triton.make_plan(q, q, q, nb_features, None, plan=""), **plan_changes)
            base = {
                "D": head_dim,
                "dtype": TRITON_TYPE_NAMES[dtype],
                "C": plan.chunk,
                "warps": plan.num_warps,
                "stages": plan.num_stages,
            }
            yield "query_shift_kernel", base, {}, plan
            yield "output_grad_kernel", base, {}, plan
            for is_query, reverse, causal in [(False, False, True), (False, False, False), (True, True, True)]:
                flags = dict(
                    IS_QUERY=is_query,
                    HAS_WEIGHT=is_query,
                    HAS_KEEP=not is_query,
                    REVERSE=reverse,
                    STORE_LOCAL=causal,
                    CENTRE=plan.centre_values and not is_query,  # the keys' values only
                )
                yield "states_kernel", {**base, "causal": causal, "queries": is_query}, flags, plan
            for name in ("output_kernel", "query_grad_kernel", "key_value_grad_kernel"):
                for causal in (True, False):
                    yield name, {**base, "causal": causal}, dict(CAUSAL=causal, HAS_KEEP=True), plan


def compile_variant(name, flags, plan, arch):
    fn = getattr(kernels, name)
    names = list(inspect.signature(fn.fn).parameters)
    constexprs = {**plan.compile_options(), **flags}
    launch = {"num_warps": constexprs.pop("num_warps"), "num_stages": constexprs.pop("num_stages")}
    constexprs = {key: value for key, value in constexprs.items() if key in names}  # those the kernel takes
    operand = TRITON_TYPE_NAMES[plan.operand_dtype]
    signature, attrs = {}, {}
    for index, arg in enumerate(names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            if arg in OPERAND_POINTERS:
                signature[arg] = f"*{operand}"
            elif arg in OUTPUT_POINTERS:
                signature[arg] = f"*{operand}"
            elif arg == "keep_ptr":
                signature[arg] = "*u8"
            else:
                signature[arg] = "*fp32"
            attrs[(index,)] = [["tt.divisibility", 16]]  # what torch's allocations give at launch
        elif arg in FLOAT_SCALARS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(key),): value for key, value in constexprs.items()},
        attrs=attrs,
    )
    started = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch)
    seconds = time.perf_counter() - started
    return compiled, seconds


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK (spilled bytes), SHARED of the one kernel in a cubin, through cuobjdump."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([str(cuobjdump), "-res-usage", handle.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {key.lower(): int(value) for key, value in usage.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--quick", action="store_true", help="bf16 only, no results written")
    parser.add_argument(
        "--name", help="results file stem (default kernel_resources, with the plan changes: kernel_resources-chunk128)"
    )
    parser.add_argument("--warps", type=int, help="try another num_warps than the plan's")
    parser.add_argument("--block-m", type=int, help="try another feature tile than the plan's")
    parser.add_argument("--chunk", type=int, help="try another chunk than the plan's")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("kernel_resources compiles the kernels: run it without TRITON_INTERPRET")
    plan_changes = {
        field: value
        for field, value in (("num_warps", args.warps), ("block_m", args.block_m), ("chunk", args.chunk))
        if value is not None
    }
    args.name = args.name or "kernel_resources" + "".join(
        f"-{field.replace('_', '')}{v}" for field, v in plan_changes.items()
    ) + ("" if args.arch == 90 else f"-sm{args.arch}")
    head_dims = [int(d) for d in args.head_dims.split(",")]
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float32]
    rows = []
    for name, description, flags, plan in variants(head_dims, dtypes, plan_changes):
        compiled, seconds = compile_variant(name, flags, plan, args.arch)
        usage = resource_usage(compiled.asm["cubin"])
        row = {
            "kernel": name,
            **description,
            **usage,
            "dynamic_shared": compiled.metadata.shared,
            "compile_s": round(seconds, 2),
        }
        rows.append(row)
        print(" ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    spilling = [row for row in rows if row.get("stack", 0) > 0]
    print(f"{len(rows)} kernels compiled for sm_{args.arch}; {len(spilling)} spill registers to local memory")
    print(shared_memory_verdict(rows, args.arch))
    if not args.quick:
        results = {
            "arch": args.arch,
            "triton": triton.__version__,
            "plan_changes": plan_changes,
            "machine": common.machine(),
            "rows": rows,
        }
        common.write_results(args.name, results, render(rows, args.arch))
    return 0


# Shared memory one block may use (bytes), by compute capability x 10: A100, A10/A40/RTX 30xx,
# L4/L40/RTX 40xx, H100/H200 (CUDA programming guide, "Technical Specifications").
BLOCK_SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def shared_memory_verdict(rows, arch) -> str:
    """One line: the largest shared memory a kernel asks for against what a block may have on ``arch``."""
    largest = max(rows, key=lambda row: row.get("shared", 0) + row["dynamic_shared"])
    need = largest.get("shared", 0) + largest["dynamic_shared"]
    where = f"{largest['kernel']} at D={largest['D']} {largest['dtype']}"
    if arch not in BLOCK_SHARED_LIMIT:
        return f"Largest shared memory: {need} bytes ({where}); sm_{arch}'s per-block limit is not known here."
    limit = BLOCK_SHARED_LIMIT[arch]
    verdict = "fits" if need <= limit else "DOES NOT FIT: the launch would fail"
    return f"Largest shared memory: {need} bytes ({where}), {verdict} in sm_{arch}'s {limit} bytes per block."


def render(rows, arch) -> str:
    header = "| kernel | D | dtype | C | warps | variant | registers | spilled bytes | shared (static + dynamic) |"
    lines = [
        f"Triton FAVOR+ kernels compiled for sm_{arch} on a CPU machine (no GPU ran them): per-thread "
        "registers, bytes spilled to local memory (STACK), shared memory, from cuobjdump -res-usage.",
        "",
        header,
        "|---|---|---|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        variant = ", ".join(
            word
            for word, on in (
                ("causal", row.get("causal")),
                ("bidirectional", row.get("causal") is False),
                ("queries", row.get("queries")),
            )
            if on
        )
        lines.append(
            f"| {row['kernel']} | {row['D']} | {row['dtype']} | {row['C']} | {row['warps']} | {variant} | "
            f"{row.get('reg', '?')} | {row.get('stack', '?')} | {row.get('shared', 0)} + {row['dynamic_shared']} |"
        )
    lines += ["", shared_memory_verdict(rows, arch)]
    return "\n".join(lines) + "\n"


def readme_table(results: dict) -> str:
    """The README's block: per kernel and variant, bf16 registers per thread and spilled bytes by head dim."""
    rows = [row for row in results["rows"] if row["dtype"] == "bf16"]
    head_dims = sorted({row["D"] for row in rows})
    variants = list(dict.fromkeys((row["kernel"], row.get("causal"), row.get("queries", False)) for row in rows))
    lines = []
    for kernel, causal, queries in variants:
        label = {None: "", True: "causal", False: "bidirectional"}[causal] + (", queries (backward)" if queries else "")
        cells = []
        for head_dim in head_dims:
            row = next(
                r
                for r in rows
                if (r["kernel"], r.get("causal"), r.get("queries", False), r["D"])
                == (kernel, causal, queries, head_dim)
            )
            spilled = f", {row['stack']} B spilled" if row["stack"] else ""
            cells.append(f"{row['reg']}{spilled}")
        lines.append([f"`{kernel}`", label, *cells])
    header = ["kernel", "variant", *(f"registers, D={d}" for d in head_dims)]
    return common.table(header, lines, align="ll" + "r" * len(head_dims))


if __name__ == "__main__":
    raise SystemExit(main())
