"""What a projection redraw costs, and what makes it cheap.

    python benchmarks/redraw.py --data runs/data                     # the default sweep (~45 min on 2 cores)
    python benchmarks/redraw.py --data runs/data --variants fixed,swap:200 --steps 200   # a quick look

The `tiny` seq2seq model of the main job (span corruption, 256 input tokens, 16 rows, AdamW with
the trainer's groups and schedule) is trained with each variant from the same initial weights on
the same batches in the same order (random windows of the corpus, as in benchmarks/parity.py).
Variants name how the FAVOR+ projection of each attention layer evolves with the step:

* ``softmax``: exact attention; ``fixed``: one draw for the whole run;
* ``swap:I``: a new draw every I steps (what the trainer did until now: ``model.feature_redraw_interval``);
* ``rolling:I``: the projection's orthogonal blocks are replaced one at a time, each every I steps,
  staggered, so every block stays an exact orthogonal Gaussian draw;
* ``smooth:I``: every I steps a new draw is reached gradually, w = cos(t) old + sin(t) new with t
  going from 0 to pi/2 over the interval: every row stays exactly N(0, I) (unbiased), and no step
  sees a discontinuity;
* ``grow:I0-I1``: swaps every I0 steps, the interval doubling after each until it reaches I1
  (frequent early, rare late);
* ``...#k``: the same variant with the k-th other seed for the projections (same weights and
  batches): the spread over k is how much the draw alone moves the result;
* ``...@M``: with M random features per head instead of round(D ln D); ``...@++`` / ``...@M++``:
  FAVOR++ features (``feature_map="favor++"``, performer/feature_maps.py) instead of FAVOR+.

Per redraw (each swap boundary, each block replacement, each nominal interval of smooth), the
train-loss jump is the mean loss of the 10 steps after minus the 10 steps before, paired against
the ``fixed`` run on the same batches (which removes the batches' own ups and downs; the raw jump
is reported too), and the recovery is the number of steps until the paired 10-step gap is back
within 0.02 nats of what it was before. At the end, each model's held-out loss is measured with
the projection its last step trained with, against ``fixed`` and ``softmax``, and with a new,
unseen draw (how much the model depends on its draw).

Writes benchmarks/results/redraw.json, redraw.md and redraw.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.parity import make_batches, pack, special_tokens  # noqa: E402

DEFAULT_VARIANTS = (
    "softmax",
    "fixed",
    "fixed#1",
    "fixed#2",
    "swap:200",
    "swap:200#1",
    "swap:50",
    "swap:10",
    "swap:1",
    "rolling:200",
    "smooth:200",
    "smooth:50",
    "smooth:50#1",
    "grow:10-200",
    "fixed@256",
    "fixed@++",
    "fixed@++#1",
    "fixed@++#2",
    "swap:200@++",
)
JUMP_WINDOW = 10
RECOVERED_WITHIN = 0.02


# ----------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str  # softmax, fixed, swap, rolling, smooth, grow
    interval: int = 0
    first_interval: int = 0
    nb_features: int | None = None
    feature_map: str = "favor+"
    draw_seed: int = 0

    @classmethod
    def parse(cls, text: str) -> "Variant":
        text_without_seed, _, draw_seed = text.partition("#")
        spec, _, features = text_without_seed.partition("@")
        mode, _, interval = spec.partition(":")
        if mode not in ("softmax", "fixed", "swap", "rolling", "smooth", "grow"):
            raise SystemExit(f"unknown variant {text!r}")
        first = 0
        if mode == "grow":
            first, _, interval = interval.partition("-")
        feature_map = "favor++" if features.endswith("++") else "favor+"
        features = features.removesuffix("++")
        return cls(
            text,
            mode,
            int(interval or 0),
            int(first or 0),
            int(features) if features else None,
            feature_map,
            int(draw_seed or 0),
        )

    def swap_boundaries(self, steps: int) -> list[int]:
        """Steps after which a swap-like variant draws anew."""
        if self.mode == "swap":
            return list(range(self.interval, steps, self.interval))
        if self.mode == "grow":
            boundaries, at, interval = [], 0, self.first_interval
            while at + interval < steps:
                at += interval
                boundaries.append(at)
                interval = min(2 * interval, self.interval)
            return boundaries
        return []


def _draw(seed: int, layer: int, index: int, block: int, rows: int, head_dim: int) -> torch.Tensor:
    """Block ``block`` (head_dim rows, orthogonal, chi norms) of draw ``index``: a pure function."""
    from performer.feature_maps import derive_seed, gaussian_orthogonal_projection

    return gaussian_orthogonal_projection(rows, head_dim, derive_seed(seed, layer, index, block))


class Projections:
    """The projection of every layer at every step, for one variant (cached per draw)."""

    def __init__(self, variant: Variant, seed: int, nb_features: int, head_dim: int, steps: int):
        self.variant, self.seed, self.nb_features, self.head_dim = variant, seed, nb_features, head_dim
        self.blocks = math.ceil(nb_features / head_dim)
        self.boundaries = variant.swap_boundaries(steps)
        self.cache: dict[tuple, torch.Tensor] = {}

    def _full(self, layer: int, index: int) -> torch.Tensor:
        key = (layer, index)
        if key not in self.cache:
            blocks = [_draw(self.seed, layer, index, b, self.head_dim, self.head_dim) for b in range(self.blocks)]
            self.cache[key] = torch.cat(blocks)[: self.nb_features]
        return self.cache[key]

    def at(self, layer: int, step: int) -> torch.Tensor:
        """(M, D) projection that optimizer step ``step`` (>= 1) trains with."""
        mode, interval = self.variant.mode, self.variant.interval
        if mode == "fixed":
            return self._full(layer, 0)
        if mode in ("swap", "grow"):
            return self._full(layer, sum(b < step for b in self.boundaries))
        if mode == "smooth":
            index, within = divmod(step - 1, interval)
            angle = 0.5 * math.pi * within / interval
            return math.cos(angle) * self._full(layer, index) + math.sin(angle) * self._full(layer, index + 1)
        if mode == "rolling":
            # Block b is replaced after steps interval * (k + b / blocks): one block at a time.
            rows = []
            for block in range(self.blocks):
                index = (step - 1 + block * interval // self.blocks) // interval
                rows.append(_draw(self.seed, layer, index, block, self.head_dim, self.head_dim))
            return torch.cat(rows)[: self.nb_features]
        raise ValueError(mode)

    def redraw_steps(self, steps: int) -> list[int]:
        """Steps after which the projection changes discontinuously (or, for smooth, where a draw is reached)."""
        mode, interval = self.variant.mode, self.variant.interval
        if mode in ("swap", "grow"):
            return self.boundaries
        if mode == "smooth":
            return list(range(interval, steps, interval))
        if mode == "rolling":
            offsets = sorted({(interval - block * interval // self.blocks) % interval for block in range(self.blocks)})
            return sorted(s for s in range(1, steps) for o in offsets if s % interval == o % interval and s >= 1)
        return []


# ----------------------------------------------------------------------------- training


def build(variant: Variant, vocab_size: int, seed: int):
    from performer.config import preset
    from performer.models import PerformerSeq2Seq

    config = preset(
        "tiny",
        vocab_size=vocab_size,
        dropout=0.0,
        attention_type="softmax" if variant.mode == "softmax" else "favor",
        projection_seed=seed,
        feature_redraw_interval=None,
        auto_check_redraw=False,
        nb_features=variant.nb_features,
        feature_map=variant.feature_map,
        decoder_start_id=3,
    )
    torch.manual_seed(seed)  # the same initial weights for every variant
    return PerformerSeq2Seq(config)


def set_projections(model, projections: Projections | None, step: int) -> None:
    if projections is None:
        return
    with torch.no_grad():
        for attention in model.favor_attentions():
            attention.projection.copy_(projections.at(attention.projection_id, step))


def heldout_loss(model, heldout: list[dict]) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(**batch).loss.item() for batch in heldout]
    model.train()
    return float(np.mean(losses))


def train(variant: Variant, batches, heldout, args, vocab_size: int) -> dict:
    from launcher.schedule import learning_rate, set_learning_rate
    from performer.optim import weight_decay_groups

    model = build(variant, vocab_size, args.seed)
    projections = None
    if variant.mode != "softmax":
        attention = model.favor_attentions()[0]
        projections = Projections(
            variant, args.seed + 7919 * variant.draw_seed, attention.nb_features, attention.head_dim, len(batches)
        )
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.01), lr=args.lr, betas=(0.9, 0.98))
    losses, curve = [], []
    started = time.perf_counter()
    for step, batch in enumerate(batches, start=1):
        set_projections(model, projections, step)
        set_learning_rate(optimizer, learning_rate(step, args.lr, args.warmup, len(batches), 0.1))
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        # Evaluated with the projection this step trained with (the next step's comes at its start).
        if step % args.eval_interval == 0 or step == len(batches):
            curve.append({"step": step, "heldout_loss": heldout_loss(model, heldout)})
    record = {
        "variant": variant.name,
        "final_heldout_loss": curve[-1]["heldout_loss"],
        "curve": curve,
        "train_losses": losses,
        "seconds": time.perf_counter() - started,
        "redraw_steps": projections.redraw_steps(len(batches)) if projections else [],
    }
    if projections is not None:
        unseen = Projections(
            Variant("fixed", "fixed"), args.seed + 1000, projections.nb_features, projections.head_dim, len(batches)
        )
        set_projections(model, unseen, 1)
        record["heldout_loss_new_draw"] = heldout_loss(model, heldout)
    return record


# ----------------------------------------------------------------------------- analysis


def jumps(record: dict, fixed: dict | None) -> list[dict]:
    """Per redraw step s: raw and paired 10-step jumps, and the steps until the paired gap recovers."""
    losses = np.array(record["train_losses"])
    reference = np.array(fixed["train_losses"]) if fixed else np.zeros_like(losses)
    gap = losses - reference
    found = []
    for s in record["redraw_steps"]:
        if s < JUMP_WINDOW or s + JUMP_WINDOW > len(losses):
            continue
        before, after = slice(s - JUMP_WINDOW, s), slice(s, s + JUMP_WINDOW)  # steps s-9..s and s+1..s+10
        baseline = gap[before].mean()
        recovery = None
        for r in range(1, len(losses) - s + 1):
            window = gap[max(s, s + r - JUMP_WINDOW) : s + r]
            if window.mean() <= baseline + RECOVERED_WITHIN:
                recovery = r
                break
        found.append(
            {
                "step": s,
                "raw_jump": float(losses[after].mean() - losses[before].mean()),
                "paired_jump": float(gap[after].mean() - baseline),
                "recovery_steps": recovery,
            }
        )
    return found


def summarise(records: list[dict]) -> list[dict]:
    by_name = {r["variant"]: r for r in records}
    softmax = by_name.get("softmax")
    rows = []
    for record in records:
        suffix = record["variant"].partition("#")[0].partition("@")[2]
        fixed = by_name.get(f"fixed@{suffix}" if suffix else "fixed", by_name.get("fixed"))
        found = jumps(record, fixed if record is not fixed else None) if record["redraw_steps"] else []
        recoveries = [j["recovery_steps"] for j in found if j["recovery_steps"] is not None]
        rows.append(
            {
                "variant": record["variant"],
                "heldout_loss": record["final_heldout_loss"],
                "vs_fixed": record["final_heldout_loss"] - by_name["fixed"]["final_heldout_loss"]
                if "fixed" in by_name
                else None,
                "vs_softmax": record["final_heldout_loss"] / softmax["final_heldout_loss"] - 1 if softmax else None,
                "heldout_new_draw": record.get("heldout_loss_new_draw"),
                "redraws": len(found),
                "max_paired_jump": max((j["paired_jump"] for j in found), default=None),
                "mean_paired_jump": float(np.mean([j["paired_jump"] for j in found])) if found else None,
                "max_raw_jump": max((j["raw_jump"] for j in found), default=None),
                "median_recovery_steps": float(np.median(recoveries)) if recoveries else None,
                "unrecovered": len(found) - len(recoveries),
                "seconds": record["seconds"],
                "jumps": found,
            }
        )
    return rows


def markdown(results: dict) -> str:
    s = results["settings"]

    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    rows = [
        [
            r["variant"],
            number(r["heldout_loss"], ".3f"),
            number(r["vs_fixed"], "+.3f"),
            number(r["vs_softmax"], "+.1%"),
            number(r["heldout_new_draw"], ".3f"),
            r["redraws"] or "-",
            number(r["max_paired_jump"], "+.3f"),
            number(r["mean_paired_jump"], "+.3f"),
            number(r["max_raw_jump"], "+.3f"),
            number(r["median_recovery_steps"], ".0f"),
            f"{r['seconds']:.0f} s",
        ]
        for r in results["summary"]
    ]
    return (
        f"`tiny` seq2seq (d_model 128, 4 heads of 32, 2 + 2 layers), span corruption at {s['length']} input tokens, "
        f"{s['rows']} rows per step, {s['steps']} steps, AdamW lr {s['lr']} (warmup {s['warmup']}, cosine to 0.1x; "
        f"matrices decay 0.01), same initial weights and batches for every variant, {s['device']} fp32; held-out loss "
        f"on {s['heldout_batches']} fixed held-out batches with the projection the last step trained with, and with a "
        f"new draw. Jumps: mean train loss of the {JUMP_WINDOW} steps after a redraw minus the {JUMP_WINDOW} before, "
        "paired against `fixed` on the same batches (raw: unpaired); recovery: steps until the paired gap is back "
        f"within {RECOVERED_WITHIN} nats.\n\n"
        + common.table(
            [
                "variant",
                "held-out",
                "vs fixed",
                "vs softmax",
                "with a new draw",
                "redraws",
                "max jump",
                "mean jump",
                "max raw jump",
                "recovery (median)",
                "time",
            ],
            rows,
        )
    )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {r["variant"]: r for r in results["records"]}
    fixed = np.array(records["fixed"]["train_losses"]) if "fixed" in records else None
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, record in records.items():
        losses = np.array(record["train_losses"])
        smooth = np.convolve(losses, np.ones(JUMP_WINDOW) / JUMP_WINDOW, mode="valid")
        axes[0].plot(np.arange(JUMP_WINDOW, len(losses) + 1), smooth, label=name, linewidth=0.9)
        if fixed is not None and name != "fixed":
            gap = np.convolve(losses - fixed, np.ones(JUMP_WINDOW) / JUMP_WINDOW, mode="valid")
            axes[1].plot(np.arange(JUMP_WINDOW, len(losses) + 1), gap, label=name, linewidth=0.9)
    axes[0].set_title(f"train loss ({JUMP_WINDOW}-step mean)")
    axes[1].set_title("train loss minus fixed features, same batches")
    axes[1].axhline(0, color="black", linewidth=0.5)
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(True, alpha=0.3)
    axes[0].set_ylim(top=float(np.percentile(np.concatenate([r["train_losses"] for r in records.values()]), 90)))
    axes[1].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data")
    parser.add_argument("--packed", type=Path, help="a .npz written by benchmarks/parity.py --pack-only")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--length", type=int, default=256, help="encoder input tokens (the main job's)")
    parser.add_argument("--rows", type=int, default=16, help="rows per step (the main job's global batch)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--heldout-batches", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="redraw")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    machine = common.machine()  # the commit and load as the run starts
    variants = [Variant.parse(text) for text in args.variants.split(",")]
    packed = dict(np.load(args.packed)) if args.packed else pack(args.data)
    special = special_tokens(packed)
    batches = make_batches(packed["train"], "seq2seq", args.length, args.rows, args.steps, special, seed=args.seed)
    heldout = make_batches(
        packed["heldout"], "seq2seq", args.length, args.rows, args.heldout_batches, special, seed=args.seed + 1
    )
    records = []
    for variant in variants:
        record = train(variant, batches, heldout, args, special.vocab_size)
        print(json.dumps({k: v for k, v in record.items() if k not in ("curve", "train_losses")}), flush=True)
        records.append(record)
    settings = {
        "length": args.length,
        "rows": args.rows,
        "steps": args.steps,
        "lr": args.lr,
        "warmup": args.warmup,
        "heldout_batches": args.heldout_batches,
        "seed": args.seed,
        "device": "cpu",
    }
    results = {"settings": settings, "machine": machine, "records": records, "summary": summarise(records)}
    common.publish(args.name, results, markdown(results), plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
