"""Throughput of the data pipeline on the stdlib corpus.

    python benchmarks/data_stream.py [--data DIR] [--batches 300]

Without --data it runs `performer data prepare --source stdlib` (vocab 8000) into a temporary
directory first and times the tokenizer training and the shard writing. Then it measures the
stream (T5 span corruption, 512 inputs / 114 targets, batch 32, one rank) with 0, 1 and 2
DataLoader workers: tokens/s counted as raw corpus tokens consumed (568 per row) and as encoder
input tokens (512 per row), after the first batch (startup is reported separately). Finally it
times one training step of the `tiny` model on the same batches, so the ratio says how far the
stream outruns the model on this machine.

Writes benchmarks/results/data_stream.json and data_stream.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from data.shards import Manifest  # noqa: E402
from data.stream import StreamConfig, TokenStream  # noqa: E402
from launcher.__main__ import main as performer  # noqa: E402


def prepare(out: Path) -> dict:
    started = time.perf_counter()
    assert performer(["data", "prepare", "--source", "stdlib", "--out", str(out)]) == 0
    total = time.perf_counter() - started
    info = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    return {
        "prepare_seconds": round(total, 1),
        "tokenizer_seconds": info["seconds"]["total"],
        "tokenizer_training_lines": info["trained_on"]["lines"],
    }


def shard_stats(data: Path) -> dict:
    manifest = Manifest.load(data / "train")
    size = sum(s.bytes for s in manifest.shards)
    return {
        "documents": manifest.samples,
        "tokens": manifest.tokens,
        "shards": len(manifest.shards),
        "bytes": size,
        "bytes_per_token": round(size / manifest.tokens, 3),
        "payload_bytes_per_token": 2 if manifest.dtype == "uint16" else 4,
    }


def measure_stream(data: Path, workers: int, batches: int) -> dict:
    config = StreamConfig(manifest=str(data / "train"), num_workers=workers)
    started = time.perf_counter()
    stream = TokenStream(config)
    iterator = iter(stream)
    next(iterator)
    startup = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - started
    rows = batches * config.batch_size
    return {
        "workers": workers,
        "batches": batches,
        "seconds": round(seconds, 3),
        "startup_seconds": round(startup, 3),
        "raw_tokens_per_s": round(rows * config.raw_length / seconds),
        "input_tokens_per_s": round(rows * config.input_length / seconds),
        "batches_per_s": round(batches / seconds, 1),
        "steps_per_epoch": stream.steps_per_epoch,
    }


def measure_tiny_model(data: Path, steps: int = 3) -> dict:
    """Seconds per training step (forward, backward, AdamW) of the tiny preset on stream batches."""
    try:
        from performer.config import preset
        from performer.models import PerformerSeq2Seq
    except ImportError as error:  # the model package is developed alongside; report, do not fail
        return {"available": False, "reason": str(error)}
    stream = TokenStream(StreamConfig(manifest=str(data / "train")))
    model = PerformerSeq2Seq(preset("tiny", vocab_size=Manifest.load(data / "train").special.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    iterator = iter(stream)
    times = []
    for step in range(steps + 1):
        batch = next(iterator)
        started = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - started)
    seconds = sum(times) / len(times)
    return {
        "available": True,
        "seconds_per_step": round(seconds, 3),
        "raw_tokens_per_s": round(32 * stream.config.raw_length / seconds),
        "torch_threads": torch.get_num_threads(),
    }


def markdown(results: dict) -> str:
    s, machine = results["shards"], results["machine"]
    lines = [
        "# Data stream benchmark",
        "",
        # "cpus": the name results files written before common.machine() was used here give the count.
        f"Machine: {machine.get('cpu_count', machine.get('cpus'))} CPUs, Python {machine['python']}, "
        f"torch {machine['torch']}. Stdlib corpus, unigram vocab 8000.",
        "",
    ]
    if "prepare" in results:
        p = results["prepare"]
        lines += [
            f"- tokenizer training: {p['tokenizer_seconds']} s on {p['tokenizer_training_lines']:,} "
            f"sampled lines; whole `prepare`: {p['prepare_seconds']} s",
            "",
        ]
    lines += [
        f"- train shards: {s['documents']} documents, {s['tokens']:,} tokens, {s['shards']} shard(s), "
        f"{s['bytes']:,} bytes = **{s['bytes_per_token']} bytes/token** "
        f"({s['payload_bytes_per_token']} of token ids, the rest tar headers and padding)",
        "",
        "Stream: span corruption 512 inputs / 114 targets, batch 32, one rank.",
        "",
        common.table(
            ["workers", "raw tokens/s", "input tokens/s", "batches/s", "startup (s)"],
            [
                [
                    r["workers"],
                    f"{r['raw_tokens_per_s'] / 1e6:.2f} M",
                    f"{r['input_tokens_per_s'] / 1e6:.2f} M",
                    r["batches_per_s"],
                    r["startup_seconds"],
                ]
                for r in results["stream"]
            ],
            align="rrrrr",
        ).rstrip("\n"),
    ]
    model = results["tiny_model"]
    if model.get("available"):
        best = max(r["raw_tokens_per_s"] for r in results["stream"][:1])
        lines += [
            "",
            f"Tiny model training step on the same batches: {model['seconds_per_step']} s "
            f"({model['raw_tokens_per_s'] / 1e3:.1f} k raw tokens/s); the stream without workers "
            f"is **{best / model['raw_tokens_per_s']:.0f}x** faster.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="output of `performer data prepare` (built if absent)")
    parser.add_argument("--batches", type=int, default=300, help="timed batches per worker setting")
    args = parser.parse_args()
    results: dict = {"machine": common.machine()}
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp)
            results["prepare"] = prepare(data)
        results["shards"] = shard_stats(data)
        results["stream"] = [measure_stream(data, workers, args.batches) for workers in (0, 1, 2)]
        results["tiny_model"] = measure_tiny_model(data)
    common.publish("data_stream", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
