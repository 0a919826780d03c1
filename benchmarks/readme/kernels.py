"""README section "Performance", its kernels and steps: "Attention kernels", "Decoding and training
steps", "FAVOR+ on GPUs: Triton kernels" and "On one GPU".
"""

from __future__ import annotations

import re

from benchmarks import common
from benchmarks.readme.core import (
    Block,
    Figure,
    Results,
    both,
    duration,
    first_record,
    kilo,
    low_high,
    memory,
    percent,
    ratio,
    summary_value,
    thousands,
    three_figures,
)


def _attention_record(results: dict, implementation: str, length: int) -> dict | None:
    return next((x for x in results["records"] if x["impl"] == implementation and x["length"] == length), None)


def _baseline_estimate(results: dict, record: dict) -> tuple[float, int]:
    """Memory of a baseline configuration that was not run: the record's estimate, or the same rule
    attention.py applies now (the last measured length's memory, linear in length)."""
    if "estimated_memory_bytes" in record:
        return record["estimated_memory_bytes"], int(re.search(r"n=(\d+)", record["estimated_from"]).group(1))
    measured = [
        x
        for x in results["records"]
        if x["impl"] == record["impl"] and "memory_bytes" in x and x["length"] < record["length"]
    ]
    last = max(measured, key=lambda x: x["length"])
    return last["memory_bytes"] * record["length"] / last["length"], last["length"]


def _attention_cell(results: dict, implementation: str, length: int, with_memory: bool) -> str:
    record = _attention_record(results, implementation, length)
    if record is None:
        return ""
    if "median_s" in record:
        return duration(record["median_s"]) + (f", {memory(record['memory_bytes'])}" if with_memory else "")
    if implementation.startswith("performer-pytorch") and "skipped" in record:
        estimate, _ = _baseline_estimate(results, record)
        return f"not run (~{memory(estimate)}, estimated)"
    if "skipped" in record:
        return f"not run ({record['skipped'].replace('predicted ', 'predicted ~')})"
    return record.get("error", "")


def attention_table(r: Results) -> str:
    results = r["attention"]
    lengths = sorted({x["length"] for x in results["records"]})
    columns = [
        ("ours-causal", True),
        ("ours-bidirectional", True),
        ("performer-pytorch-causal", True),
        ("sdpa-causal", True),
        ("sdpa", False),
    ]
    rows = [[n, *(_attention_cell(results, impl, n, with_memory) for impl, with_memory in columns)] for n in lengths]
    text = common.table(
        ["n", "ours causal", "ours bidirectional", "performer-pytorch causal", "SDPA causal", "SDPA"],
        rows,
        align="rrrrrr",
    )
    notes = []
    for record in results["records"]:
        if record["impl"] == "performer-pytorch-causal" and "skipped" in record:
            estimate, base = _baseline_estimate(results, record)
            measured = _attention_record(results, record["impl"], base)
            half = _attention_record(results, record["impl"], base // 2)
            notes.append(
                f"performer-pytorch at {record['length']} is an estimate, not a measurement: it was not run "
                f"({record['skipped']}); ~{memory(estimate)} is its {memory(measured['memory_bytes'])} at {base} "
                f"scaled linearly in length (from {base // 2} to {base} its memory grew "
                f"{measured['memory_bytes'] / half['memory_bytes']:.1f}x)."
            )
    return text + ("\n" + "\n".join(notes) + "\n" if notes else "")


def decode_table(r: Results) -> str:
    records = r["decode"]["records"]
    positions = sorted({x["position"] for x in records})
    labels = {"ours": "ours", "performer-pytorch": "performer-pytorch 1.1"}
    rows = [
        [
            label,
            *(
                duration(next(x["per_token_s"] for x in records if (x["model"], x["position"]) == (model, p)))
                for p in positions
            ),
        ]
        for model, label in labels.items()
    ]
    return common.table(["per token", *(f"position {p}" for p in positions)], rows, align="l" + "r" * len(positions))


MODEL_STEP_FILES = ("model_step", "model_step-full-decoder")
MODEL_STEP_LABELS = {
    "ours": "ours (FAVOR+)",
    "ours-softmax": "the same model, softmax (SDPA)",
    "performer-pytorch": "performer-pytorch `PerformerEncDec`",
}


def model_step_table(r: Results) -> str:
    columns = []  # (file, length, header)
    for name in MODEL_STEP_FILES:
        results = r[name]
        fraction = results["settings"]["decoder_fraction"]
        for length in sorted({x["length"] for x in results["records"]}):
            columns.append((name, length, f"enc {length} + dec {max(1, int(length * fraction))}"))
    rows = []
    for model, label in MODEL_STEP_LABELS.items():
        cells, parameters = [], set()
        for name, length, _ in columns:
            record = next(x for x in r[name]["records"] if x["model"] == model and x["length"] == length)
            cells.append(thousands(record["tokens_per_s"]))
            parameters.add((record["parameters"], record["non_embedding_parameters"]))
        ((total, non_embedding),) = parameters
        rows.append([label, *cells, f"{total / 1e6:.1f}M ({non_embedding / 1e6:.1f}M)"])
    return common.table(
        ["tokens/s", *(header for _, _, header in columns), "parameters (without embeddings)"],
        rows,
        align="l" + "r" * (len(columns) + 1),
    )


def kernel_resources_table(r: Results) -> str:
    """Registers and spills of the Triton kernels compiled for sm_90."""
    from benchmarks import kernel_resources

    return kernel_resources.readme_table(r["kernel_resources"])


def fp16_features_table(r: Results) -> str:
    """What float16 and bfloat16 operands make of FAVOR+'s key features."""
    from benchmarks import fp16_features

    return fp16_features.table(r["fp16_features"])


def attention_gpu_table(r: Results) -> str:
    results = r["attention-gpu"]
    lengths = sorted({x["length"] for x in results["records"]})
    columns = ("ours-causal", "sdpa-causal", "ours-bidirectional", "sdpa")
    rows = [[n, *(_attention_cell(results, impl, n, with_memory=False) for impl in columns)] for n in lengths]
    return common.table(["n", "ours causal", "SDPA causal (flash)", "ours bidirectional", "SDPA"], rows, align="rrrrr")


def _mfu(r: Results, model: str, length: int) -> float:
    record = first_record(r, "model_step-gpu", model=model, length=length)
    return record["model_flops_per_step"] / record["median_s"] / r["model_step-gpu"]["gemm_flop_rate"]


def model_step_gpu_table(r: Results) -> str:
    results = r["model_step-gpu"]
    lengths = sorted({x["length"] for x in results["records"]})
    labels = {"ours": "ours (FAVOR+)", "ours-softmax": "the same model, softmax (SDPA)"}
    rows = []
    for model, label in labels.items():
        cells = []
        for n in lengths:
            record = next((x for x in results["records"] if x["model"] == model and x["length"] == n), {})
            if "tokens_per_s" not in record:  # not run, or failed: what the run says instead
                cells.append(record.get("error") or record.get("skipped") or "not run")
                continue
            cells.append(f"{thousands(record['tokens_per_s'])} ({percent(_mfu(r, model, n), 1)})")
        rows.append([label, *cells])
    fraction = results["settings"]["decoder_fraction"]
    header = [
        f"`{results['settings']['preset']}` step: tokens/s (MFU)",
        *(f"enc {n} + dec {int(n * fraction)}" for n in lengths),
    ]
    return common.table(header, rows, align="l" + "r" * len(lengths))


def _attention_gemm_share(r: Results) -> str:
    record = first_record(r, "attention", impl="ours-causal", length=16384)
    return percent(record["flop_rate"] / r["attention"]["gemm_flop_rate"])


def _attention_growth(r: Results) -> tuple[str, str]:
    summary = r["attention"]["summary"]
    growth = [v for k, v in summary.items() if k.startswith("memory_growth") and not k.endswith("16384")]
    return low_high(growth, 1)


def _chunk_ratios(r: Results) -> tuple[str, str]:
    """Time at chunk 32 and 128 over time at the default 64, every length."""
    others = [
        x for x in r["attention"]["records"] if x["impl"] in ("ours-causal@32", "ours-causal@128") and "median_s" in x
    ]
    ratios = [
        x["median_s"] / first_record(r, "attention", impl="ours-causal", length=x["length"])["median_s"] for x in others
    ]
    return low_high(ratios, 2)


def _gpu(r: Results, impl: str, length: int) -> dict:
    return first_record(r, "attention-gpu", impl=impl, length=length)


def _gpu_step(r: Results) -> tuple[str, ...]:
    def rate(model: str, n: int) -> str:
        return kilo(first_record(r, "model_step-gpu", model=model, length=n)["tokens_per_s"], 0)

    versus = [
        ratio(summary_value(r, "model_step-gpu", f"tokens_per_s_ratio_vs_ours-softmax@{n}")) for n in (4096, 16384)
    ]
    return rate("ours", 4096), rate("ours", 16384), *versus, rate("ours-softmax", 4096), rate("ours-softmax", 16384)


BLOCKS: dict[str, Block] = {
    "attention": Block(("attention",), attention_table),
    "decode": Block(("decode",), decode_table),
    "model_step": Block(MODEL_STEP_FILES, model_step_table),
    "kernel_resources": Block(("kernel_resources",), kernel_resources_table),
    "fp16_features": Block(("fp16_features",), fp16_features_table),
    "attention-gpu": Block(("attention-gpu",), attention_gpu_table),
    "model_step-gpu": Block(("model_step-gpu",), model_step_gpu_table),
}


FIGURES: list[Figure] = [
    # Attention kernels
    Figure(
        "(fp32, {} threads, B=1, H={}, D={}, M={}, forward + backward, median of {};",
        lambda r: tuple(
            str(r["attention"]["settings"][k]) for k in ("threads", "heads", "head_dim", "nb_features", "repeats")
        ),
    ),
    Figure(
        "the machine's GEMM rate in the same run: {} GFLOP/s)",
        lambda r: f"{r['attention']['gemm_flop_rate'] / 1e9:.0f}",
    ),
    Figure(
        "causal FAVOR+ at 16384 is **{}x** faster than performer-pytorch (target 40x) in **{}** of its memory",
        lambda r: (
            f"{summary_value(r, 'attention', 'speedup_vs_performer-pytorch-causal@16384'):.0f}",
            percent(summary_value(r, "attention", "memory_ratio_vs_performer-pytorch-causal@16384")),
        ),
    ),
    Figure(
        "**{}x** faster than SDPA causal (target 5x), at **{}** of the GEMM rate",
        lambda r: (f"{summary_value(r, 'attention', 'speedup_vs_sdpa-causal@16384'):.1f}", _attention_gemm_share(r)),
    ),
    Figure(
        "it beats SDPA causal **from {} on** ({}x; {}x at 1024), and {}x at 65536",
        lambda r: (
            str(summary_value(r, "attention", "causal_crossover_vs_sdpa")),
            ratio(summary_value(r, "attention", "speedup_vs_sdpa-causal@2048")),
            ratio(summary_value(r, "attention", "speedup_vs_sdpa-causal@1024")),
            f"{summary_value(r, 'attention', 'speedup_vs_sdpa-causal@65536'):.0f}",
        ),
    ),
    Figure(
        "its memory grows {}x from 8192 to 16384",
        lambda r: ratio(summary_value(r, "attention", "memory_growth_ours-causal@8192->16384")),
    ),
    Figure("and {}-{}x per doubling elsewhere", _attention_growth),
    Figure(
        "The fused op is {}x faster than the same algorithm through autograd (`ours-unfused-causal`) in {} of the "
        "memory",
        lambda r: (
            f"{summary_value(r, 'attention', 'speedup_vs_ours-unfused-causal@16384'):.1f}",
            percent(summary_value(r, "attention", "memory_ratio_vs_ours-unfused-causal@16384")),
        ),
    ),
    Figure("32 and 128 took {}-{}x its time", _chunk_ratios),
    # Decoding and training steps
    Figure(
        "Latency at 16384 over latency at 256: **{}**",
        lambda r: ratio(summary_value(r, "decode", "ours_latency_ratio@16384/256")),
    ),
    Figure(
        "at position 4096 ours is **{}x** faster per token",
        lambda r: three_figures(summary_value(r, "decode", "speedup_vs_performer-pytorch@4096")),
    ),
    Figure(
        "FAVOR+ gives **{}x** the softmax model's tokens/s (target 2x) but only **{}x** performer-pytorch's",
        lambda r: tuple(
            ratio(summary_value(r, "model_step", f"tokens_per_s_ratio_vs_{model}@4096"))
            for model in ("ours-softmax", "performer-pytorch")
        ),
    ),
    Figure(
        "3x; {}x with the decoder as long as the encoder",
        lambda r: ratio(summary_value(r, "model_step-full-decoder", "tokens_per_s_ratio_vs_performer-pytorch@2048")),
    ),
    Figure(
        "~1.1 s of our {} s step, while performer-pytorch's whole step takes {} s",
        lambda r: tuple(
            ratio(first_record(r, "model_step", model=m, length=4096)["median_s"])
            for m in ("ours", "performer-pytorch")
        ),
    ),
    Figure(
        "performer-pytorch's model is larger, {} parameters against our {},",
        lambda r: tuple(
            f"{first_record(r, 'model_step', model=m, length=4096)['parameters'] / 1e6:.1f}M"
            for m in ("performer-pytorch", "ours")
        ),
    ),
    Figure(
        "attention-only comparison ({}x at 16k)",
        lambda r: f"{summary_value(r, 'attention', 'speedup_vs_performer-pytorch-causal@16384'):.0f}",
    ),
    # On one GPU
    Figure("NVIDIA H200 (torch {};", lambda r: r["attention-gpu"]["machine"]["torch"].split("+")[0].rsplit(".", 1)[0]),
    Figure(
        "On the GPU our op only overtakes flash attention at 64k tokens ({}x causal, {}x bidirectional)",
        lambda r: (
            f"{_gpu(r, 'sdpa-causal', 65536)['median_s'] / _gpu(r, 'ours-causal', 65536)['median_s']:.1f}",
            f"{_gpu(r, 'sdpa', 65536)['median_s'] / _gpu(r, 'ours-bidirectional', 65536)['median_s']:.1f}",
        ),
    ),
    Figure(
        "the time is flat at {}-{} ms from 1k to 4k tokens",
        lambda r: both(lambda n: _gpu(r, "ours-causal", n)["median_s"] * 1e3, (1024, 4096), 0),
    ),
    Figure(
        "{} GFLOP in {} ms is {} TFLOP/s",
        lambda r: (
            f"{_gpu(r, 'ours-causal', 65536)['flops'] / 1e9:.0f}",
            f"{_gpu(r, 'ours-causal', 65536)['median_s'] * 1e3:.0f}",
            f"{_gpu(r, 'ours-causal', 65536)['flop_rate'] / 1e12:.1f}",
        ),
    ),
    Figure(
        "and 1% of its bf16 tensor-core rate ({} TFLOP/s measured in the same run)",
        lambda r: f"{r['attention-gpu']['gemm_flop_rate'] / 1e12:.0f}",
    ),
    Figure(
        "Its memory is {}x SDPA's ({} GiB at 64k:",
        lambda r: (
            f"{summary_value(r, 'attention-gpu', 'memory_ratio_vs_sdpa-causal@65536'):.0f}",
            f"{_gpu(r, 'ours-causal', 65536)['memory_bytes'] / 2**30:.1f}",
        ),
    ),
    Figure(
        "tokens) reaches {} tokens/s at L=4096 and {} at L=16384 with FAVOR+, {}x and {}x the softmax model's "
        "({}, {}):",
        _gpu_step,
    ),
    Figure(
        "MFU {}-{}% against {}-{}%.",
        lambda r: tuple(f"{_mfu(r, model, n) * 100:.0f}" for model in ("ours", "ours-softmax") for n in (4096, 16384)),
    ),
]
