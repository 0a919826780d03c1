"""One training step (forward, backward, AdamW) of a `small`-shaped encoder-decoder, tokens/s.

    python benchmarks/model_step.py
    python benchmarks/model_step.py --device cuda --dtype bf16 --preset medium --lengths 4096,16384,65536

Models, all with the `small` preset's shape (d_model 256, 4 heads of 64, 4 + 4 layers, feed-forward
4 x d_model) and M=256 random features, batch 1, encoder length L, decoder length L/4 (the
span-corruption shape: targets are about a quarter of the inputs; --decoder-fraction 1 gives
the decoder as many tokens as the encoder):
* ours:               PerformerSeq2Seq, FAVOR+ (bidirectional encoder, causal decoder, cross);
* ours-torch:         ours with FAVOR+ in torch ops on CUDA too (the op before the Triton kernels);
* ours-softmax:       the same model with exact softmax attention (SDPA);
* performer-pytorch:  performer-pytorch 1.1 PerformerEncDec of the same shape (GELU feed-forward,
                      untied embeddings), with nearly twice our parameters: 17.9M against 9.5M at
                      `small`, 13.7M against 7.4M outside embeddings (every record has both counts).
tokens/s counts encoder + decoder tokens. On CUDA the report adds MFU: the trainer's count
(`performer.models.training_flops`: 6 x the parameters each token passes through, attention's own
products excluded, for softmax too) over the bf16 dense matmul rate measured in the same run. Each
(model, length) runs in its own process.

Writes benchmarks/results/<name>.json and <name>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

VOCAB = 8192
NB_FEATURES = 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ours(preset: str, attention: str, device: str):
    from performer.config import preset as model_preset
    from performer.models import PerformerSeq2Seq

    config = model_preset(
        preset,
        vocab_size=VOCAB,
        nb_features=NB_FEATURES,
        attention_type=attention,
        projection_seed=0,
        feature_redraw_interval=None,
        max_positions=1 << 17,
    )
    model = PerformerSeq2Seq(config).to(device)

    def loss(inputs, targets):
        decoder_inputs = torch.cat([torch.full_like(targets[:, :1], 3), targets[:, :-1]], dim=1)
        return model(input_ids=inputs, decoder_input_ids=decoder_inputs, labels=targets).loss

    layers = config.num_encoder_layers + config.num_decoder_layers
    return model, loss, dict(d_model=config.d_model, heads=config.num_heads, layers=layers)


def _performer_pytorch(preset: str, length: int, decoder_length: int, device: str):
    from performer_pytorch import PerformerEncDec

    from performer.config import PRESETS

    shape = PRESETS[preset]
    model = PerformerEncDec(
        dim=shape["d_model"],
        enc_num_tokens=VOCAB,
        enc_depth=shape["num_encoder_layers"],
        enc_heads=shape["num_heads"],
        enc_max_seq_len=length,
        dec_num_tokens=VOCAB,
        dec_depth=shape["num_decoder_layers"],
        dec_heads=shape["num_heads"],
        dec_max_seq_len=decoder_length + 1,
        nb_features=NB_FEATURES,
        ff_mult=shape["d_ff"],
        tie_token_embeds=False,
    ).to(device)

    def loss(inputs, targets):
        # Its wrapper shifts the targets itself: the decoder sees targets[:-1] and predicts targets[1:].
        return model(inputs, torch.cat([torch.full_like(targets[:, :1], 3), targets], dim=1))

    return model, loss, dict(d_model=shape["d_model"], heads=shape["num_heads"])


def _decoder_length(args) -> int:
    return max(1, int(args.length * args.decoder_fraction))


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = args.device, DTYPES[args.dtype]
    if args.model == "performer-pytorch":
        model, loss_fn, shape = _performer_pytorch(args.preset, args.length, _decoder_length(args), device)
    elif args.model == "ours-torch":
        from performer.attention.triton import KERNEL_ENV

        os.environ[KERNEL_ENV] = "torch"  # this worker process only
        model, loss_fn, shape = _ours(args.preset, "favor", device)
    else:
        model, loss_fn, shape = _ours(args.preset, "softmax" if args.model == "ours-softmax" else "favor", device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = torch.randint(5, VOCAB, (1, args.length), device=device)
    targets = torch.randint(5, VOCAB, (1, _decoder_length(args)), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(inputs, targets)
        loss.backward()
        optimizer.step()

    before = common.resident_bytes() if device == "cpu" else torch.cuda.memory_allocated()
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    timing = common.median_seconds(step, args.repeats, device, warmup=1)
    peak = common.peak_resident_bytes() if device == "cpu" else torch.cuda.max_memory_allocated()
    tokens = args.length + _decoder_length(args)
    parameters = sum(p.numel() for p in model.parameters())
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    record = {
        "model": args.model,
        "length": args.length,
        **timing,
        "tokens_per_s": tokens / timing["median_s"],
        "parameters": parameters,
        "non_embedding_parameters": parameters - embeddings,
        "memory_bytes": peak - before,
    }
    if args.model != "performer-pytorch":  # MFU is ours alone (its modules differ; it never runs on CUDA here)
        from performer.models import training_flops

        record["model_flops_per_step"] = training_flops(model, args.length, _decoder_length(args))
    return record


def summarise(records: list[dict]) -> dict:
    rate = {(r["model"], r["length"]): r["tokens_per_s"] for r in records if "tokens_per_s" in r}
    summary = {}
    for length in sorted({length for _, length in rate}):
        if ("ours", length) not in rate:
            continue
        for baseline in ("ours-softmax", "performer-pytorch", "ours-torch"):
            if (baseline, length) in rate:
                summary[f"tokens_per_s_ratio_vs_{baseline}@{length}"] = rate["ours", length] / rate[baseline, length]
    return summary


def markdown(results: dict) -> str:
    settings, records = results["settings"], results["records"]
    lengths = sorted({r["length"] for r in records})
    gemm = results.get("gemm_flop_rate")
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        cells = []
        for length in lengths:
            record = next((r for r in records if r["model"] == model and r["length"] == length), None)
            if record is None or "tokens_per_s" not in record:
                cells.append("" if record is None else record.get("error", ""))
                continue
            cell = f"{record['tokens_per_s']:,.0f} tok/s ({common.seconds(record['median_s'])}/step)"
            if gemm and "model_flops_per_step" in record:
                cell += f", MFU {record['model_flops_per_step'] / record['median_s'] / gemm:.0%}"
            cells.append(cell)
        parameters = next((r["parameters"] for r in records if r["model"] == model and "parameters" in r), None)
        rows.append([model, f"{parameters / 1e6:.1f}M" if parameters else "-", *cells])
    lines = [
        f"Training step (forward, backward, AdamW), `{settings['preset']}` shape, M={NB_FEATURES}, batch 1, encoder "
        f"L / decoder {settings['decoder_fraction']:g} L tokens, {settings['dtype']} on {settings['device']} "
        f"({settings['threads']} threads), median of "
        f"{settings['repeats']}:\n",
        common.table(["model", "parameters", *(f"L={n}" for n in lengths)], rows),
        "",
    ]
    lines += [f"- {key}: {value:.3g}" for key, value in results["summary"].items()]
    if gemm:
        lines.append(
            f"- MFU: 6 x the parameters each token passes through (encoder tokens the encoder and the "
            f"cross-attention keys and values, decoder tokens the rest and the vocabulary projection; "
            f"attention's own products not counted) over the measured dense {settings['dtype']} matmul rate, "
            f"{gemm / 1e12:,.1f} TFLOP/s"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--models", default="ours,ours-softmax,performer-pytorch")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--decoder-fraction", type=float, default=0.25, help="decoder tokens per encoder token")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=600.0)
    parser.add_argument("--name", default="model_step")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return 0
    script = Path(__file__).resolve()
    shared = [
        "--preset",
        args.preset,
        "--decoder-fraction",
        str(args.decoder_fraction),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
    ]
    records = []
    for model in args.models.split(","):
        for length in (int(n) for n in args.lengths.split(",")):
            record = common.run_isolated(script, [*shared, "--model", model, "--length", str(length)], args.budget_s)
            record.update(model=model, length=length)
            print(json.dumps(record), flush=True)
            records.append(record)
    settings = {
        key: getattr(args, key) for key in ("preset", "device", "dtype", "threads", "repeats", "decoder_fraction")
    }
    results = {"settings": settings, "machine": common.machine(), "records": records, "summary": summarise(records)}
    if args.device != "cpu":
        results["gemm_flop_rate"] = common.gemm_rate(args.device, DTYPES[args.dtype])
    common.publish(args.name, results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
