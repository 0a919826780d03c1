"""The README's result tables and the figures its prose quotes, generated from benchmarks/results/*.json.

    python benchmarks/readme_tables.py            # rewrite README.md's generated blocks and quoted figures
    python benchmarks/readme_tables.py --check    # exit 1, with a diff, where README.md and the results disagree

Every result table of README.md sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->`
and is written here, from the JSON (never copied from a .md): the table, any note on what is an
estimate, and one line naming the results file(s), the commit and machine they come from and the
command that wrote them. Figures the README's prose quotes are listed in FIGURES: a phrase of the
README with `{}` where each figure stands, and how the figure follows from the results. A rewrite
puts the current figures in; a check fails when one differs, or when a phrase is no longer found
once in the README (then the prose changed: edit the phrase here with it).
tests/benchmarks/test_readme_results.py runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"


class Results:
    """The results files of one directory, read once each: ``results["attention"]`` is attention.json."""

    def __init__(self, directory: Path = RESULTS):
        self.directory = directory
        self._loaded: dict[str, dict] = {}

    def __getitem__(self, name: str) -> dict:
        if name not in self._loaded:
            self._loaded[name] = json.loads((self.directory / f"{name}.json").read_text())
        return self._loaded[name]


def _record(r: Results, name: str, **match) -> dict:
    """The first record of results file ``name`` whose fields equal ``match``."""
    return next(x for x in r[name]["records"] if all(x.get(k) == v for k, v in match.items()))


def _summary(r: Results, name: str, key: str) -> float:
    return r[name]["summary"][key]


def _mfu(r: Results, model: str, length: int) -> float:
    record = _record(r, "model_step-gpu", model=model, length=length)
    return record["model_flops_per_step"] / record["median_s"] / r["model_step-gpu"]["gemm_flop_rate"]


# ----------------------------------------------------------------------------- formats


def duration(value: float) -> str:
    """Three significant figures in seconds, whole milliseconds below 1 s, two figures below 10 ms."""
    if value >= 1:
        return f"{value:.{max(0, 2 - math.floor(math.log10(value)))}f} s"
    milliseconds = value * 1e3
    if milliseconds >= 10:
        return f"{milliseconds:.0f} ms"
    return f"{milliseconds:.{max(0, 1 - math.floor(math.log10(milliseconds)))}f} ms"


def memory(value: float) -> str:
    """MiB below 1 GiB, GiB to one decimal above."""
    return common.mebibytes(value) if value < 2**30 else f"{value / 2**30:.1f} GiB"


def thousands(value: float) -> str:
    return f"{value:,.0f}"


def kilo(value: float, decimals: int = 1) -> str:
    return f"{value / 1e3:.{decimals}f}k"


def percent(value: float, decimals: int = 0) -> str:
    return f"{value * 100:.{decimals}f}%"


def signed_percent(value: float, decimals: int = 1) -> str:
    return f"{value * 100:+.{decimals}f}%"


def ratio(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def three_figures(value: float) -> str:
    """1,730 / 70.3 / 7.26: three significant figures, thousands separated."""
    digits = math.floor(math.log10(abs(value)))
    rounded = round(value, 2 - digits)
    return f"{rounded:,.{max(0, 2 - digits)}f}"


def jump(value: float) -> str:
    """A loss jump in nats: two decimals, three below 0.05."""
    return f"{value:+.{2 if abs(value) >= 0.05 else 3}f}"


def spread(values: list[str], joiner: str = "-") -> str:
    """One figure where all agree, else "first-last" (``values`` formatted, lowest first)."""
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else f"{distinct[0]}{joiner}{distinct[-1]}"


# ----------------------------------------------------------------------------- provenance


def short(commit: str) -> str:
    return commit[:7]


def where(machine: dict) -> str:
    """The machine in words: "2-core x86_64 CPU, torch 2.13.0+cpu", "NVIDIA H200 (16-core x86_64 host), torch ..."."""
    cores = machine.get("cpu_count", machine.get("cpus"))
    cpu = machine.get("cpu_model") or machine.get("cpu")
    if "gpu" in machine:
        host = f"{cores}-core {cpu} host" if cpu else f"{cores}-core host"
        text = f"{machine['gpu']} ({host})"
    elif cores:
        text = f"{cores}-core {cpu} CPU" if cpu else f"{cores}-core CPU"
    else:
        return "machine not recorded"
    return f"{text}, torch {machine['torch']}" if "torch" in machine else text


def provenance(name: str, results: dict) -> str:
    """One results file's clause of a block's source line."""
    machine = results["machine"]
    if machine.get("commit"):
        tree = {True: "tree dirty", False: "tree clean"}.get(machine.get("dirty"), "tree state not recorded")
        commit = f"commit {short(machine['commit'])} ({tree})"
    else:
        commit = f"commit not recorded (results committed in {machine['committed_in']})"
    edited = machine.get("edited_by_hand")
    if edited:
        commit += (
            f", edited by hand in {edited['commit']} ({edited['summary']}; "
            f"{'figures edited' if edited['figures_edited'] else 'no figure edited'})"
        )
    text = f"`benchmarks/results/{name}.json`, {commit}, {where(machine)}: `{machine['command']}`"
    if machine.get("command_recorded") is False:
        text += " (command not recorded: read off the file's settings)"
    if machine.get("run_by"):
        text += f", run by `{machine['run_by']}`"
    if results.get("settings", {}).get("complete") is False:
        text += " (stopped before its last run: the table shows the runs it finished)"
    return text


def source_line(results: Results, names: tuple[str, ...]) -> str:
    return "From " + "; ".join(provenance(name, results[name]) for name in names) + "."


# ----------------------------------------------------------------------------- the tables


def main_job_table(r: Results) -> str:
    metrics = r["main_job"]["metrics"]
    rows = [
        [step, f"{loss:.2f}", f"{metrics['eval_loss'][step]:.2f}" if step in metrics["eval_loss"] else ""]
        for step, loss in metrics["train_loss"].items()
    ]
    return common.table(["step", "train loss", "eval loss"], rows, align="rrr")


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


def attention_gpu_table(r: Results) -> str:
    results = r["attention-gpu"]
    lengths = sorted({x["length"] for x in results["records"]})
    columns = ("ours-causal", "sdpa-causal", "ours-bidirectional", "sdpa")
    rows = [[n, *(_attention_cell(results, impl, n, with_memory=False) for impl in columns)] for n in lengths]
    return common.table(["n", "ours causal", "SDPA causal (flash)", "ours bidirectional", "SDPA"], rows, align="rrrrr")


def model_step_gpu_table(r: Results) -> str:
    results = r["model_step-gpu"]
    lengths = sorted({x["length"] for x in results["records"]})
    labels = {"ours": "ours (FAVOR+)", "ours-softmax": "the same model, softmax (SDPA)"}
    rows = []
    for model, label in labels.items():
        cells = []
        for n in lengths:
            record = _record(r, "model_step-gpu", model=model, length=n)
            cells.append(f"{thousands(record['tokens_per_s'])} ({percent(_mfu(r, model, n), 1)})")
        rows.append([label, *cells])
    fraction = results["settings"]["decoder_fraction"]
    header = [
        f"`{results['settings']['preset']}` step: tokens/s (MFU)",
        *(f"enc {n} + dec {int(n * fraction)}" for n in lengths),
    ]
    return common.table(header, rows, align="l" + "r" * len(lengths))


def _parity_loss(results: dict, kind: str, length: int, variant: str) -> float | None:
    return next(
        (
            x["final_heldout_loss"]
            for x in results["records"]
            if (x["kind"], x["length"], x["variant"]) == (kind, length, variant)
        ),
        None,
    )


def _parity_cell(results: dict, kind: str, length: int, variant: str) -> str:
    loss, softmax = _parity_loss(results, kind, length, variant), _parity_loss(results, kind, length, "softmax")
    return "" if loss is None else f"{loss:.3f} ({signed_percent(loss / softmax - 1)})"


def _features(settings: dict) -> int:
    """M: parity.json's settings give the default as text ("round(D ln D) = 111") or not at all."""
    value = settings.get("nb_features", 111)
    return value if isinstance(value, int) else int(str(value).rsplit("=", 1)[-1])


def parity_table(r: Results) -> str:
    default, more = r["parity"], r["parity-m256"]
    kinds = {"seq2seq": "seq2seq", "lm": "LM"}
    rows = []
    for length in sorted({x["length"] for x in default["records"]}):
        for kind, label in kinds.items():
            softmax = _parity_loss(default, kind, length, "softmax")
            rows.append(
                [
                    label,
                    length,
                    f"{softmax:.3f}",
                    _parity_cell(default, kind, length, "favor"),
                    _parity_cell(default, kind, length, "favor-redraw"),
                    _parity_cell(more, kind, length, "favor"),
                ]
            )
    header = [
        "model",
        "length",
        "softmax",
        f"FAVOR+ (M={_features(default['settings'])})",
        f"redrawn every {default['settings']['redraw_interval']}",
        f"FAVOR+ M={_features(more['settings'])}",
    ]
    return common.table(header, rows, align="lrrrrr")


# The CPU parity runs that chose the default M, each with the corpus it trained on: the seq2seq, the
# LM, the LM's M=111 run (beside the LM's first, without a softmax run of its own), the LM's seeds 1
# and 2 and its M=512 on seeds 0 and 1 all on the stdlib corpus as an earlier preparation tokenized
# it; the LM's M=512 on seed 2 and the seq2seq's seed 1 (softmax and M=256) on today's preparation
# (parity.py's pack read version-2 shards wrongly until 68cdf64, so the earlier packed file could
# not be rebuilt; parity.py records its corpus's fingerprint since). A FAVOR run is compared with
# softmax on its seed and corpus.
PARITY_CPU_CORPUS = {
    "parity-cpu-seq2seq": "earlier",
    "parity-cpu-lm": "earlier",
    "parity-cpu-lm-m111": "earlier",
    "parity-cpu-lm-seed1": "earlier",
    "parity-cpu-lm-seed2": "earlier",
    "parity-cpu-lm-m512-seed0": "earlier",
    "parity-cpu-lm-m512-seed1": "earlier",
    "parity-cpu-lm-softmax-seed2-today": "today",
    "parity-cpu-lm-m512-seed2": "today",
    "parity-cpu-seq2seq-softmax-seed1-today": "today",
    "parity-cpu-seq2seq-seed1-today": "today",
}
PARITY_CPU_FILES = tuple(PARITY_CPU_CORPUS)
# How the table marks a seed run on each corpus.
PARITY_CPU_CORPUS_MARK = {"earlier": "", "today": "\u2032"}


def _parity_cpu_records(r: Results) -> list[tuple[dict, dict, str]]:
    """(record, its file's settings, its corpus) of every CPU parity file."""
    return [
        (record, r[name]["settings"], corpus)
        for name, corpus in PARITY_CPU_CORPUS.items()
        for record in r[name]["records"]
    ]


def _parity_cpu_losses(r: Results, kind: str, variant: str, length: int = 1024) -> dict[tuple[str, int], float]:
    """Held-out loss by (corpus, seed) of one variant across the CPU parity files."""
    return {
        (corpus, record.get("seed", 0)): record["final_heldout_loss"]
        for record, _, corpus in _parity_cpu_records(r)
        if (record["kind"], record["length"], record["variant"]) == (kind, length, variant)
    }


def _parity_cpu_gaps(r: Results, kind: str, variant: str, length: int = 1024) -> dict[tuple[str, int], float]:
    """A variant's held-out loss over softmax's on the same seed and corpus, minus one, by (corpus, seed)."""
    losses, softmax = _parity_cpu_losses(r, kind, variant, length), _parity_cpu_losses(r, kind, "softmax", length)
    runs = sorted((run for run in losses if run in softmax), key=_parity_cpu_run_order)
    return {run: losses[run] / softmax[run] - 1 for run in runs}


def _parity_cpu_gap(r: Results, kind: str, variant: str, length: int = 1024) -> float:
    """The gap to softmax, the mean over the seeds run for both."""
    return statistics.mean(_parity_cpu_gaps(r, kind, variant, length).values())


def _parity_cpu_run_order(run: tuple[str, int]) -> tuple[int, int]:
    """Seeds in order, a seed's earlier corpus first."""
    corpus, seed = run
    return seed, list(PARITY_CPU_CORPUS_MARK).index(corpus)


def _parity_cpu_gap_spread(gaps: dict[tuple[str, int], float]) -> tuple[str, str, str]:
    """The gaps' mean, smallest and largest, as signed percentages."""
    return tuple(signed_percent(f(gaps.values())) for f in (statistics.mean, min, max))


def _parity_cpu_softmax_preparations(r: Results, seed: int = 2) -> tuple[str, str, str]:
    """The LM's softmax run on both preparations of the corpus: today's over the earlier's, minus
    one, then the two losses."""
    losses = _parity_cpu_losses(r, "lm", "softmax")
    earlier, today = losses[("earlier", seed)], losses[("today", seed)]
    return percent(today / earlier - 1, 1), f"{earlier:.3f}", f"{today:.3f}"


def parity_cpu_table(r: Results) -> str:
    """Per model kind and variant: held-out loss on each seed and the gap to softmax (mean, range)."""

    def features(record: dict, settings: dict) -> int:
        return int(record["variant"].partition("@")[2] or _features(settings))

    labels = {"seq2seq": "seq2seq", "lm": "LM"}
    names = {"softmax": "softmax", "favor": "FAVOR+", "favor++": "FAVOR++"}
    configurations = {}  # (kind, length, variant) -> its first record and settings, in file order
    for record, settings, _ in _parity_cpu_records(r):
        configurations.setdefault((record["kind"], record["length"], record["variant"]), (record, settings))
    ordered = sorted(
        configurations.values(),
        key=lambda pair: (pair[0]["kind"] != "seq2seq", pair[0]["variant"] != "softmax", features(*pair)),
    )
    rows = []
    for record, settings in ordered:
        kind, length, variant = record["kind"], record["length"], record["variant"]
        base = variant.partition("@")[0]
        losses = _parity_cpu_losses(r, kind, variant, length)
        runs = sorted(losses, key=_parity_cpu_run_order)
        gaps = _parity_cpu_gaps(r, kind, variant, length)
        if base == "softmax":
            gap = ""
        else:
            mean, low, high = _parity_cpu_gap_spread(gaps)
            gap = mean if len(gaps) == 1 else f"{mean} ({low} to {high})"
        rows.append(
            [
                labels[kind],
                length,
                names[base] + ("" if base == "softmax" else f" M={features(record, settings)}"),
                ", ".join(f"{seed}{PARITY_CPU_CORPUS_MARK[corpus]}" for corpus, seed in runs),
                " / ".join(f"{losses[run]:.3f}" for run in runs),
                gap,
            ]
        )
    header = ["model", "length", "attention", "seeds", "held-out loss", "vs softmax (mean of seeds, range)"]
    return common.table(header, rows, align="lrlrrr")


# The README's rows: a label and the variants it shows, one list per setting, one entry per draw.
REDRAW_ROWS = [
    ("softmax", [["softmax"]]),
    ("fixed FAVOR+", [["fixed", "fixed#1", "fixed#2"]]),
    ("**fixed FAVOR++** (the default)", [["fixed@++", "fixed@++#1", "fixed@++#2"]]),
    ("swap every 200 (the old default)", [["swap:200", "swap:200#1"]]),
    ("swap every 50 / 10 / 1", [["swap:50"], ["swap:10"], ["swap:1"]]),
    ("rolling (one of 4 blocks every 50)", [["rolling:200"]]),
    ("smooth over 200 / over 50", [["smooth:200"], ["smooth:50", "smooth:50#1"]]),
    ("grow (10, 20, 40, ... 200)", [["grow:10-200"]]),
    ("fixed, M=256", [["fixed@256"]]),
]


def _one_or_each(values: list[str]) -> str:
    """Empty for none, one figure where the settings agree, else each: "+0.29 / +0.10 / +0.08"."""
    return "" if not values else values[0] if len(set(values)) == 1 else " / ".join(values)


def redraw_table(r: Results) -> str:
    summary = {x["variant"]: x for x in r["redraw"]["summary"]}
    rows = []
    for label, settings in REDRAW_ROWS:
        draws = [[summary[variant] for variant in setting] for setting in settings]
        joiner = " / " if len(settings) == 1 else ", "
        held = " / ".join(joiner.join(f"{x['heldout_loss']:.3f}" for x in setting) for setting in draws)
        gaps = [statistics.mean(x["vs_softmax"] for x in setting) for setting in draws]
        versus = "" if label == "softmax" else " / ".join(signed_percent(gap) for gap in gaps)
        jumps = [
            spread(sorted((jump(x["max_paired_jump"]) for x in s), key=float), " to ")
            for s in draws
            if s[0]["max_paired_jump"] is not None
        ]
        recoveries = [
            spread([f"{v:.0f}" for v in sorted(x["median_recovery_steps"] for x in s)])
            for s in draws
            if s[0]["median_recovery_steps"] is not None
        ]
        cells = [held, versus, _one_or_each(jumps), _one_or_each(recoveries)]
        if label.startswith("**"):
            cells = [f"**{cell}**" if cell else "" for cell in cells]
        rows.append([label, *cells])
    header = [
        "variant",
        f"held-out ({max(len(s) for _, ss in REDRAW_ROWS for s in ss)} draws)",
        "vs softmax (mean of draws)",
        "jump per redraw (max)",
        "recovery (steps, median)",
    ]
    return common.table(header, rows, align="lrrrr")


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


def data_stream_table(r: Results) -> str:
    """Stream throughput by workers; with the layout of the shards when both layouts were measured."""
    results = r["data_stream"]
    layouts = [("packed (v2)", x) for x in results["stream"]] + [
        ("v1 (member per document)", x) for x in results.get("stream_v1", [])
    ]
    layouts.sort(key=lambda item: (item[1]["workers"], not item[0].startswith("packed")))
    header = ["workers", "raw tokens/s", "input tokens/s", "batches/s", "startup (s)"]
    rows = [
        [
            x["workers"],
            f"{x['raw_tokens_per_s'] / 1e6:.2f} M",
            f"{x['input_tokens_per_s'] / 1e6:.2f} M",
            x["batches_per_s"],
            x["startup_seconds"],
        ]
        for _, x in layouts
    ]
    if "stream_v1" not in results:
        return common.table(header, rows, align="rrrrr")
    return common.table(["shards", *header], [[name, *row] for (name, _), row in zip(layouts, rows)], align="lrrrrr")


def data_prepare_table(r: Results) -> str:
    """Prepare's pass (the tokenizer given) by corpus layout and workers, and the replaced prepare's."""
    results = r["data_prepare"]
    names = {"zst": "`.jsonl.zst`", "parquet": "Parquet"}
    rows = [
        [
            names[x["layout"]],
            x["workers"],
            f"{x['seconds']:.0f} s",
            f"{x['text_mb_per_s']:.1f}",
            f"{x['text_mb_per_s_per_process']:.1f}",
            f"{x['tar_over_token_bytes']:.3f}x",
        ]
        for x in results["runs"]
    ]
    old = results.get("old_prepare")
    if old is not None:
        rows.append(
            [
                "JSON lines: the replaced prepare's shard passes",
                "1 + pool",
                f"{old['shards_seconds']:.0f} s",
                f"{old['shards_text_mb_per_s']:.1f}",
                "",
                "",
            ]
        )
    corpus = results["corpus"]
    head = (
        f"{corpus['text_bytes'] / 1e9:.2f} GB of text, {corpus['documents']:,} documents in {corpus['files']} files, "
        f"vocab {results['settings']['vocab']}, the tokenizer given (ours trained in "
        f"{results['tokenizer_seconds']:.0f} s from a seeded sample"
        + (f"; the replaced prepare's full-pass tokenizer took {old['tokenizer_seconds']:.0f} s" if old else "")
        + "):\n\n"
    )
    header = ["corpus", "workers", "time", "text MB/s", "MB/s per process", "tar bytes / token bytes"]
    return head + common.table(header, rows, align="lrrrrr")


def data_plan_table(r: Results) -> str:
    """Planning at 1e6-1e9 documents, new / old planner; then the start-up verification per rank."""
    from benchmarks import data_plan

    results = r["data_plan"]
    settings = results["settings"]
    head = (
        f"Synthetic split indexes of {settings['documents_per_shard']:,} documents per shard (no tars), one rank of "
        f"{settings['world_size']}, batch {settings['batch_size']} rows of {settings['raw_length']} tokens, "
        f"interleave_shards {settings['interleave_shards']}; each cell is ours / the replaced planner's "
        f"(a {settings['old_shuffle_buffer']}-document shuffle buffer), the old one's larger sizes estimated:\n\n"
    )
    text = head + data_plan.comparison_table(results)
    if results.get("verification"):
        text += "\n\n" + data_plan.verification_table(results)
    return text


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


def tokenizer_parity_table(r: Results) -> str:
    """The export's fast tokenizer against SentencePiece, scores unrounded and rounded."""
    from benchmarks import tokenizer_parity

    return tokenizer_parity.table(r["tokenizer_parity"])


def kernel_resources_table(r: Results) -> str:
    """Registers and spills of the Triton kernels compiled for sm_90."""
    from benchmarks import kernel_resources

    return kernel_resources.readme_table(r["kernel_resources"])


@dataclass(frozen=True)
class Block:
    sources: tuple[str, ...]
    render: Callable[[Results], str]


BLOCKS = {
    "main_job": Block(("main_job",), main_job_table),
    "attention": Block(("attention",), attention_table),
    "decode": Block(("decode",), decode_table),
    "model_step": Block(MODEL_STEP_FILES, model_step_table),
    "attention-gpu": Block(("attention-gpu",), attention_gpu_table),
    "model_step-gpu": Block(("model_step-gpu",), model_step_gpu_table),
    "parity": Block(("parity", "parity-m256"), parity_table),
    "parity-cpu": Block(PARITY_CPU_FILES, parity_cpu_table),
    "redraw": Block(("redraw",), redraw_table),
    "throughput": Block(("throughput",), throughput_table),
    "zero_memory": Block(("zero_memory",), zero_memory_table),
    "data_stream": Block(("data_stream",), data_stream_table),
    "data_prepare": Block(("data_prepare",), data_prepare_table),
    "data_plan": Block(("data_plan",), data_plan_table),
    "store_load": Block(("store_load",), store_load_table),
    "tokenizer_parity": Block(("tokenizer_parity",), tokenizer_parity_table),
    "step_overhead": Block(("step_overhead", "step_overhead-before"), step_overhead_table),
    "checkpoint_io": Block(("checkpoint_io",), checkpoint_io_table),
    "scale_control": Block(("scale_on_paper",), scale_control_table),
    "kernel_resources": Block(("kernel_resources",), kernel_resources_table),
}


def render_block(name: str, results: Results) -> str:
    block = BLOCKS[name]
    return f"{block.render(results).rstrip()}\n\n{source_line(results, block.sources)}\n"


# ----------------------------------------------------------------------------- figures in the prose


@dataclass(frozen=True)
class Figure:
    """A phrase of the README with ``{}`` for each figure, and the figures as the results give them."""

    phrase: str
    values: Callable[[Results], str | tuple[str, ...]]

    def pattern(self) -> re.Pattern:
        """The phrase as a regular expression: its spaces match any whitespace (the README wraps lines),
        each ``{}`` one figure (no whitespace in it)."""
        literal = [re.sub(r"(\\ |\s)+", r"\\s+", re.escape(part)) for part in self.phrase.split("{}")]
        return re.compile(r"(\S+)".join(literal))

    def expected(self, results: Results) -> tuple[str, ...]:
        values = self.values(results)
        return (values,) if isinstance(values, str) else tuple(values)


def _both(function: Callable[[str], float], keys: tuple[str, ...], digits: int) -> tuple[str, str]:
    """The lowest and the highest of ``function`` over ``keys``, to ``digits`` decimals."""
    values = [function(key) for key in keys]
    return f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"


def _main_job_parameters(r: Results) -> int:
    return sum(group["parameters"] for group in r["main_job"]["metrics"]["parameter_groups"].values())


def _main_job(r: Results) -> tuple[str, ...]:
    run, metrics = r["main_job"]["run"], r["main_job"]["metrics"]
    rows = run["train"]["micro_batch_size"] * run["train"]["grad_accum"] * 2  # the README's 2 ranks
    return (
        str(run["zero"]["stage"]),
        str(run["train"]["max_steps"]),
        str(rows),
        f"{metrics['tokens'] / 1e6:.1f}M",
        f"{metrics['training_seconds']:.0f}",
    )


def _attention_gemm_share(r: Results) -> str:
    record = _record(r, "attention", impl="ours-causal", length=16384)
    return percent(record["flop_rate"] / r["attention"]["gemm_flop_rate"])


def _attention_growth(r: Results) -> tuple[str, str]:
    summary = r["attention"]["summary"]
    growth = [v for k, v in summary.items() if k.startswith("memory_growth") and not k.endswith("16384")]
    return f"{min(growth):.1f}", f"{max(growth):.1f}"


def _chunk_ratios(r: Results) -> tuple[str, str]:
    """Time at chunk 32 and 128 over time at the default 64, every length."""
    others = [
        x for x in r["attention"]["records"] if x["impl"] in ("ours-causal@32", "ours-causal@128") and "median_s" in x
    ]
    ratios = [
        x["median_s"] / _record(r, "attention", impl="ours-causal", length=x["length"])["median_s"] for x in others
    ]
    return f"{min(ratios):.2f}", f"{max(ratios):.2f}"


def _gpu(r: Results, impl: str, length: int) -> dict:
    return _record(r, "attention-gpu", impl=impl, length=length)


def _gpu_step(r: Results) -> tuple[str, ...]:
    def rate(model: str, n: int) -> str:
        return kilo(_record(r, "model_step-gpu", model=model, length=n)["tokens_per_s"], 0)

    versus = [ratio(_summary(r, "model_step-gpu", f"tokens_per_s_ratio_vs_ours-softmax@{n}")) for n in (4096, 16384)]
    return rate("ours", 4096), rate("ours", 16384), *versus, rate("ours-softmax", 4096), rate("ours-softmax", 16384)


def _parity_tokens(r: Results) -> tuple[str, ...]:
    settings = r["parity"]["settings"]
    tokens = settings["steps_at_1024"] * settings["tokens_per_step"]
    passes = tokens / r["data_stream"]["shards"]["tokens"]  # the stdlib corpus's train tokens
    return (
        str(settings["steps_at_1024"]),
        kilo(settings["tokens_per_step"], 0),
        f"{tokens / 1e6:.1f}M",
        f"{passes:.1f}",
        str(_record(r, "parity", length=4096)["steps"]),
    )


def _parity_gap(r: Results, kind: str, variant: str = "favor", length: int = 1024, name: str = "parity") -> float:
    return _summary(r, name, f"{kind}@{length} {variant} vs softmax")


def _parity_cpu_cost(r: Results, kind: str) -> float:
    """Seconds of the M=256 run over the M=111 run of the 8-step timing run (parity-cpu-cost)."""
    seconds = {x["variant"]: x["seconds"] for x in r["parity-cpu-cost"]["records"] if x["kind"] == kind}
    return seconds["favor++@256"] / seconds["favor++"]


def _redraw(r: Results, variant: str) -> dict:
    return next(x for x in r["redraw"]["summary"] if x["variant"] == variant)


def _draws(r: Results, variant: str) -> list[dict]:
    """A variant's draws: "fixed" gives fixed, fixed#1, fixed#2."""
    return [x for x in r["redraw"]["summary"] if x["variant"].split("#")[0] == variant]


def _mean_loss(r: Results, variant: str) -> float:
    return statistics.mean(x["heldout_loss"] for x in _draws(r, variant))


# The schemes that redraw 2-11 times; swapping every 10 steps or every step is quoted on its own (+0.10).
REDRAW_SCHEMES = ("swap:200", "swap:50", "rolling:200", "smooth:200", "smooth:50", "grow:10-200")


def _swap_200(r: Results) -> tuple[str, ...]:
    draws = _draws(r, "swap:200")
    recoveries = [f"{v:.0f}" for v in sorted(x["median_recovery_steps"] for x in draws)]
    return *_both(lambda x: x["max_paired_jump"], draws, 1), spread(recoveries)


def _throughput(r: Results, mode: str, attention: str, length: int) -> float:
    return _record(r, "throughput", mode=mode, attention=attention, length=length)["tokens_per_s"]


def _throughput_favor(r: Results, name: str = "throughput") -> float:
    """The median FAVOR+ tokens/s over every length and mode of a throughput run."""
    return statistics.median(x["tokens_per_s"] for x in r[name]["records"] if x["attention"] == "favor")


def _throughput_summary(r: Results) -> tuple[str, str]:
    fall = statistics.mean(_throughput(r, m, "softmax", 256) / _throughput(r, m, "softmax", 8192) for m in MODES)
    return f"{_throughput_favor(r) / 1e3:.0f}", f"{fall:.0f}"


def _throughput_crossovers(r: Results, name: str = "throughput") -> tuple[str, str]:
    """Where FAVOR+ overtakes softmax, one process and 2 ranks, to the nearest 10 tokens."""
    return tuple(f"{round(r[name]['summary'][m]['interpolated_length'], -1):.0f}" for m in MODES)


def _throughput_feature_cost(r: Results) -> str:
    """FAVOR+ tokens/s of today's run over the M=111 run, median over modes and lengths."""
    ratios = [
        x["tokens_per_s"]
        / _record(r, "throughput-m111", mode=x["mode"], attention="favor", length=x["length"])["tokens_per_s"]
        for x in r["throughput"]["records"]
        if x["attention"] == "favor"
    ]
    return f"{statistics.median(ratios):.2f}"


MODES = ("single", "deepspeed")


def _throughput_ratios(r: Results) -> tuple[str, ...]:
    summary = r["throughput"]["summary"]
    at_1024 = statistics.mean(summary[m]["ratios"]["1024"] for m in MODES)
    return (
        str(summary["single"]["favor_ahead_from"]),
        f"{at_1024:.1f}",
        *_both(lambda m: summary[m]["ratios"]["8192"], MODES, 1),
    )


def _zero3_buffers(r: Results) -> tuple[int, int]:
    """ZeRO-3's staging buffers and model states on the rank holding most."""
    ranks = _record(r, "zero_memory", stage="zero3")["per_rank"]
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


def _data_stream(r: Results) -> tuple[str, str, str]:
    model, stream = r["data_stream"]["tiny_model"], r["data_stream"]["stream"]
    faster = round(stream[0]["raw_tokens_per_s"] / model["raw_tokens_per_s"], -1)
    return f"{model['seconds_per_step']:.1f}", f"{model['raw_tokens_per_s'] / 1e3:.0f}", f"{faster:.0f}"


def _shard_bytes(r: Results) -> tuple[str, ...]:
    results = r["data_stream"]
    stdlib, web = results["shards"], results["web_like"]["shards"]
    return (
        f"{stdlib['bytes_per_token']:.3f}",
        f"{web['bytes_per_token']:.3f}",
        f"{round(web['tokens_per_document'], -2):.0f}",
        f"{max(stdlib['tar_over_token_bytes'], web['tar_over_token_bytes']):.3f}",
        f"{results['shards_v1']['bytes_per_token']:.3f}",
        f"{results['web_like']['shards_v1']['bytes_per_token']:.3f}",
    )


def _web_like_stream(r: Results) -> tuple[str, ...]:
    runs = {x["layout"]: x for x in r["data_stream"]["web_like"]["stream"]}
    packed, v1 = runs["packed"], runs["v1"]
    return (
        f"{packed['raw_tokens_per_s'] / 1e6:.2f}",
        f"{v1['raw_tokens_per_s'] / 1e6:.2f}",
        f"{packed['startup_seconds']:.3f}",
        f"{v1['startup_seconds']:.3f}",
    )


def _plan_largest(r: Results) -> dict:
    return max(r["data_plan"]["sizes"], key=lambda entry: entry["size"])


def _plan_summary(r: Results) -> dict:
    """The new planner's figures at the largest size measured."""
    return _plan_largest(r)["summary"]["new"]


FIGURES: list[Figure] = [
    # Results: the main job
    Figure("`configs/tiny.yaml`, {} parameters", lambda r: f"{_main_job_parameters(r) / 1e6:.2f}M"),
    Figure("ZeRO-{}, {} steps of {} rows, {} tokens, {} s of training", _main_job),
    Figure("trained at commit {})", lambda r: r["main_job"]["trained_at_commit"]),
    Figure("Throughput: {} tokens/s over both ranks", lambda r: kilo(r["main_job"]["metrics"]["tokens_per_s_median"])),
    Figure("data wait {} of step time", lambda r: percent(r["main_job"]["metrics"]["data_wait_fraction_median"], 1)),
    Figure(
        "held-out loss of {} on {} held-out batches of {} rows",
        lambda r: (
            f"{r['main_job']['export']['heldout_loss']:.3f}",
            str(r["main_job"]["export"]["heldout_batches"]),
            str(r["main_job"]["export"]["rows_per_batch"]),
        ),
    ),
    Figure("(commit {}, same seed and data", lambda r: r["main_job-before"]["trained_at_commit"]),
    Figure(
        "(eval losses {} / {} / {} at steps 200 / 400 / 600;",
        lambda r: tuple(f"{r['main_job-before']['metrics']['eval_loss'][s]:.2f}" for s in ("200", "400", "600")),
    ),
    Figure(
        "the export {} held-out, against {} with the draw its last 200 steps trained with",
        lambda r: (
            f"{r['main_job-before']['export']['heldout_loss']:.3f}",
            f"{r['main_job-before']['export']['heldout_loss_by_draw']['400']:.3f}",
        ),
    ),
    Figure(
        "train loss {} at step 10, then {})",
        lambda r: tuple(
            f"{r[name]['metrics']['train_loss']['10']:.2f}" for name in ("main_job-before", "main_job-buffer-order")
        ),
    ),
    Figure(
        "exports its trained draw, {}, the best of the three it drew; fixed FAVOR++ features gave {} on the same "
        "held-out batches (`main_job-buffer-order.md`: the job at commit {}, before",
        lambda r: (
            *(f"{r[name]['export']['heldout_loss']:.3f}" for name in ("main_job-swap200", "main_job-buffer-order")),
            r["main_job-buffer-order"]["trained_at_commit"][:7],
        ),
    ),
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
            f"{_summary(r, 'attention', 'speedup_vs_performer-pytorch-causal@16384'):.0f}",
            percent(_summary(r, "attention", "memory_ratio_vs_performer-pytorch-causal@16384")),
        ),
    ),
    Figure(
        "**{}x** faster than SDPA causal (target 5x), at **{}** of the GEMM rate",
        lambda r: (f"{_summary(r, 'attention', 'speedup_vs_sdpa-causal@16384'):.1f}", _attention_gemm_share(r)),
    ),
    Figure(
        "it beats SDPA causal **from {} on** ({}x; {}x at 1024), and {}x at 65536",
        lambda r: (
            str(_summary(r, "attention", "causal_crossover_vs_sdpa")),
            ratio(_summary(r, "attention", "speedup_vs_sdpa-causal@2048")),
            ratio(_summary(r, "attention", "speedup_vs_sdpa-causal@1024")),
            f"{_summary(r, 'attention', 'speedup_vs_sdpa-causal@65536'):.0f}",
        ),
    ),
    Figure(
        "its memory grows {}x from 8192 to 16384",
        lambda r: ratio(_summary(r, "attention", "memory_growth_ours-causal@8192->16384")),
    ),
    Figure("and {}-{}x per doubling elsewhere", _attention_growth),
    Figure(
        "The fused op is {}x faster than the same algorithm through autograd (`ours-unfused-causal`) in {} of the "
        "memory",
        lambda r: (
            f"{_summary(r, 'attention', 'speedup_vs_ours-unfused-causal@16384'):.1f}",
            percent(_summary(r, "attention", "memory_ratio_vs_ours-unfused-causal@16384")),
        ),
    ),
    Figure("32 and 128 took {}-{}x its time", _chunk_ratios),
    # Decoding and training steps
    Figure(
        "Latency at 16384 over latency at 256: **{}**",
        lambda r: ratio(_summary(r, "decode", "ours_latency_ratio@16384/256")),
    ),
    Figure(
        "at position 4096 ours is **{}x** faster per token",
        lambda r: three_figures(_summary(r, "decode", "speedup_vs_performer-pytorch@4096")),
    ),
    Figure(
        "FAVOR+ gives **{}x** the softmax model's tokens/s (target 2x) but only **{}x** performer-pytorch's",
        lambda r: tuple(
            ratio(_summary(r, "model_step", f"tokens_per_s_ratio_vs_{model}@4096"))
            for model in ("ours-softmax", "performer-pytorch")
        ),
    ),
    Figure(
        "3x; {}x with the decoder as long as the encoder",
        lambda r: ratio(_summary(r, "model_step-full-decoder", "tokens_per_s_ratio_vs_performer-pytorch@2048")),
    ),
    Figure(
        "~1.1 s of our {} s step, while performer-pytorch's whole step takes {} s",
        lambda r: tuple(
            ratio(_record(r, "model_step", model=m, length=4096)["median_s"]) for m in ("ours", "performer-pytorch")
        ),
    ),
    Figure(
        "performer-pytorch's model is larger, {} parameters against our {},",
        lambda r: tuple(
            f"{_record(r, 'model_step', model=m, length=4096)['parameters'] / 1e6:.1f}M"
            for m in ("performer-pytorch", "ours")
        ),
    ),
    Figure(
        "attention-only comparison ({}x at 16k)",
        lambda r: f"{_summary(r, 'attention', 'speedup_vs_performer-pytorch-causal@16384'):.0f}",
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
        lambda r: _both(lambda n: _gpu(r, "ours-causal", n)["median_s"] * 1e3, (1024, 4096), 0),
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
            f"{_summary(r, 'attention-gpu', 'memory_ratio_vs_sdpa-causal@65536'):.0f}",
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
    # Learning parity
    Figure(
        "{} steps of {} tokens at length 1024 ({} tokens, ~{} passes over the stdlib corpus), {} steps of the same "
        "tokens",
        _parity_tokens,
    ),
    Figure("Held-out loss on {} fixed held-out batches:", lambda r: str(r["parity"]["settings"]["heldout_batches"])),
    Figure(
        "FAVOR+ ends {} (seq2seq) and {} (LM) above softmax at 1024 tokens",
        lambda r: tuple(percent(_parity_gap(r, kind), 1) for kind in ("seq2seq", "lm")),
    ),
    Figure(
        "(M=256: {} and {},",
        lambda r: tuple(signed_percent(_parity_gap(r, kind, name="parity-m256")) for kind in ("seq2seq", "lm")),
    ),
    Figure(
        "Redrawing costs {}-{} points at this training length",
        lambda r: _both(
            lambda kind: 100 * (_parity_gap(r, kind, "favor-redraw") - _parity_gap(r, kind)), ("seq2seq", "lm"), 1
        ),
    ),
    Figure(
        "the gap is {} (seq2seq) and {} (LM).",
        lambda r: tuple(percent(_parity_gap(r, kind, length=4096), 1) for kind in ("seq2seq", "lm")),
    ),
    # How many features
    Figure(
        "With M = 256 the encoder-decoder lands at {} (mean of 2 seeds: {} and {}) and the LM at {} (mean of 3 seeds)",
        lambda r: (
            signed_percent(_parity_cpu_gap(r, "seq2seq", "favor++@256")),
            *(signed_percent(gap) for gap in _parity_cpu_gaps(r, "seq2seq", "favor++@256").values()),
            signed_percent(_parity_cpu_gap(r, "lm", "favor++@256")),
        ),
    ),
    Figure(
        "meets the target on the mean of 3 seeds, {} ({} to {})",
        lambda r: _parity_cpu_gap_spread(_parity_cpu_gaps(r, "lm", "favor++@512")),
    ),
    Figure(
        "two preparations' softmax runs end {} apart ({} and {})",
        _parity_cpu_softmax_preparations,
    ),
    Figure(
        "with round(D ln D) = 111 the LM ends {} above softmax",
        lambda r: percent(_parity_cpu_gap(r, "lm", "favor++"), 1),
    ),
    Figure(
        "a training step of the `tiny` LM takes {}x as long with 256 features as with 111, the encoder-decoder's {}x",
        lambda r: tuple(f"{_parity_cpu_cost(r, kind):.2f}" for kind in ("lm", "seq2seq")),
    ),
    # Redraws
    Figure(
        "`python benchmarks/redraw.py --data runs/data` (CPU, 2 cores, ~{} min)",  # the variants' training alone
        lambda r: f"{math.ceil(sum(x['seconds'] for x in r['redraw']['summary']) / 300) * 5}",
    ),
    Figure(
        "(a fixed-feature model evaluated with a new draw loses {}-{} nats)",
        lambda r: _both(lambda x: x["heldout_new_draw"] - x["heldout_loss"], _draws(r, "fixed"), 1),
    ),
    Figure("Swapping every 200 steps costs +{}-{} nats and {} steps each time", _swap_200),
    Figure("still costs +{} per block", lambda r: f"{_redraw(r, 'rolling:200')['max_paired_jump']:.1f}"),
    Figure("but pay in the end (+{} held-out at every step)", lambda r: f"{_redraw(r, 'swap:1')['vs_fixed']:.2f}"),
    Figure(
        "gives a jump of {} at most",
        lambda r: jump(max(x["max_paired_jump"] for x in r["redraw"]["summary"] if x["variant"].startswith("smooth"))),
    ),
    Figure(
        "any redrawing costs {}-{} held-out nats against fixed features",
        lambda r: _both(lambda v: _mean_loss(r, v) - _mean_loss(r, "fixed"), REDRAW_SCHEMES, 2),
    ),
    Figure(
        "(mean of fixed FAVOR+ {}; swap every 200 {}; smooth over 50 {})",
        lambda r: tuple(f"{_mean_loss(r, v):.3f}" for v in ("fixed", "swap:200", "smooth:50")),
    ),
    Figure(
        "lowers the held-out loss on each of the three draws (by {}, {} and {};",
        lambda r: tuple(
            f"{_redraw(r, 'fixed' + k)['heldout_loss'] - _redraw(r, 'fixed@++' + k)['heldout_loss']:.3f}"
            for k in ("", "#1", "#2")
        ),
    ),
    Figure("did not help at 256 tokens ({};", lambda r: f"{_redraw(r, 'fixed@256')['heldout_loss']:.3f}"),
    # Throughput, memory per rank, scale on paper
    Figure("{} input tokens per step and process, fp32,", lambda r: f"{r['throughput']['settings']['tokens']:,}"),
    Figure(
        "(FAVOR++ at the trainer's default M = {}) holds ~{}k tokens/s",
        lambda r: (str(_throughput_features(r)), f"{_throughput_favor(r) / 1e3:.0f}"),
    ),
    Figure("at every length while softmax falls {}x", lambda r: _throughput_summary(r)[1]),
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
        lambda r: f"{_summary(r, 'zero_memory', 'ratio_vs_zero0@zero3'):.3f}",
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
    # Data pipeline
    Figure(
        "one rank, {}-core CPU; the tokenizer (vocab 8000) trained in {} s.",
        lambda r: (
            str(r["data_stream"]["machine"].get("cpu_count", r["data_stream"]["machine"].get("cpus"))),
            f"{r['data_stream']['prepare']['tokenizer_seconds']:.0f}",
        ),
    ),
    Figure(
        "A `tiny` model training step on the same batches takes {} s ({}k raw tokens/s): the stream is ~{}x faster",
        _data_stream,
    ),
    Figure(
        "median of five runs each; the machine was shared, 1-minute load average {} on its {} cores",
        lambda r: (
            f"{r['data_stream']['machine']['load_average_1m']:.1f}",
            str(r["data_stream"]["machine"]["cpu_count"]),
        ),
    ),
    Figure(
        "without workers the packed shards stream {} M raw tokens/s against {} M, and start in {} s against {} s",
        _web_like_stream,
    ),
    Figure(
        "At 1e9 documents a rank is at its first batch {} s after it starts reading the manifest, {} s of it checking "
        "the 4 GB index against the manifest ({} s its sha256), and holds {} MB beyond the mapped index",
        lambda r: (
            f"{_plan_summary(r)['startup_s']:.1f}",
            f"{_plan_summary(r)['index_check_s']:.1f}",
            f"{_plan_summary(r)['sha256_s']:.1f}",
            f"{_plan_summary(r)['anon_mb']:.0f}",
        ),
    ),
    Figure(
        "the replaced planner would take ~{} s and ~{} GB per rank. A global batch draws from {} shards",
        lambda r: (
            f"{_plan_largest(r)['old']['estimate']['startup_s']:.0f}",
            f"{_plan_largest(r)['old']['estimate']['anon_peak_bytes'] / 1e9:.0f}",
            f"{_plan_summary(r)['distinct_mean']:.0f}",
        ),
    ),
    Figure(
        "{} bytes/token on the stdlib corpus and {} on synthetic web-like documents of ~{} tokens (at most {}x the "
        "token bytes; with a tar member per document, version 1, {} and {})",
        _shard_bytes,
    ),
]


# ----------------------------------------------------------------------------- the README


BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.DOTALL)


def render(text: str, results: Results | None = None) -> tuple[str, list[str]]:
    """README ``text`` with every generated block and quoted figure as the results give them, and the
    problems found (a block without its renderer or missing from the README, a phrase not found once)."""
    results = results or Results()
    problems = []
    seen = set()

    def block(match: re.Match) -> str:
        name = match["name"]
        seen.add(name)
        if name not in BLOCKS:
            problems.append(f"README block <!-- results:{name} --> has no renderer in benchmarks/readme_tables.py")
            return match[0]
        return match[1] + render_block(name, results) + match[4]

    text = BLOCK.sub(block, text)
    problems += [
        f"README has no block <!-- results:{name} --> ... <!-- /results:{name} -->"
        for name in BLOCKS
        if name not in seen
    ]
    for figure in FIGURES:
        pattern = figure.pattern()
        matches = list(pattern.finditer(text))
        if len(matches) != 1:
            problems.append(f"{len(matches)} places in README.md match the quoted phrase {figure.phrase!r} (need one)")
            continue
        match, values = matches[0], figure.expected(results)
        if len(values) != len(match.groups()):
            raise ValueError(f"{figure.phrase!r}: {len(values)} values for {len(match.groups())} places")
        for index in reversed(range(len(values))):  # from the end, so earlier offsets stay valid
            text = text[: match.start(index + 1)] + values[index] + text[match.end(index + 1) :]
    return text, problems


def check(readme: Path = README, results: Results | None = None) -> str:
    """'' when README.md agrees with the results; otherwise the problems and a unified diff."""
    old = readme.read_text()
    new, problems = render(old, results)
    diff = "".join(
        difflib.unified_diff(old.splitlines(True), new.splitlines(True), "README.md", "README.md (from the results)")
    )
    return "\n".join(problems) + ("\n" if problems and diff else "") + diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff if README.md is stale")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    if args.check:
        report = check(args.readme)
        if report:
            print(report, end="" if report.endswith("\n") else "\n")
            print(
                "README.md disagrees with benchmarks/results: run python benchmarks/readme_tables.py", file=sys.stderr
            )
            return 1
        return 0
    new, problems = render(args.readme.read_text())
    args.readme.write_text(new)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
