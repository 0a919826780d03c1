"""README section "Performance", learning parity: "Learning parity: FAVOR+ against softmax", "How many
features: M = 256 at head dim 32" and "Redraws: what they cost, and the default".
"""

from __future__ import annotations

import math
import statistics

from benchmarks import common
from benchmarks.readme.core import (
    Block,
    Figure,
    Results,
    both,
    first_record,
    jump,
    kilo,
    percent,
    signed_percent,
    spread,
    summary_value,
)


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
# it; the LM's M=512 on seed 2 and the seq2seq's seeds 1 and 2 (softmax and M=256) on today's preparation
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
    "parity-cpu-seq2seq-softmax-seed2-today": "today",
    "parity-cpu-seq2seq-seed2-today": "today",
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


def _parity_tokens(r: Results) -> tuple[str, ...]:
    settings = r["parity"]["settings"]
    tokens = settings["steps_at_1024"] * settings["tokens_per_step"]
    passes = tokens / r["data_stream"]["shards"]["tokens"]  # the stdlib corpus's train tokens
    return (
        str(settings["steps_at_1024"]),
        kilo(settings["tokens_per_step"], 0),
        f"{tokens / 1e6:.1f}M",
        f"{passes:.1f}",
        str(first_record(r, "parity", length=4096)["steps"]),
    )


def _parity_gap(r: Results, kind: str, variant: str = "favor", length: int = 1024, name: str = "parity") -> float:
    return summary_value(r, name, f"{kind}@{length} {variant} vs softmax")


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
    return *both(lambda x: x["max_paired_jump"], draws, 1), spread(recoveries)


BLOCKS: dict[str, Block] = {
    "parity": Block(("parity", "parity-m256"), parity_table),
    "parity-cpu": Block(PARITY_CPU_FILES, parity_cpu_table),
    "redraw": Block(("redraw",), redraw_table),
}


FIGURES: list[Figure] = [
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
        lambda r: both(
            lambda kind: 100 * (_parity_gap(r, kind, "favor-redraw") - _parity_gap(r, kind)), ("seq2seq", "lm"), 1
        ),
    ),
    Figure(
        "the gap is {} (seq2seq) and {} (LM).",
        lambda r: tuple(percent(_parity_gap(r, kind, length=4096), 1) for kind in ("seq2seq", "lm")),
    ),
    # How many features
    Figure(
        "With M = 256 the encoder-decoder lands at {} (mean of 3 seeds: {}, {} and {}) and the LM at {} "
        "(mean of 3 seeds)",
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
        lambda r: both(lambda x: x["heldout_new_draw"] - x["heldout_loss"], _draws(r, "fixed"), 1),
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
        lambda r: both(lambda v: _mean_loss(r, v) - _mean_loss(r, "fixed"), REDRAW_SCHEMES, 2),
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
]
