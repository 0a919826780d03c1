"""Learning parity: does FAVOR+ reach softmax attention's held-out loss in the same steps and tokens?

    python benchmarks/parity.py --data runs/data            # all variants, on CUDA if present
    python benchmarks/parity.py --data runs/data --lengths 1024 --steps 200   # a quicker look
    python benchmarks/parity.py --data runs/data --lengths 1024 --seeds 0,1,2 \
        --variants softmax,favor@111,favor@256 --name parity-seeds   # mean and spread over seeds, per M

`--data` is a directory made by `performer data prepare` (train/ and heldout/ manifests; `make
pretrain` makes runs/data). The shards are read once into two flat token arrays (or taken from a
packed .npz given with `--packed`, which `--pack-only` writes).

For each model kind (the `tiny` encoder-decoder with T5 span corruption, and a `tiny` decoder-only
LM with next-token prediction) and each length, the variants are trained from the same
initial weights on the same batches in the same order, with AdamW and a warm-up + cosine
schedule:
* softmax:          exact attention (SDPA);
* favor:            FAVOR+ with fixed projections (never redrawn);
* favor++:          FAVOR++ features (performer/feature_maps.py), fixed;
* favor-redraw:     FAVOR+ with a new draw swapped in every --redraw-interval steps;
* favor-smooth:     FAVOR+ moving smoothly to a new draw over every --redraw-interval steps;
* favor++-redraw, favor++-smooth: the same redraws with FAVOR++ features.
Any variant but softmax takes a feature count: favor@256 is FAVOR+ with M = 256 per head. With
several --seeds every variant is trained once per seed (batches, held-out batches, initial weights
and projections all follow the seed) and compared with softmax on the same seed; the table gives
the mean gap and its smallest and largest.
The recipe is the trainer's: AdamW with its weight-decay groups (performer.optim), its warmup +
cosine schedule (launcher.schedule). Held-out loss is measured on the same held-out batches every
--eval-interval steps, with the projection the last step trained with. The batches
are cut from random windows of the corpus with our objectives (data.objectives), not streamed:
this measures the model, not the pipeline. At 4096 tokens span corruption uses a mean noise span
of 8 (with the T5 default of 3 a 4096-token row needs more spans than the 100 sentinels).

Writes benchmarks/results/<name>.json, .md and .png: parity by default, parity-m<M> with
--nb-features M (so the M=256 run does not overwrite the default run), or --name.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

VARIANTS = ("softmax", "favor", "favor++", "favor-redraw", "favor-smooth")
KINDS = ("seq2seq", "lm")
IGNORE = -100


# ----------------------------------------------------------------------------- data


def pack(data_dir: Path) -> dict[str, np.ndarray]:
    """Flat uint16 token arrays of the train and held-out splits, documents joined by eos.

    Each shard is verified against its manifest and read through its index, as the stream reads
    it: a version-2 member pair holds a lengths array beside the tokens, which is not text.
    """
    from data.shards import Manifest, verify_shard

    arrays = {}
    for split in ("train", "heldout"):
        manifest = Manifest.load(data_dir / split / "manifest.json")
        stored = np.dtype(manifest.dtype).newbyteorder("<")
        eos = np.array([manifest.special.eos_id], dtype=manifest.dtype)
        pieces = []
        for shard in manifest.shards:
            index = verify_shard(manifest, shard)
            data = np.memmap(manifest.shard_url(shard), dtype=np.uint8, mode="r")
            for offset, length in zip(index.offsets.tolist(), np.asarray(index.lengths).tolist()):
                document = data[offset : offset + length * index.itemsize]
                pieces += [np.frombuffer(document, dtype=stored).astype(manifest.dtype), eos]
        arrays[split] = np.concatenate(pieces)
    arrays["special"] = np.array(json.dumps(dataclasses.asdict(manifest.special)))
    return arrays


def corpus_fingerprint(packed: dict[str, np.ndarray]) -> str:
    """sha256 (first 16 hex digits) of the packed token arrays: runs compare only on one corpus,
    and a preparation with another tokenizer or other shards gives another."""
    digest = hashlib.sha256()
    for split in ("train", "heldout"):
        tokens = packed[split]
        digest.update(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()[:16]


def special_tokens(packed: dict[str, np.ndarray]):
    from data.tokenizer import SpecialTokens

    return SpecialTokens.from_dict(json.loads(str(packed["special"])))


def make_batches(tokens: np.ndarray, kind: str, length: int, rows: int, count: int, special, seed: int) -> list[dict]:
    """``count`` batches of ``rows`` random windows, as int64 tensors; a pure function of its arguments."""
    from data.objectives import span_corruption, span_corruption_lengths

    rng = np.random.default_rng(seed)
    mean_span = 3.0 if length <= 2048 else 8.0
    if kind == "lm":
        window = length + 1
    else:
        window, target_length = span_corruption_lengths(length, 0.15, mean_span)
    batches = []
    for _ in range(count):
        starts = rng.integers(0, len(tokens) - window, size=rows)
        windows = np.stack([tokens[s : s + window].astype(np.int64) for s in starts])
        if kind == "lm":
            batches.append({"input_ids": torch.from_numpy(windows[:, :-1]), "labels": torch.from_numpy(windows[:, 1:])})
            continue
        inputs = np.full((rows, length), special.pad_id, dtype=np.int64)
        targets = np.full((rows, target_length), IGNORE, dtype=np.int64)
        for row, window_tokens in enumerate(windows):
            source, target = span_corruption(window_tokens, special, rng, 0.15, mean_span)
            inputs[row, : min(len(source), length)] = source[:length]
            targets[row, : min(len(target), target_length)] = target[:target_length]
        decoder_inputs = np.where(targets == IGNORE, special.pad_id, targets)
        decoder_inputs = np.concatenate([np.full((rows, 1), special.bos_id), decoder_inputs[:, :-1]], axis=1)
        batches.append(
            {
                "input_ids": torch.from_numpy(inputs),
                "attention_mask": torch.from_numpy(inputs != special.pad_id),
                "decoder_input_ids": torch.from_numpy(decoder_inputs),
                "labels": torch.from_numpy(targets),
            }
        )
    return batches


# ----------------------------------------------------------------------------- training


def build(kind: str, variant: str, vocab_size: int, seed: int, nb_features: int | None = None):
    from performer.config import preset
    from performer.models import PerformerLM, PerformerSeq2Seq

    config = preset(
        "tiny",
        vocab_size=vocab_size,
        dropout=0.0,
        attention_type="softmax" if variant == "softmax" else "favor",
        projection_seed=seed,
        feature_redraw_interval=None,
        auto_check_redraw=False,
        max_positions=8192,
        nb_features=nb_features,
        feature_map="favor++" if variant.startswith("favor++") else "favor+",
    )
    torch.manual_seed(seed)  # the same initial weights for every variant (names do not depend on the kernel)
    return (PerformerSeq2Seq if kind == "seq2seq" else PerformerLM)(config)


def train(kind, variant, batches, heldout, args, vocab_size, device, seed) -> dict:
    from launcher.schedule import learning_rate, set_learning_rate
    from performer.optim import weight_decay_groups
    from performer.redraw import RedrawSchedule

    # "favor@512": the variant with M = 512 features per head (else --nb-features or the default).
    base_variant, _, features = variant.partition("@")
    nb_features = int(features) if features else args.nb_features
    model = build(kind, base_variant, vocab_size, seed, nb_features).to(device)
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.01), lr=args.lr, betas=(0.9, 0.98))
    autocast = dict(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")
    mode = redraw_mode(base_variant)
    redraws = RedrawSchedule(args.redraw_interval, mode) if mode else None

    def to_device(batch):
        return {key: value.to(device, non_blocking=True) for key, value in batch.items()}

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad(), torch.autocast(**autocast):
            losses = [model(**to_device(batch)).loss.float().item() for batch in heldout]
        model.train()
        return float(np.mean(losses))

    curve, train_losses = [{"step": 0, "heldout_loss": held_out_loss()}], []
    started = time.perf_counter()
    for step, batch in enumerate(batches, start=1):
        if redraws is not None:
            model.set_projections_for_step_(seed, step, redraws)
        set_learning_rate(optimizer, learning_rate(step, args.lr, args.warmup, len(batches), 0.1))
        with torch.autocast(**autocast):
            loss = model(**to_device(batch)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_losses.append(loss.item())
        if step % args.eval_interval == 0 or step == len(batches):
            curve.append({"step": step, "heldout_loss": held_out_loss()})
    final = curve[-1]["heldout_loss"]
    return {
        "kind": kind,
        "variant": variant,
        "final_heldout_loss": final,
        "curve": curve,
        "train_loss_last_50": float(np.mean(train_losses[-50:])),
        "seconds": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------- reports


def summarise(records: list[dict]) -> dict:
    """Per kind, length and variant: the held-out loss gap to softmax trained on the same seed's
    batches and weights, its mean over the seeds ("... vs softmax") and, with several seeds, its
    smallest and largest ("... vs softmax, min" / "max")."""
    gaps: dict[str, list[float]] = {}
    for record in records:
        if record["variant"] == "softmax":
            continue
        softmax = next(
            (
                r
                for r in records
                if r["variant"] == "softmax"
                and (r["kind"], r["length"], r.get("seed")) == (record["kind"], record["length"], record.get("seed"))
            ),
            None,
        )
        if softmax:
            key = f"{record['kind']}@{record['length']} {record['variant']} vs softmax"
            gaps.setdefault(key, []).append(record["final_heldout_loss"] / softmax["final_heldout_loss"] - 1)
    summary = {}
    for key, values in gaps.items():
        summary[key] = float(np.mean(values))
        if len(values) > 1:
            summary[f"{key}, min"], summary[f"{key}, max"] = min(values), max(values)
    return summary


def redraw_mode(base_variant: str) -> str | None:
    """The RedrawSchedule mode of a variant (favor-redraw swaps, favor++-smooth moves smoothly), or None."""
    suffix = base_variant[base_variant.rfind("-") :] if "-" in base_variant else None
    return {"-redraw": "swap", "-smooth": "smooth"}.get(suffix)


def markdown(results: dict) -> str:
    settings = results["settings"]
    rows = []
    seeds = sorted({record.get("seed", settings.get("seed", 0)) for record in results["records"]})
    for record in results["records"]:
        if record.get("seed", seeds[0]) != seeds[0]:
            continue  # one row per configuration: the first seed's losses, the gap over every seed
        key = f"{record['kind']}@{record['length']} {record['variant']} vs softmax"
        gap = results["summary"].get(key)
        if gap is None:
            gap_text = "-"
        elif f"{key}, min" in results["summary"]:
            low, high = results["summary"][f"{key}, min"], results["summary"][f"{key}, max"]
            gap_text = f"{gap:+.1%} ({low:+.1%} to {high:+.1%})"
        else:
            gap_text = f"{gap:+.1%}"
        rows.append(
            [
                record["kind"],
                record["length"],
                record["variant"],
                f"{record['final_heldout_loss']:.3f}",
                f"{math.exp(record['final_heldout_loss']):.1f}",
                gap_text,
                f"{record['train_loss_last_50']:.3f}",
            ]
        )
    seeds_text = (
        f" Seeds {', '.join(map(str, seeds))}: losses of seed {seeds[0]}, gaps to softmax as the mean over the "
        "seeds (smallest to largest), each seed against softmax with its own batches and initial weights."
        if len(seeds) > 1
        else ""
    )
    # Name the default M and the redraw interval only where a variant of this file uses them.
    variants = {record["variant"] for record in results["records"]}
    redrawing = sorted({base for base in (variant.partition("@")[0] for variant in variants) if redraw_mode(base)})
    features_text = (
        f", M = {settings['nb_features']} features per head"
        if any(variant != "softmax" and "@" not in variant for variant in variants)
        else ""
    )
    redraw_text = f", redraw every {settings['redraw_interval']} steps ({', '.join(redrawing)})" if redrawing else ""
    return (
        f"`tiny` models (d_model 128, 4 heads, 2 + 2 layers; the LM 2 layers), {settings['steps_at_1024']} steps of "
        f"{settings['tokens_per_step']:,} tokens at length 1024 (the same tokens per step at 4096){features_text}, "
        f"AdamW lr {settings['lr']}{redraw_text}, {settings['device']}"
        f"{' (bf16 autocast)' if settings['device'] == 'cuda' else ' (fp32)'}; held-out loss on "
        f"{settings['heldout_batches']} fixed batches of the held-out split.{seeds_text} A variant named "
        "favor@M has M features per head."
        + ("" if settings.get("complete", True) else " **Incomplete: the run was stopped or is still going.**")
        + "\n\n"
        + common.table(
            ["model", "length", "attention", "held-out loss", "perplexity", "vs softmax", "train loss (last 50)"], rows
        )
    )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["kind"], r["length"]) for r in results["records"]})
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for axis, (kind, length) in zip(axes[0], panels):
        for record in results["records"]:
            if (record["kind"], record["length"]) == (kind, length):
                curve = record["curve"][1:]  # step 0 is the untrained model
                axis.plot([p["step"] for p in curve], [p["heldout_loss"] for p in curve], label=record["variant"])
        axis.set_title(f"{kind}, {length} tokens")
        axis.set_xlabel("step")
        axis.set_ylabel("held-out loss")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data")
    parser.add_argument("--packed", type=Path, help="a .npz written by --pack-only (skips reading the shards)")
    parser.add_argument("--pack-only", type=Path, metavar="NPZ", help="write the packed corpus there and stop")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument(
        "--steps", type=int, default=600, help="optimizer steps at length 1024 (fewer at 4096, same tokens)"
    )
    parser.add_argument("--tokens-per-step", type=int, default=16 * 1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--redraw-interval", type=int, default=100)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--heldout-batches", type=int, default=8)
    parser.add_argument("--seeds", default="0", help="comma-separated: every variant is trained once per seed")
    parser.add_argument("--nb-features", type=int, help="FAVOR+ features per head (default round(D ln D) = 111)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", help="results file stem (default: parity, or parity-m<M> with --nb-features M)")
    args = parser.parse_args(argv)
    args.name = args.name or ("parity" + (f"-m{args.nb_features}" if args.nb_features else ""))

    packed = dict(np.load(args.packed)) if args.packed else pack(args.data)
    if args.pack_only:
        np.savez_compressed(args.pack_only, **packed)
        print(
            f"packed {len(packed['train']):,} train and {len(packed['heldout']):,} held-out tokens "
            f"into {args.pack_only}"
        )
        return 0
    special = special_tokens(packed)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    settings = {
        "device": args.device,
        "steps_at_1024": args.steps,
        "tokens_per_step": args.tokens_per_step,
        "lr": args.lr,
        "redraw_interval": args.redraw_interval,
        "heldout_batches": args.heldout_batches,
        "seeds": seeds,
        "nb_features": args.nb_features or "round(D ln D) = 111",
        "corpus": corpus_fingerprint(packed),
    }
    machine = common.machine()  # taken once: the load average of the start, not of the last run

    def results_so_far(complete: bool) -> dict:
        return {
            "settings": {**settings, "complete": complete},
            "machine": machine,
            "records": records,
            "summary": summarise(records),
        }

    records = []
    for length in (int(n) for n in args.lengths.split(",")):
        rows = max(1, args.tokens_per_step // length)
        steps = args.steps * 1024 // length if length > 1024 else args.steps
        for kind in args.kinds.split(","):
            for seed in seeds:
                batches = make_batches(packed["train"], kind, length, rows, steps, special, seed=seed)
                heldout = make_batches(
                    packed["heldout"], kind, length, rows, args.heldout_batches, special, seed=seed + 1
                )
                for variant in args.variants.split(","):
                    record = train(kind, variant, batches, heldout, args, special.vocab_size, args.device, seed)
                    record.update(length=length, steps=steps, rows=rows, seed=seed)
                    print(json.dumps({k: v for k, v in record.items() if k != "curve"}), flush=True)
                    records.append(record)
                    # A run of hours keeps what it has measured if it is stopped: the files are
                    # rewritten after every variant, marked incomplete until the last one.
                    partial = results_so_far(complete=False)
                    common.write_results(args.name, partial, markdown(partial))
    results = results_so_far(complete=True)
    common.publish(args.name, results, markdown(results), plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
