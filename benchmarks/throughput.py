"""Training throughput against input length, FAVOR+ vs softmax, one process and 2 DeepSpeed ranks.

    performer data prepare --source stdlib --num-sentinels 512 --out runs/data-s512   # once (~1 min)
    python benchmarks/throughput.py           # tiny preset, CPU: the README's table and plot (~10 min)

Span corruption of an 8192-token row makes about 455 noise spans, one sentinel each: the default
data (`make pretrain`'s runs/data, 100 sentinels) stops at about L=1800, hence the data above.

The model is configs/tiny.yaml's: the `tiny` preset seq2seq (d_model 128, 4 heads of 32, 2 encoder +
2 decoder layers, SwiGLU feed-forward, rotary positions, tied embeddings, the data's vocabulary),
span corruption (input length L, decoder length about L/4.4: 512 -> 114), FAVOR+ with the
trainer's default number of features (256 for head dim 32 since it became max(256, round(D ln D));
the results file records the M it ran with: bidirectional in the encoder, causal in the decoder
and cross) or exact softmax attention (SDPA) in the same places.
The batch holds a constant number of input tokens per step and process (--tokens, 8192 by
default: 32 rows of 256 ... 1 row of 8192), so tokens/s changes only with the length's cost.

Two modes, each (attention, length) in its own processes:
* single: plain PyTorch in one process (--threads, all cores by default): forward, backward and
  torch AdamW on random token ids of the span-corruption shapes (as benchmarks/model_step.py),
  median of --repeats steps after 2 warm-up steps;
* deepspeed: the real trainer on 2 CPU ranks (`deepspeed --num_gpus 2 --module launcher.pretrain
  --config configs/tiny.yaml --set model.attention_type=... data.input_length=L
  train.micro_batch_size=B ...`, 1 torch thread per rank, ZeRO-1 and fp32 as tiny.yaml, real
  shards of --data), --steps steps; the median of the run's metrics.jsonl tokens_per_s after its
  first step (tokens of both ranks: the global rate).
tokens/s counts encoder + decoder tokens. FAVOR+'s ratio to softmax is taken within a mode at the
same length; the crossover is the shortest measured length from which FAVOR+ stays ahead, with
the length where the ratio crosses 1 interpolated on log-length between the two neighbours.

Writes benchmarks/results/<name>.json, <name>.md and <name>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

ATTENTIONS = ("favor", "softmax")
MODES = ("single", "deepspeed")


def check_sentinels(manifest: str, length: int) -> None:
    """Stop before any run when the data's tokenizer has too few sentinels for `length`."""
    from data.objectives import span_corruption_lengths
    from data.shards import Manifest

    raw = span_corruption_lengths(length)[0]
    spans = round(round(raw * 0.15) / 3.0)  # T5 defaults: noise density 0.15, mean span 3
    have = Manifest.load(manifest).special.num_sentinels
    if spans > have:
        raise SystemExit(
            f"{manifest}: {have} sentinels, but span corruption at L={length} makes about {spans} "
            f"spans; prepare data with more: performer data prepare --source stdlib "
            f"--num-sentinels 512 --out runs/data-s512"
        )


def trainer_settings(args, attention: str, length: int) -> list[str]:
    """--set overrides of configs/tiny.yaml shared by both modes (the model, the shapes)."""
    return [
        f"data.manifest={args.data}",
        f"model.attention_type={attention}",
        f"data.input_length={length}",
        f"train.micro_batch_size={max(1, args.tokens // length)}",
    ]


# ----------------------------------------------------------------------------- single process (worker)


def measure_single(args) -> dict:
    """One (attention, length) in plain PyTorch: the trainer's model, random ids, AdamW."""
    from data.objectives import span_corruption_lengths
    from data.shards import Manifest
    from launcher.config import load_config
    from launcher.engine import build_model_config
    from performer.models import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config([str(ROOT / "configs" / "tiny.yaml")], trainer_settings(args, args.attention, args.length))
    special = Manifest.load(config.data.manifest).special
    model_config = build_model_config(config, special)
    model = build_model(config.model.kind, model_config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optimizer.lr, weight_decay=config.optimizer.weight_decay
    )
    batch, length = config.train.micro_batch_size, config.data.input_length
    target = span_corruption_lengths(length)[1]
    low, high = special.mask_id + 1, special.vocab_size - special.num_sentinels  # ordinary tokens only
    labels = torch.randint(low, high, (batch, target))
    inputs = {
        "input_ids": torch.randint(low, high, (batch, length)),  # (B, L)
        "attention_mask": torch.ones(batch, length, dtype=torch.bool),  # (B, L), packed rows: all real
        "decoder_input_ids": torch.cat([torch.full((batch, 1), special.bos_id), labels[:, :-1]], dim=1),  # (B, T)
        "labels": labels,  # (B, T)
    }

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()

    timing = common.median_seconds(step, args.repeats, warmup=2)
    tokens = batch * (length + target)
    return {
        "batch": batch,
        "target_length": target,
        **timing,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / timing["median_s"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "nb_features": next((a.projection.shape[0] for a in model.favor_attentions()), None),
        "threads": args.threads,
        "peak_rss_bytes": common.peak_resident_bytes(),
    }


# ----------------------------------------------------------------------------- 2 DeepSpeed ranks (trainer)


def measure_deepspeed(args, attention: str, length: int, out_dir: Path) -> dict:
    """One (attention, length) through the real trainer on --ranks ranks; tokens/s from metrics.jsonl."""
    settings = [
        *trainer_settings(args, attention, length),
        f"train.max_steps={args.steps}",
        "model.feature_redraw_interval=null",
    ]
    run = common.run_trainer(
        ["configs/tiny.yaml"],
        settings,
        out_dir / f"{attention}-{length}",
        args.ranks,
        args.threads_per_rank,
        args.budget_s,
    )
    if "error" in run:
        return run
    train = [r for r in run["metrics"] if r["kind"] == "train" and r["step"] > 1]  # step 1 carries the warm-up
    if run["returncode"] != 0 or not train:
        return {"error": f"exit {run['returncode']}", "output_tail": run["output_tail"]}
    rates = [r["tokens_per_s"] for r in train]
    memory = [r for r in run["metrics"] if r["kind"] == "memory"]
    return {
        "batch": max(1, args.tokens // length),
        "ranks": args.ranks,
        "threads_per_rank": args.threads_per_rank,
        "tokens_per_s": statistics.median(rates),
        "min_tokens_per_s": min(rates),
        "max_tokens_per_s": max(rates),
        "steps_timed": len(rates),
        "wall_s": run["wall_s"],
        "peak_rss_bytes": memory[-1]["peak_rss_bytes"] if memory else None,
    }


# ----------------------------------------------------------------------------- summary, report


def crossover(rates: dict[int, float], baseline: dict[int, float]) -> dict:
    """Where FAVOR+'s tokens/s overtakes the baseline's for good, from the measured lengths."""
    lengths = sorted(set(rates) & set(baseline))
    ratios = {n: rates[n] / baseline[n] for n in lengths}
    ahead_from = next((n for i, n in enumerate(lengths) if all(ratios[m] >= 1 for m in lengths[i:])), None)
    result: dict = {"ratios": ratios, "favor_ahead_from": ahead_from}
    if ahead_from is not None and ahead_from != lengths[0]:
        before = lengths[lengths.index(ahead_from) - 1]
        # log(ratio) linear in log(length) between the two neighbours: where it reaches 0.
        a, b = math.log(ratios[before]), math.log(ratios[ahead_from])
        fraction = a / (a - b) if a != b else 1.0
        result["interpolated_length"] = round(math.exp(math.log(before) + fraction * math.log(ahead_from / before)))
    return result


def summarise(records: list[dict]) -> dict:
    summary = {}
    for mode in MODES:
        rate = {
            a: {
                r["length"]: r["tokens_per_s"]
                for r in records
                if r["mode"] == mode and r["attention"] == a and "tokens_per_s" in r
            }
            for a in ATTENTIONS
        }
        if rate["favor"] and rate["softmax"]:
            summary[mode] = crossover(rate["favor"], rate["softmax"])
    return summary


def markdown(results: dict) -> str:
    settings, records, summary = results["settings"], results["records"], results["summary"]
    lengths = sorted({r["length"] for r in records})
    rows = []
    for mode in MODES:
        for attention in ATTENTIONS:
            cells = []
            for length in lengths:
                record = next(
                    (r for r in records if (r["mode"], r["attention"], r["length"]) == (mode, attention, length)), None
                )
                if record is None:
                    cells.append("")
                elif "tokens_per_s" not in record:
                    cells.append(record.get("error", "failed"))
                else:
                    cells.append(f"{record['tokens_per_s']:,.0f}")
            rows.append([mode, attention, *cells])
        if mode in summary:
            rows.append(
                [
                    mode,
                    "FAVOR+ / softmax",
                    *(f"{summary[mode]['ratios'][n]:.2f}x" if n in summary[mode]["ratios"] else "" for n in lengths),
                ]
            )
    some = next((r for r in records if "parameters" in r), {})
    lines = [
        f"Training tokens/s (encoder + decoder tokens) of the `tiny` preset seq2seq of configs/tiny.yaml "
        f"({some.get('parameters', 0) / 1e6:.2f}M parameters, d_model 128, 4 heads of 32, 2 + 2 layers, "
        f"M={next((r['nb_features'] for r in records if r.get('nb_features')), '?')} FAVOR+ features), "
        "span corruption (decoder length about L/4.4), "
        f"{settings['tokens']:,} input tokens per step and process (batch {settings['tokens']} / L), fp32 on "
        f"{results['machine']['cpu_count']} CPU cores:\n",
        "- single: one process, plain PyTorch (forward, backward, AdamW), "
        f"{settings['threads']} threads, median of {settings['repeats']} steps after 2 warm-up steps;",
        f"- deepspeed: the trainer on {settings['ranks']} ranks (gloo, {settings['threads_per_rank']} thread each, "
        f"ZeRO-1), real shards, median over steps 2-{settings['steps']} of metrics.jsonl tokens_per_s (both ranks' "
        "tokens: the global rate).\n",
        common.table(["mode", "attention", *(f"L={n}" for n in lengths)], rows),
        "",
    ]
    for mode, found in summary.items():
        if found["favor_ahead_from"] is None:
            lines.append(f"- {mode}: FAVOR+ does not overtake softmax up to L={lengths[-1]}")
        elif "interpolated_length" in found:
            lines.append(
                f"- {mode}: crossover at about L={found['interpolated_length']:,} (FAVOR+ ahead from "
                f"L={found['favor_ahead_from']:,} on; log-length interpolation of the ratio)"
            )
        else:
            lines.append(f"- {mode}: FAVOR+ ahead at every measured length (from L={found['favor_ahead_from']:,})")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    styles = {
        ("single", "favor"): "o-",
        ("single", "softmax"): "o--",
        ("deepspeed", "favor"): "s-",
        ("deepspeed", "softmax"): "s--",
    }
    for (mode, attention), style in styles.items():
        points = sorted(
            (r["length"], r["tokens_per_s"])
            for r in results["records"]
            if (r["mode"], r["attention"]) == (mode, attention) and "tokens_per_s" in r
        )
        if points:
            label = f"{'FAVOR+' if attention == 'favor' else 'softmax'}, {mode}"
            axis.plot(
                *zip(*points),
                style,
                label=label,
                color="C0" if attention == "favor" else "C3",
                alpha=1.0 if mode == "single" else 0.6,
            )
    axis.set_xscale("log", base=2)
    axis.set_xlabel("input length L (tokens; batch = tokens per step / L)")
    axis.set_ylabel("training tokens/s")
    axis.set_title(f"tiny seq2seq, {results['settings']['tokens']:,} input tokens per step, CPU")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--attention", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--attentions", default=",".join(ATTENTIONS))
    parser.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--tokens", type=int, default=8192, help="input tokens per step and process")
    parser.add_argument(
        "--data",
        default="runs/data-s512/train",
        help="train manifest ('performer data prepare'), with sentinels for the longest length",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="single mode")
    parser.add_argument("--repeats", type=int, default=5, help="single mode: timed steps")
    parser.add_argument("--ranks", type=int, default=2, help="deepspeed mode")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="deepspeed mode")
    parser.add_argument("--steps", type=int, default=6, help="deepspeed mode: trainer steps (the first not timed)")
    parser.add_argument("--budget-s", type=float, default=900.0)
    parser.add_argument("--name", default="throughput")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure_single(args)))
        return 0
    check_sentinels(args.data, max(int(n) for n in args.lengths.split(",")))
    script = Path(__file__).resolve()
    records = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as out_dir:
        for mode in args.modes.split(","):
            for length in (int(n) for n in args.lengths.split(",")):
                for attention in args.attentions.split(","):
                    if mode == "single":
                        shared = [
                            "--data",
                            args.data,
                            "--tokens",
                            str(args.tokens),
                            "--threads",
                            str(args.threads),
                            "--repeats",
                            str(args.repeats),
                            "--attention",
                            attention,
                            "--length",
                            str(length),
                        ]
                        record = common.run_isolated(script, shared, args.budget_s)
                    else:
                        record = measure_deepspeed(args, attention, length, Path(out_dir))
                    record.update(mode=mode, attention=attention, length=length)
                    print(json.dumps(record), flush=True)
                    records.append(record)
    settings = {
        key: getattr(args, key)
        for key in ("tokens", "threads", "repeats", "ranks", "threads_per_rank", "steps", "data")
    }
    results = {"settings": settings, "machine": common.machine(), "records": records, "summary": summarise(records)}
    common.publish(args.name, results, markdown(results), plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
