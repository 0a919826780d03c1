"""The main job's figures: what `make pretrain` trained, and what its export computes on held-out data.

    make pretrain && python benchmarks/main_job.py --run runs/tiny --data runs/data

Reads the run's metrics.jsonl (train and eval losses, throughput, wall-clock, redraws) and
evaluates its export on the first --batches batches of the held-out split (the trainer's own
stream: same objective, lengths and order as its evaluations, one rank): with the projection the
export carries, then with every other projection the run drew (each a pure function of the run's
base seed and the redraw step), so the export can be held to the best of them.

Writes benchmarks/results/main_job.json and main_job.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

TABLE_STEPS = (10, 200, 400, 600)


def heldout_loss(model, manifest: Path, input_length: int, batch_size: int, batches: int) -> float:
    from data.stream import StreamConfig, TokenStream

    stream = TokenStream(
        StreamConfig(
            manifest=str(manifest),
            objective="span_corruption",
            input_length=input_length,
            batch_size=batch_size,
            seed=0,
            max_epochs=1,
        ),
        rank=0,
        world_size=1,
    )
    losses = []
    with torch.no_grad():
        for index, batch in enumerate(stream.iter_epoch()):
            if index == batches:
                break
            losses.append(float(model(**batch).loss))
    return sum(losses) / len(losses)


def portable(run_config: dict) -> dict:
    """The run config with its paths relative to the repository (where they lie inside it)."""

    def relative(value):
        path = Path(value) if isinstance(value, str) else None
        return (
            str(path.relative_to(ROOT))
            if path is not None and path.is_absolute() and path.is_relative_to(ROOT)
            else value
        )

    return {
        section: ({key: relative(value) for key, value in values.items()} if isinstance(values, dict) else values)
        for section, values in run_config.items()
    }


def summarise_metrics(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    events = [r for r in records if r["kind"] == "event"]
    times = [r["time"] for r in records if r["kind"] == "train"]
    return {
        "train_loss": {step: train[step]["loss"] for step in TABLE_STEPS if step in train},
        "eval_loss": {step: evals[step]["loss"] for step in sorted(evals)},
        "lr": {step: train[step]["lr"] for step in (1, 10, 30, 31, 600) if step in train},
        "tokens_per_s_median": sorted(r["tokens_per_s"] for r in train.values())[len(train) // 2],
        "data_wait_fraction_median": sorted(r["data_wait_fraction"] for r in train.values())[len(train) // 2],
        "training_seconds": times[-1] - times[0] if len(times) > 1 else None,
        "tokens": max(r["tokens"] for r in train.values()),
        "redraws": [r["redraw"] for r in events if "redraw" in r],
        "parameter_groups": next((r["parameter_groups"] for r in events if "parameter_groups" in r), None),
        # The paired jump is in benchmarks/redraw.py; here the raw one, 10 steps after vs before.
        "train_loss_around_redraws": {
            str(step): [train[s]["loss"] for s in (step, step + 10) if s in train]
            for step in [r["redraw"] for r in events if "redraw" in r]
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "tiny")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data")
    parser.add_argument("--batches", type=int, default=12, help="held-out batches of 8 rows")
    parser.add_argument("--name", default="main_job")
    parser.add_argument(
        "--run-commit",
        default=None,
        help="the commit whose code trained the run (default: this one, as after `make pretrain`)",
    )
    args = parser.parse_args(argv)

    from performer import from_pretrained

    export = args.run / "export"
    config = json.loads((export / "config.json").read_text())
    run_config = json.loads(
        (args.run / "checkpoints" / (args.run / "checkpoints" / "latest").read_text().strip() / "COMPLETE").read_text()
    )["run_config"]
    model = from_pretrained(export)
    length, rows = run_config["data"]["input_length"], run_config["train"]["micro_batch_size"]
    manifest = args.data / "heldout"
    projections = config.get("projections") or {}
    own = heldout_loss(model, manifest, length, rows, args.batches)
    metrics = summarise_metrics(args.run)
    by_draw = {}
    if projections:
        for draw in sorted({0, *metrics["redraws"], projections["redraw_step"]}):
            for attention in model.favor_attentions():
                attention.draw_projection_(projections["base_seed"], draw)
            by_draw[draw] = heldout_loss(model, manifest, length, rows, args.batches)
    machine = common.machine()
    results = {
        "machine": machine,
        "trained_at_commit": args.run_commit or common.commit(),
        "run": portable(run_config),
        "metrics": metrics,
        "export": {
            "draw": projections.get("redraw_step"),
            "trained_steps": projections.get("trained_steps"),
            "heldout_loss": own,
            "heldout_loss_by_draw": by_draw,
            "heldout_batches": args.batches,
            "rows_per_batch": rows,
        },
    }
    common.publish(args.name, results, markdown(results))
    return 0


def markdown(results: dict) -> str:
    metrics, export = results["metrics"], results["export"]
    rows = [
        [
            step,
            f"{metrics['train_loss'][step]:.2f}",
            f"{metrics['eval_loss'][step]:.2f}" if step in metrics["eval_loss"] else "",
        ]
        for step in metrics["train_loss"]
    ]
    text = f"Trained at commit {results['trained_at_commit']}.\n\n" + common.table(
        ["step", "train loss", "eval loss"], rows
    )
    text += (
        f"\n\n{metrics['tokens']:,} tokens, {metrics['tokens_per_s_median'] / 1000:.1f}k tokens/s (median over log "
        f"intervals), data wait {metrics['data_wait_fraction_median']:.1%}, "
        f"{metrics['training_seconds']:.0f} s of training (first to last logged step).\n"
    )
    if export["heldout_loss_by_draw"]:
        draws = common.table(
            ["projection", "held-out loss"],
            [
                [f"draw {draw}" + (" (the export's)" if draw == export["draw"] else ""), f"{loss:.3f}"]
                for draw, loss in export["heldout_loss_by_draw"].items()
            ],
        )
        text += (
            f"\nThe export on {export['heldout_batches']} held-out batches of {export['rows_per_batch']} rows: "
            f"{export['heldout_loss']:.3f} with its own projection (draw {export['draw']}, trained in steps "
            f"{export['trained_steps']}); with each projection the run drew:\n\n{draws}\n"
        )
    return text


if __name__ == "__main__":
    raise SystemExit(main())
