"""Throughput of the data pipeline on the stdlib corpus, packed shards against version-1 shards.

    python benchmarks/data_stream.py [--data DIR] [--batches 300] [--repeats 5]

Without --data it runs `performer data prepare --source stdlib` (vocab 8000) into a temporary
directory first and times the tokenizer training and the shard writing. The training split is
also written in the version-1 layout (a tar member per document, `write_shards_v1`), and a
synthetic web-like corpus (~700 tokens per document, vocab 32000) in both layouts; for each,
the tar bytes per token. Then it measures the stream (T5 span corruption, 512 inputs / 114
targets, batch 32, one rank) on both layouts of the stdlib split with 0, 1 and 2 DataLoader
workers, and on both layouts of the web-like corpus without workers: tokens/s counted as raw
corpus tokens consumed (568 per row) and as encoder input tokens (512 per row), after the
first batch (startup is reported separately); each the median of --repeats runs, the layouts
alternating. Finally it times one training step of the `tiny` model on the same batches, so the
ratio says how far the stream outruns the model on this machine.

Writes benchmarks/results/data_stream.json and data_stream.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from data.shards import INDEX_FILES, Manifest, ShardConfig, verify_manifest, write_shards, write_shards_v1  # noqa: E402
from data.stream import ShardReader, StreamConfig, TokenStream  # noqa: E402
from data.tokenizer import SpecialTokens  # noqa: E402
from launcher.__main__ import main as performer  # noqa: E402


def prepare(out: Path) -> dict:
    """`performer data prepare` of the stdlib, timed in its two parts: the tokenizer (trained by
    `performer data tokenizer`, as prepare would) and the shards (prepare with that tokenizer)."""
    started = time.perf_counter()
    tokenizer = out.parent / "tokenizer-trained"
    assert performer(["data", "tokenizer", "--source", "stdlib", "--out", str(tokenizer)]) == 0
    tokenizer_seconds = time.perf_counter() - started
    assert performer(["data", "prepare", "--source", "stdlib", "--out", str(out), "--tokenizer", str(tokenizer)]) == 0
    total = time.perf_counter() - started
    info = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    return {
        "prepare_seconds": round(total, 1),
        "tokenizer_seconds": round(tokenizer_seconds, 1),
        "tokenizer_training_lines": info["trained_on"]["lines"],
    }


def shard_stats(split: Path) -> dict:
    manifest = Manifest.load(split)
    size = sum(s.bytes for s in manifest.shards)
    index = sum((split / name).stat().st_size for name, _, _ in INDEX_FILES.values()) if manifest.version > 1 else 0
    return {
        "version": manifest.version,
        "documents": manifest.documents,
        "tokens": manifest.tokens,
        "tokens_per_document": round(manifest.tokens / manifest.documents, 1),
        "shards": len(manifest.shards),
        "bytes": size,
        "bytes_per_token": round(size / manifest.tokens, 3),
        "payload_bytes_per_token": manifest.itemsize,
        "tar_over_token_bytes": round(size / (manifest.itemsize * manifest.tokens), 4),
        "index_bytes": index,
    }


def documents_of(split: Path):
    """The split's documents in order, read back through the stream's reader."""
    manifest = Manifest.load(split)
    indices, bad = verify_manifest(manifest)
    assert not bad, bad
    reader = ShardReader(manifest, indices)
    for position, index in sorted(indices.items()):
        for document in range(len(index.lengths)):
            yield reader.read(position, document)
    reader.close()


def write_v1_copy(split: Path, out: Path) -> Path:
    manifest = Manifest.load(split)
    write_shards_v1(
        documents_of(split),
        out,
        split=manifest.split,
        special=manifest.special,
        config=ShardConfig(**{k: v for k, v in manifest.writer.items() if k in ShardConfig.__dataclass_fields__}),
        tokenizer_fingerprint=manifest.tokenizer_fingerprint,
        source=manifest.source,
    )
    return out


def web_like(out: Path, documents: int = 20_000) -> dict[str, Path]:
    """Synthetic web-like documents (log-normal lengths, ~700 tokens on average, vocab 32000) in
    both layouts."""
    rng = np.random.default_rng(0)
    lengths = rng.lognormal(np.log(550), 0.7, size=documents).astype(np.int64) + 1
    special = SpecialTokens(vocab_size=32000, num_sentinels=100)
    docs = [rng.integers(10, 31000, size=n, dtype=np.int64) for n in lengths]
    paths = {"packed": out / "packed", "v1": out / "v1"}
    write_shards(docs, paths["packed"], split="train", special=special)
    write_shards_v1(docs, paths["v1"], split="train", special=special)
    return paths


def measure_stream(split: Path, workers: int, batches: int) -> dict:
    config = StreamConfig(manifest=str(split), num_workers=workers)
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


def median_run(runs: list[dict]) -> dict:
    """The run of median speed, with the median startup and every run's tokens/s."""
    ranked = sorted(runs, key=lambda r: r["raw_tokens_per_s"])
    middle = dict(ranked[len(ranked) // 2])
    middle["startup_seconds"] = round(statistics.median(r["startup_seconds"] for r in runs), 3)
    middle["raw_tokens_per_s_runs"] = [r["raw_tokens_per_s"] for r in runs]
    return middle


def measure_layouts(splits: dict[str, Path], workers: int, batches: int, repeats: int) -> dict[str, dict]:
    """Median of `repeats` runs per layout, the layouts alternating so that both see the same load."""
    runs: dict[str, list[dict]] = {layout: [] for layout in splits}
    for _ in range(repeats):
        for layout, split in splits.items():
            runs[layout].append(measure_stream(split, workers, batches))
    return {layout: {"layout": layout, **median_run(r)} for layout, r in runs.items()}


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


LAYOUTS = {"packed": "packed (v2)", "v1": "v1 (member per document)"}


def stream_rows(results: dict) -> list[dict]:
    """The stream table's rows: every layout measured, by workers (results files written before the
    packed layout hold only "stream")."""
    rows = [{"layout": "packed", **r} for r in results["stream"]] + [
        {"layout": "v1", **r} for r in results.get("stream_v1", [])
    ]
    return sorted(rows, key=lambda r: (r["workers"], r["layout"] != "packed"))


def stream_table(rows: list[dict], with_layout: bool) -> str:
    header = ["workers", "raw tokens/s", "input tokens/s", "batches/s", "startup (s)"]
    body = [
        [
            r["workers"],
            f"{r['raw_tokens_per_s'] / 1e6:.2f} M",
            f"{r['input_tokens_per_s'] / 1e6:.2f} M",
            r["batches_per_s"],
            r["startup_seconds"],
        ]
        for r in rows
    ]
    if with_layout:
        header = ["shards", *header]
        body = [[LAYOUTS[r["layout"]], *row] for r, row in zip(rows, body)]
    return common.table(header, body, align=("l" if with_layout else "") + "rrrrr")


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
    ]
    if "shards_v1" in results:
        corpora = [("stdlib", results["shards"], results["shards_v1"])]
        if "web_like" in results:
            web = results["web_like"]
            corpora.append(("web-like (synthetic)", web["shards"], web["shards_v1"]))
        lines += [
            "Tar bytes per token, and over the raw token bytes:",
            "",
            common.table(
                ["corpus", "documents", "tokens/document", "packed (v2)", "v1 (member per document)", "index (v2)"],
                [
                    [
                        name,
                        f"{packed['documents']:,}",
                        f"{packed['tokens_per_document']:,.0f}",
                        f"{packed['bytes_per_token']} ({packed['tar_over_token_bytes']:.3f}x)",
                        f"{v1['bytes_per_token']} ({v1['tar_over_token_bytes']:.3f}x)",
                        f"{packed['index_bytes'] / packed['tokens']:.4f} bytes/token",
                    ]
                    for name, packed, v1 in corpora
                ],
                align="lrrrrr",
            ).rstrip("\n"),
            "",
        ]
    lines += [
        "Stream: span corruption 512 inputs / 114 targets, batch 32, one rank.",
        "",
        stream_table(stream_rows(results), "stream_v1" in results).rstrip("\n"),
    ]
    if "web_like" in results:
        lines += [
            "",
            "On the web-like corpus, no workers:",
            "",
            stream_table(results["web_like"]["stream"], True).rstrip("\n"),
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
    parser.add_argument("--repeats", type=int, default=5, help="runs per setting and layout (the median is kept)")
    args = parser.parse_args()
    results: dict = {"machine": common.machine(), "settings": {"batches": args.batches, "repeats": args.repeats}}
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            results["prepare"] = prepare(data)
        splits = {"packed": data / "train", "v1": write_v1_copy(data / "train", Path(tmp) / "v1" / "train")}
        assert Manifest.load(splits["packed"]).version > 1, "--data holds version-1 shards: prepare them anew"
        web = web_like(Path(tmp) / "web")
        results["shards"], results["shards_v1"] = shard_stats(splits["packed"]), shard_stats(splits["v1"])
        measured = {workers: measure_layouts(splits, workers, args.batches, args.repeats) for workers in (0, 1, 2)}
        results["stream"] = [measured[w]["packed"] for w in (0, 1, 2)]
        results["stream_v1"] = [measured[w]["v1"] for w in (0, 1, 2)]
        results["web_like"] = {
            "shards": shard_stats(web["packed"]),
            "shards_v1": shard_stats(web["v1"]),
            "stream": list(measure_layouts(web, 0, args.batches, args.repeats).values()),
        }
        results["tiny_model"] = measure_tiny_model(data)
    common.publish("data_stream", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
