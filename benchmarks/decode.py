"""Per-token decoding latency against position: our cached FAVOR+ LM vs performer-pytorch's generate.

    python benchmarks/decode.py

Both models are decoder-only LMs of the `small` preset's shape (d_model 256, 4 heads of 64,
4 layers, M=256 random features), fp32, batch 1. At each position P the prompt (P tokens) is
consumed first, untimed; then new tokens are timed one at a time:
* ours: one cached step per token (running FAVOR+ state S, z per layer: constant cost);
* performer-pytorch 1.1: ``AutoregressiveWrapper.generate``, which has no cache and runs the
  whole sequence through the model for every new token.
Each (model, position) runs in its own process. A configuration predicted (from the previous
position) to take longer than --budget-s is skipped and recorded as such.

Writes benchmarks/results/decode.json and decode.md.
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

VOCAB = 8192
SHAPE = dict(d_model=256, num_heads=4, num_decoder_layers=4, d_ff=4)
NB_FEATURES = 256


def ours(position: int, tokens: int, repeats: int) -> dict:
    from performer.config import ModelConfig
    from performer.models import PerformerLM

    config = ModelConfig(vocab_size=VOCAB, nb_features=NB_FEATURES, projection_seed=0, **SHAPE)
    model = PerformerLM(config).eval()
    prompt = torch.randint(5, VOCAB, (1, position))
    with torch.no_grad():
        cache = model.decoder.new_cache()
        model.decoder(model.embedding(prompt), cache=cache)  # prefill, untimed
        next_token = prompt[:, -1:]

        def one_token():
            nonlocal next_token
            hidden = model.decoder(model.embedding(next_token, offset=cache.length), cache=cache)
            next_token = model.vocabulary_logits(hidden[:, -1]).argmax(dim=-1, keepdim=True)

        timing = common.median_seconds(lambda: [one_token() for _ in range(tokens)], repeats, warmup=1)
    return {"per_token_s": timing["median_s"] / tokens, "tokens_timed": tokens * repeats}


def performer_pytorch(position: int, tokens: int, repeats: int) -> dict:
    from performer_pytorch import PerformerLM
    from performer_pytorch.autoregressive_wrapper import AutoregressiveWrapper

    model = PerformerLM(
        num_tokens=VOCAB,
        max_seq_len=position + tokens * (repeats + 1),
        dim=SHAPE["d_model"],
        depth=SHAPE["num_decoder_layers"],
        heads=SHAPE["num_heads"],
        dim_head=64,
        causal=True,
        nb_features=NB_FEATURES,
        ff_mult=SHAPE["d_ff"],
    ).eval()
    wrapper = AutoregressiveWrapper(model)
    prompt = torch.randint(5, VOCAB, (1, position))
    # Its generate recomputes the whole sequence per token, so one timed token per repeat suffices.
    timing = common.median_seconds(lambda: wrapper.generate(prompt, 1), repeats, warmup=0)
    return {"per_token_s": timing["median_s"], "tokens_timed": repeats}


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run = ours if args.model == "ours" else performer_pytorch
    record = {"model": args.model, "position": args.position, **run(args.position, args.tokens, args.repeats)}
    record["memory_bytes"] = common.peak_resident_bytes()
    return record


def summarise(records: list[dict]) -> dict:
    by = {(r["model"], r["position"]): r["per_token_s"] for r in records if "per_token_s" in r}
    summary = {}
    positions = sorted({position for _, position in by})
    if ("ours", positions[0]) in by:
        for position in positions[1:]:
            if ("ours", position) in by:
                summary[f"ours_latency_ratio@{position}/{positions[0]}"] = (
                    by["ours", position] / by["ours", positions[0]]
                )
    for position in positions:
        if ("ours", position) in by and ("performer-pytorch", position) in by:
            summary[f"speedup_vs_performer-pytorch@{position}"] = (
                by["performer-pytorch", position] / by["ours", position]
            )
    return summary


def markdown(results: dict) -> str:
    records = results["records"]
    positions = sorted({r["position"] for r in records})
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        cells = []
        for position in positions:
            record = next((r for r in records if r["model"] == model and r["position"] == position), None)
            if record is None:
                cells.append("")
            elif "per_token_s" in record:
                cells.append(f"{record['per_token_s'] * 1e3:.1f} ms")
            else:
                cells.append(record.get("skipped") or record.get("error"))
        rows.append([model, *cells])
    lines = [
        "Per-token latency (batch 1, fp32, d_model 256, 4 layers, 4 heads of 64, M=256; "
        f"{results['settings']['threads']} threads):\n",
        common.table(["model", *(f"position {p}" for p in positions)], rows),
        "",
    ]
    lines += [f"- {key}: {value:.3g}" for key, value in results["summary"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--position", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--positions", default="256,4096,16384")
    parser.add_argument("--models", default="ours,performer-pytorch")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per timed repeat (ours)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--budget-s", type=float, default=240.0)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return 0
    script = Path(__file__).resolve()
    records = []
    for model in args.models.split(","):
        previous = None
        for position in (int(p) for p in args.positions.split(",")):
            if previous and model != "ours":
                # performer-pytorch's per-token cost grows at least linearly with the position.
                predicted = previous["per_token_s"] * position / previous["position"] * (args.repeats + 1)
                if predicted > args.budget_s:
                    records.append({"model": model, "position": position, "skipped": f"predicted {predicted:.0f} s"})
                    continue
            arguments = [
                "--model",
                model,
                "--position",
                str(position),
                "--tokens",
                str(args.tokens),
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ]
            record = common.run_isolated(script, arguments, timeout_s=args.budget_s * 3)
            record.update(model=model, position=position)
            print(json.dumps(record), flush=True)
            records.append(record)
            previous = record if "per_token_s" in record else previous
    results = {
        "settings": {"threads": args.threads, "tokens": args.tokens, "repeats": args.repeats},
        "machine": common.machine(),
        "records": records,
        "summary": summarise(records),
    }
    common.publish("decode", results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
