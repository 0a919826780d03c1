"""Why the Triton kernels multiply bf16 operands on tensor cores and run float16 inputs in float32:
the range of FAVOR+'s key features.

    make pretrain && python benchmarks/fp16_features.py --run runs/tiny --data runs/data

The kernels cast every feature tile to the operand dtype before its product. A query's features
carry their own max (one constant per query cancels in the quotient), but a key's features depend
on that key alone: that is what makes causality exact and padding invisible, and it leaves them
no shift but a fixed headroom (exp(30), ``feature_maps.KEY_FEATURE_HEADROOM``). Their range is
then what the data gives them. This measures it on every attention call of the exported model
that ``make pretrain`` trains, over held-out batches (the trainer's own evaluation stream), and
on Gaussian q, k, v at head dims 32 / 64 / 128 (what the kernels' benchmarks feed them):

- the real keys' features (float32, as the kernels compute them): smallest and largest;
- the share that each 16-bit dtype turns into inf (float16: above 65504), flushes to zero
  (float16: below 2^-25) or keeps below its normal range, with fewer than its mantissa's bits
  (float16: below 2^-14);
- the attention output computed from features and values rounded to that dtype against the
  float32 ones (both summed in float64, so that only this rounding differs): relative error per
  output row (median, 99th percentile) and the share of rows that come out non-finite or lose
  every key (a normaliser below the op's floor). The kernels also round the causal states and
  the in-chunk scores to the operand dtype, and centre the values first: the errors here are a
  lower bound for them, and float16 states could overflow too;
- float16 once more with the best global shift a call could have: its key features scaled so
  that their largest is 2^15 before the rounding (a data-dependent constant, which would cost
  exact causality: later keys would move it; shown to say whether any shift would be enough).

Writes benchmarks/results/<name>.json and <name>.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

# name -> (dtype, whether the keys' features are shifted so that their largest is SHIFTED_MAX first)
VARIANTS = {
    "float16": (torch.float16, False),
    "float16, best shift": (torch.float16, True),
    "bfloat16": (torch.bfloat16, False),
}
SHIFTED_MAX = 2.0**15


def feature_ranges(features: torch.Tensor, dtype: torch.dtype) -> dict:
    """Shares of float32 ``features`` (real keys only, any shape) that ``dtype`` cannot hold as they are."""
    info = torch.finfo(dtype)
    rounded = features.to(dtype)
    total = features.numel()
    return {
        "overflow": float((rounded.isinf()).sum()) / total,
        "flushed": float(((rounded == 0) & (features > 0)).sum()) / total,
        "subnormal": float(((features < info.smallest_normal) & (rounded != 0)).sum()) / total,
    }


def attention_from_features(phi_q, phi_k, v, key_valid, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, normaliser) in float64 from features (B, H, Lq, M) / (B, H, Lk, M), v (B, H, Lk, D)
    and key_valid (B, Lk) bool: the explicit kernel matrix, as the naive twins write it."""
    scores = phi_q.double() @ phi_k.double().transpose(-2, -1)  # (B, H, Lq, Lk)
    scores = scores.masked_fill(~key_valid[:, None, None, :], 0.0)
    if causal:
        scores = scores.tril()
    normaliser = scores.sum(-1)
    return (scores @ v.double()) / normaliser[..., None], normaliser


def measure_call(q, k, v, projection, key_padding_mask, causal, feature_a) -> dict:
    """One attention call's key feature range and the output error of each 16-bit variant."""
    from performer.attention.favor import DENOMINATOR_FLOOR
    from performer.feature_maps import favor_features

    batch, _, key_length, _ = k.shape
    key_valid = (
        torch.ones(batch, key_length, dtype=torch.bool, device=k.device)
        if key_padding_mask is None
        else key_padding_mask.expand(batch, key_length).bool()
    )
    phi_q = favor_features(q, projection, True, feature_a)
    phi_k = favor_features(k, projection, False, feature_a)
    real = phi_k.permute(0, 2, 1, 3)[key_valid]  # (real keys, H, M)
    reference, normaliser = attention_from_features(phi_q, phi_k, v.float(), key_valid, causal)
    rows = normaliser >= DENOMINATOR_FLOOR  # queries the op gives an output in float32
    positive = real[real > 0]
    record = {
        "head_dim": q.shape[-1],
        "nb_features": projection.shape[0],
        "causal": causal,
        "keys": int(real.shape[0]),
        "feature_min": float(positive.min()) if positive.numel() else None,
        "feature_max": float(real.max()),
    }
    for name, (dtype, shifted) in VARIANTS.items():
        # The output is the same for any constant times every key's features, in exact arithmetic.
        scale = SHIFTED_MAX / real.max() if shifted and real.max() > 0 else 1.0
        out, rounded_normaliser = attention_from_features(
            phi_q.to(dtype), (phi_k * scale).to(dtype), v.to(dtype), key_valid, causal
        )
        error = (out - reference).norm(dim=-1) / reference.norm(dim=-1).clamp(min=1e-30)
        finite = torch.isfinite(out).all(-1) & (rounded_normaliser > 0)
        kept = error[rows & finite]
        record[name] = {
            **feature_ranges(real * scale, dtype),
            "rows_lost": float((rows & ~finite).sum()) / max(1, int(rows.sum())),
            "error_median": float(kept.median()) if kept.numel() else None,
            "error_p99": float(kept.quantile(0.99)) if kept.numel() else None,
        }
    return record


def trained_calls(run: Path, data: Path, batches: int) -> list[tuple]:
    """(q, k, v, projection, key_padding_mask, causal, feature_a) of every FAVOR attention call the
    run's export makes on its first held-out batches."""
    from benchmarks.main_job import heldout_loss
    from performer import from_pretrained
    from performer.attention import module

    run_config = json.loads(
        (run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "COMPLETE").read_text()
    )["run_config"]
    model = from_pretrained(run / "export")
    calls = []
    attend = module.favor_attention

    def capture(q, k, v, projection, key_padding_mask, causal, chunk_size, feature_a):
        calls.append((q.detach(), k.detach(), v.detach(), projection, key_padding_mask, causal, feature_a))
        return attend(q, k, v, projection, key_padding_mask, causal, chunk_size, feature_a)

    module.favor_attention = capture
    try:
        length, rows = run_config["data"]["input_length"], run_config["train"]["micro_batch_size"]
        heldout_loss(model, data / "heldout", length, rows, batches)
    finally:
        module.favor_attention = attend
    return calls


def gaussian_call(head_dim: int, length: int, nb_features: int, feature_map: str, seed: int = 0) -> tuple:
    from performer.feature_maps import favorpp_default_a, gaussian_orthogonal_projection

    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 8, length, head_dim, generator=generator) for _ in range(3))
    projection = gaussian_orthogonal_projection(nb_features, head_dim, seed=seed)
    a = favorpp_default_a(head_dim) if feature_map == "favor++" else None
    return q, k, v, projection, None, True, a


def summarise(label: str, records: list[dict]) -> dict:
    """One row of the table: the calls of one source pooled (shares weighted by keys, errors worst-case)."""
    keys = sum(record["keys"] for record in records)
    smallest = [record["feature_min"] for record in records if record["feature_min"] is not None]
    row = {
        "source": label,
        "calls": len(records),
        "head_dim": "/".join(str(d) for d in sorted({record["head_dim"] for record in records})),
        "feature_min": min(smallest) if smallest else None,
        "feature_max": max(record["feature_max"] for record in records),
    }
    # Orders of magnitude between the smallest and the largest key feature (None: all flushed in float32).
    row["decades"] = math.log10(row["feature_max"] / row["feature_min"]) if smallest else None
    for name in VARIANTS:
        pooled = {
            share: sum(record[name][share] * record["keys"] for record in records) / keys
            for share in ("overflow", "flushed", "subnormal")
        }
        lost = max(record[name]["rows_lost"] for record in records)
        medians = [record[name]["error_median"] for record in records if record[name]["error_median"] is not None]
        tails = [record[name]["error_p99"] for record in records if record[name]["error_p99"] is not None]
        row[name] = {
            **pooled,
            "rows_lost_max": lost,
            "error_median_max": max(medians) if medians else None,
            "error_p99_max": max(tails) if tails else None,
        }
    return row


def table(results: dict) -> str:
    """The rows as a markdown table (also the README's)."""

    def share(value):
        return "0" if value == 0 else f"{value:.2%}" if value >= 1e-4 else f"{value:.1e}"

    def error(value):
        return "n/a" if value is None else f"{value:.1e}"

    header = ["source", "D", "key features (float32)"]
    for name in VARIANTS:
        header += [f"{name}: inf / zero / subnormal", f"{name}: rows lost, error median / p99"]
    rows = []
    for row in results["rows"]:
        cells = [
            row["source"],
            row["head_dim"],
            "all flushed to zero"
            if row["decades"] is None
            else f"{row['feature_min']:.1e} .. {row['feature_max']:.1e} ({row['decades']:.0f} decades)",
        ]
        for name in VARIANTS:
            stats = row[name]
            cells.append(" / ".join(share(stats[key]) for key in ("overflow", "flushed", "subnormal")))
            cells.append(
                f"{share(stats['rows_lost_max'])}, {error(stats['error_median_max'])} / {error(stats['error_p99_max'])}"
            )
        rows.append(cells)
    return common.table(header, rows)


def markdown(results: dict) -> str:
    machine = results["machine"]
    return (
        "Key features of FAVOR+ attention calls and what 16-bit operands make of them: shares of the "
        "real keys' features that overflow, flush to zero or lose precision (subnormal); output rows "
        "lost (non-finite or no key left) and the relative error of the rest, worst call of each "
        "source. float16 spans 12 decades (6e-8 .. 65504, subnormals included), bfloat16 78.\n\n"
        + table(results)
        + f"\n\nMachine: {machine['cpu']}, torch {machine['torch']}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "tiny", help="a run with an export (make pretrain)")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data", help="its prepared corpus")
    parser.add_argument("--batches", type=int, default=2, help="held-out batches")
    parser.add_argument("--head-dims", default="32,64,128", help="Gaussian inputs at these head dims")
    parser.add_argument("--length", type=int, default=1024, help="Gaussian inputs: tokens")
    parser.add_argument("--name", default="fp16_features")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    rows = []
    if (args.run / "export").exists():
        config = json.loads((args.run / "export" / "config.json").read_text())
        records = [measure_call(*call) for call in trained_calls(args.run, args.data, args.batches)]
        model = config["model"]
        label = f"{args.run.name} export ({model['feature_map']}, M={model['nb_features']}), held-out"
        if records:
            rows.append(summarise(label, records))
        else:
            print(f"{args.run}'s export makes no FAVOR attention call (softmax attention?): Gaussian inputs only")
    else:
        print(f"no export at {args.run / 'export'} (run `make pretrain` first): Gaussian inputs only")
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for feature_map in ("favor+", "favor++"):
            record = measure_call(*gaussian_call(head_dim, args.length, 256, feature_map))
            rows.append(summarise(f"Gaussian q, k, v ({feature_map}, M=256)", [record]))
    results = {
        "settings": {"run": str(args.run.name), "batches": args.batches, "length": args.length},
        "machine": common.machine(),
        "rows": rows,
    }
    common.publish(args.name, results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
