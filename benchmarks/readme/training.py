"""README section "Performance", training at scale: "Throughput against length, memory per rank, scale on
paper" (throughput, ZeRO memory, the store under load, step overhead, checkpoint I/O, scale on paper).
"""

from __future__ import annotations

import statistics

from benchmarks import common
from benchmarks.readme.core import (
    Block,
    Figure,
    Results,
    both,
    first_record,
    signed_percent,
    summary_value,
    thousands,
    three_figures,
)

THROUGHPUT_ROWS = {
    ("single", "favor"): "one process, FAVOR+ M={}",
    ("single", "softmax"): "one process, softmax",
    ("deepspeed", "favor"): "2 DeepSpeed ranks (ZeRO-1), FAVOR+ M={}",
    ("deepspeed", "softmax"): "2 DeepSpeed ranks (ZeRO-1), softmax",
}


def _throughput_features(r: Results, name: str = "throughput") -> int:
    """The number of features the throughput run's FAVOR+ models had (tiny.yaml's default)."""
    return next(x["nb_features"] for x in r[name]["records"] if x["attention"] == "favor")


def throughput_table(r: Results) -> str:
    records = r["throughput"]["records"]
    lengths = sorted({x["length"] for x in records})
    rows = [
        [
            label,
            *(
                thousands(
                    next(
                        x["tokens_per_s"]
                        for x in records
                        if (x["mode"], x["attention"], x["length"]) == (mode, attention, n)
                    )
                )
                for n in lengths
            ),
        ]
        for (mode, attention), label in (
            (key, text.format(_throughput_features(r))) for key, text in THROUGHPUT_ROWS.items()
        )
    ]
    header = ["training tokens/s", *(f"L={n}" if i == 0 else str(n) for i, n in enumerate(lengths))]
    return common.table(header, rows, align="l" + "r" * len(lengths))


ZERO_LABELS = {
    "zero0": "0",
    "zero1": "1",
    "zero2": "2",
    "zero3": "3",
    "zero3-offload": "3 + CPU offload",
    "zero3-sized": "3, buckets sized to the model",
}


def zero_memory_table(r: Results) -> str:
    results = r["zero_memory"]
    parameters = results["counts"]["parameters"]
    rows = []
    for record in results["records"]:
        stage = record["stage"]
        worst = max(record["per_rank"], key=lambda rank: rank["total"] - rank["buffers"])
        held = worst["total"] - worst["buffers"]
        estimate = common.mebibytes(results["estimates"][stage]) + (" (GPU side)" if "offload" in stage else "")
        versus = f"{results['summary'][f'ratio_vs_zero0@{stage}']:.3f}"
        rows.append(
            [
                ZERO_LABELS[stage],
                estimate,
                common.mebibytes(held),
                f"{held / parameters:.2f}",
                f"**{versus}**" if stage == "zero3" else versus,
                common.mebibytes(worst["buffers"]),
                common.mebibytes(max(rank["peak_rss_bytes"] for rank in record["per_rank"])),
            ]
        )
    header = [
        "ZeRO",
        "DeepSpeed's estimate / rank",
        "held / rank",
        "bytes / parameter",
        "vs ZeRO-0",
        "staging buffers",
        "peak RSS / rank",
    ]
    return common.table(header, rows, align="lrrrrrr")


def store_load_table(r: Results) -> str:
    """Rank 0's store under N simulated ranks, the polling watchdog against the waiting one."""
    from benchmarks import store_load

    return store_load.table(r["store_load"])


def step_overhead_table(r: Results) -> str:
    """The small collectives of a step before and after the fold, and overlap_comm on and off."""
    from benchmarks import step_overhead

    results = r["step_overhead"]
    text = step_overhead.comparison_table(results, r["step_overhead-before"])
    overlap = step_overhead.overlap_table(results)
    heading = "Step time with DeepSpeed's overlap_comm (2 CPU ranks, tiny config at its then default of 111 features)"
    return f"{text}\n{heading}:\n\n{overlap}"


def checkpoint_io_table(r: Results) -> str:
    """Saves and resumes at 0.1-4 GB: DeepSpeed's write against the save before and now."""
    from benchmarks import checkpoint_io

    return checkpoint_io.table(r["checkpoint_io"])


def scale_control_table(r: Results) -> str:
    """The control plane's and the checkpoints' share of `large`'s step at 8-4,096 GPUs."""
    from benchmarks import scale_on_paper

    return scale_on_paper.control_table(r["scale_on_paper"])


# The throughput runs' two modes: one process, and DeepSpeed on 2 ranks.
MODES = ("single", "deepspeed")


def _throughput(r: Results, mode: str, attention: str, length: int) -> float:
    return first_record(r, "throughput", mode=mode, attention=attention, length=length)["tokens_per_s"]


def _throughput_favor(r: Results, name: str = "throughput") -> float:
    """The median FAVOR+ tokens/s over every length and mode of a throughput run."""
    return statistics.median(x["tokens_per_s"] for x in r[name]["records"] if x["attention"] == "favor")


def _softmax_fall(r: Results) -> str:
    """How many times softmax's tokens/s falls from 256 to 8192 tokens, mean of the two modes."""
    fall = statistics.mean(_throughput(r, m, "softmax", 256) / _throughput(r, m, "softmax", 8192) for m in MODES)
    return f"{fall:.0f}"


def _throughput_crossovers(r: Results, name: str = "throughput") -> tuple[str, str]:
    """Where FAVOR+ overtakes softmax, one process and 2 ranks, to the nearest 10 tokens."""
    return tuple(f"{round(r[name]['summary'][m]['interpolated_length'], -1):.0f}" for m in MODES)


def _throughput_feature_cost(r: Results) -> str:
    """FAVOR+ tokens/s of today's run over the M=111 run, median over modes and lengths."""
    ratios = [
        x["tokens_per_s"]
        / first_record(r, "throughput-m111", mode=x["mode"], attention="favor", length=x["length"])["tokens_per_s"]
        for x in r["throughput"]["records"]
        if x["attention"] == "favor"
    ]
    return f"{statistics.median(ratios):.2f}"


def _throughput_ratios(r: Results) -> tuple[str, ...]:
    summary = r["throughput"]["summary"]
    at_1024 = statistics.mean(summary[m]["ratios"]["1024"] for m in MODES)
    return (
        str(summary["single"]["favor_ahead_from"]),
        f"{at_1024:.1f}",
        *both(lambda m: summary[m]["ratios"]["8192"], MODES, 1),
    )


def _zero3_buffers(r: Results) -> tuple[int, int]:
    """ZeRO-3's staging buffers and model states on the rank holding most."""
    ranks = first_record(r, "zero_memory", stage="zero3")["per_rank"]
    return max(x["buffers"] for x in ranks), max(x["total"] - x["buffers"] for x in ranks)


def _scale_fit(r: Results, stage: str, checkpointing: bool, gpus: int) -> str:
    fit = next(
        x
        for x in r["scale_on_paper"]["fits"]
        if (x["stage"], x["checkpointing"], x["gpus"]) == (stage, checkpointing, gpus)
    )
    return three_figures(fit["largest"]["parameters"] / 1e9) + "B"


def _scale_fits(r: Results) -> tuple[str, ...]:
    settings = r["scale_on_paper"]["settings"]
    return (
        str(settings["micro_batch"]),
        str(settings["input_length"] + settings["target_length"]),
        _scale_fit(r, "zero0", False, 64),
        _scale_fit(r, "zero0", True, 64),
        _scale_fit(r, "zero1", False, 512),
        _scale_fit(r, "zero1", True, 512),
        _scale_fit(r, "zero3", False, 64),
        _scale_fit(r, "zero3", True, 64),
    )


def _scale_steps(r: Results) -> tuple[str, ...]:
    results = r["scale_on_paper"]
    # ZeRO 0-3 as the trainer runs them (zero3-sized steps as zero3; offload is quoted apart).
    projections = [x for x in results["projections"] if x["stage"] in ("zero0", "zero1", "zero2", "zero3")]
    assumed = [x["step_s_assumed"] * 1e3 for x in projections]
    measured = [x["step_s_measured"] for x in projections]
    return (
        f"{min(assumed):.0f}",
        f"{max(assumed):.0f}",
        f"{results['settings']['assumed_mfu'] * 100:.0f}",
        f"{results['large']['favor_seconds_per_step'] * 1e3:.0f}",
        f"{min(measured):.2f}",
        f"{max(measured):.2f}",
        f"{results['inputs']['mfu_used'] * 100:.1f}",
    )


def _checkpoint_largest(r: Results) -> tuple[str, ...]:
    """The save's cost over DeepSpeed's write at the largest size (ZeRO-2, ZeRO-3), now and before,
    the background commit's range and the largest checkpoint's verification."""
    from benchmarks.checkpoint_io import overhead

    records = [x for x in r["checkpoint_io"]["records"] if "error" not in x]
    largest = max(x["megabytes"] for x in records)
    top = {x["stage"]: x for x in records if x["megabytes"] == largest}
    commits = [x["commit_s"] for x in records]
    biggest = max(records, key=lambda x: x["checkpoint_bytes"])
    return (
        signed_percent(overhead(top[2], "background_commit"), 0),
        signed_percent(overhead(top[3], "background_commit"), 0),
        signed_percent(overhead(top[2], "read_back"), 0),
        signed_percent(overhead(top[3], "read_back"), 0),
        f"{min(commits):.2f}",
        f"{max(commits):.2f}",
        f"{biggest['resume_verify_s']:.2f}",
    )


BLOCKS: dict[str, Block] = {
    "throughput": Block(("throughput",), throughput_table),
    "zero_memory": Block(("zero_memory",), zero_memory_table),
    "store_load": Block(("store_load",), store_load_table),
    "step_overhead": Block(("step_overhead", "step_overhead-before"), step_overhead_table),
    "checkpoint_io": Block(("checkpoint_io",), checkpoint_io_table),
    "scale_control": Block(("scale_on_paper",), scale_control_table),
}


FIGURES: list[Figure] = [
    Figure("{} input tokens per step and process, fp32,", lambda r: f"{r['throughput']['settings']['tokens']:,}"),
    Figure(
        "(FAVOR++ at the trainer's default M = {}) holds ~{}k tokens/s",
        lambda r: (str(_throughput_features(r)), f"{_throughput_favor(r) / 1e3:.0f}"),
    ),
    Figure("at every length while softmax falls {}x", _softmax_fall),
    Figure("the crossover is at about {} tokens in one process and {} on 2 ranks", _throughput_crossovers),
    Figure("(FAVOR+ ahead from {} in one process, {}x at 1024, {}-{}x at 8192)", _throughput_ratios),
    Figure(
        "With M = {} (the default before, FAVOR+; `benchmarks/results/throughput-m111.md`) it held ~{}k",
        lambda r: (
            str(_throughput_features(r, "throughput-m111")),
            f"{_throughput_favor(r, 'throughput-m111') / 1e3:.0f}",
        ),
    ),
    Figure("and crossed at about {} / {} tokens", lambda r: _throughput_crossovers(r, "throughput-m111")),
    Figure("256 features give {}x the tokens/s of 111", _throughput_feature_cost),
    Figure(
        "(the `small` preset, {} parameters, bf16, 2 ranks",
        lambda r: f"{r['zero_memory']['counts']['parameters'] / 1e6:.2f}M",
    ),
    Figure(
        "ZeRO-3 holds {}x ZeRO-0's model states (target 0.55x)",
        lambda r: f"{summary_value(r, 'zero_memory', 'ratio_vs_zero0@zero3'):.3f}",
    ),
    Figure("is a {} MiB buffer that ZeRO-3 keeps for good", lambda r: f"{_zero3_buffers(r)[0] / 2**20:,.0f}"),
    Figure(
        "during each backward), {}x this model's states", lambda r: f"{_zero3_buffers(r)[0] / _zero3_buffers(r)[1]:.0f}"
    ),
    Figure(
        "micro batch {} x {} tokens: ZeRO-0 {} / {} without / with activation checkpointing, ZeRO-1/2 up to {} / {}, "
        "ZeRO-3 up to {} / {} at 64 GPUs)",
        _scale_fits,
    ),
    Figure(
        "step time at 8 / 64 / 512 / 4,096 GPUs ({}-{} ms at an assumed {}% dense MFU, of which {} ms are our float32 "
        "FAVOR+ ops; {}-{} s at the {}% MFU measured",
        _scale_steps,
    ),
    Figure(
        "At the largest size the save now costs the step loop {} / {} over DeepSpeed's own write (ZeRO-2 / "
        "ZeRO-3; it was {} / {}), within the 5% asked of it.",
        lambda r: _checkpoint_largest(r)[:4],
    ),
    Figure(
        "The commit behind the loop took {}-{} s; a resume's verification reads a 3.9 GB checkpoint in {} s.",
        lambda r: _checkpoint_largest(r)[4:],
    ),
]
