"""How fast `performer data prepare` turns a corpus into shards, against the prepare it replaced.

    python benchmarks/data_prepare.py [--size-mb 1024] [--work runs/bench-prepare]

A synthetic web-like corpus (Zipf-distributed pseudo-words, ~3.9 kB per document) of --size-mb
megabytes of text is written once, as the same documents three times: Pile-shaped `.jsonl.zst`
files, FineWeb-shaped Parquet files (row groups of 2,000 rows) and plain JSON lines. A tokenizer
(--vocab, default 32000) is trained on prepare's seeded sample and then given to every timed run, so each
time is the reading, tokenising and shard-writing pass:

* `performer data prepare --tokenizer T --workers 1` and `--workers 2` on the zst files and on the
  Parquet files, each the median of --repeats (3) fresh runs: MB of text per second per process,
  and 2 workers against 1 (same run, same machine);
* the prepare it replaced, on the plain JSON lines: `performer data tokenizer` (a full pass to
  sample lines) then `performer data shards` once per split (each a full pass, one process
  reading, a pool of tokenizer processes), timed whole.

Writes benchmarks/results/data_prepare.json and data_prepare.md.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from data.corpus import CorpusConfig, plan  # noqa: E402
from data.prepare import PrepareSettings, sample_texts, unit_bytes  # noqa: E402
from data.shards import Manifest, ShardConfig  # noqa: E402
from data.tokenizer import TokenizerConfig, train_tokenizer  # noqa: E402
from launcher.__main__ import main as performer  # noqa: E402

FILES = 32
ROW_GROUP = 2000


def pseudo_words(count: int, rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = 1.0 / np.arange(1, len(letters) + 1)
    lengths = rng.integers(2, 11, size=count)
    return np.array(["".join(rng.choice(letters, size=n, p=weights / weights.sum())) for n in lengths])


def documents(total_bytes: int, seed: int = 0):
    """Web-like documents (a few paragraphs of Zipf-distributed words) until `total_bytes` of text."""
    rng = np.random.default_rng(seed)
    words = pseudo_words(50_000, rng)
    zipf = np.cumsum(1.0 / np.arange(1, len(words) + 1) ** 1.1)
    zipf /= zipf[-1]
    written = 0
    while written < total_bytes:
        count = int(rng.integers(300, 1100))
        chosen = words[np.minimum(np.searchsorted(zipf, rng.random(count)), len(words) - 1)]
        cuts = np.sort(rng.choice(np.arange(20, count), size=3, replace=False))
        paragraphs = [" ".join(part).capitalize() + "." for part in np.split(chosen, cuts)]
        text = "\n\n".join(paragraphs)
        written += len(text.encode())
        yield text


def write_corpus(work: Path, size_mb: int) -> dict:
    """The three layouts of one corpus under `work` (kept between runs of the same size)."""
    marker = work / "corpus.json"
    if marker.is_file() and json.loads(marker.read_text())["size_mb"] == size_mb:
        return json.loads(marker.read_text())
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    shutil.rmtree(work, ignore_errors=True)
    for name in ("zst", "parquet", "jsonl"):
        (work / name).mkdir(parents=True)
    texts = list(documents(size_mb * 10**6))
    per_file = -(-len(texts) // FILES)
    for number in range(FILES):
        chunk = texts[number * per_file : (number + 1) * per_file]
        lines = "".join(json.dumps({"text": text, "meta": {"n": i}}) + "\n" for i, text in enumerate(chunk)).encode()
        (work / "jsonl" / f"{number:05d}.jsonl").write_bytes(lines)
        (work / "zst" / f"{number:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
        sink = io.BytesIO()
        pq.write_table(pa.table({"text": chunk, "id": list(range(len(chunk)))}), sink, row_group_size=ROW_GROUP)
        (work / "parquet" / f"{number:05d}.parquet").write_bytes(sink.getvalue())
    info = {
        "size_mb": size_mb,
        "documents": len(texts),
        "text_bytes": sum(len(text.encode()) for text in texts),
        "files": FILES,
        "bytes_on_disk": {
            name: sum(p.stat().st_size for p in (work / name).iterdir()) for name in ("zst", "parquet", "jsonl")
        },
    }
    marker.write_text(json.dumps(info, indent=2))
    return info


def train_shared_tokenizer(work: Path, vocab: int) -> dict:
    """The tokenizer every timed run is given: prepare's own seeded sample of the zst corpus."""
    out = work / "tokenizer"
    started = time.perf_counter()
    corpus = CorpusConfig(source="paths", paths=(str(work / "zst"),))
    settings = PrepareSettings(corpus=corpus, tokenizer=TokenizerConfig(vocab_size=vocab), shards=ShardConfig())
    units = plan(corpus)
    train_tokenizer(sample_texts(settings, units, unit_bytes(units)), settings.tokenizer, out)
    return {"seconds": round(time.perf_counter() - started, 1), "path": out}


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    assert performer(argv) == 0, argv
    return time.perf_counter() - started


def prepare_run(work: Path, layout: str, workers: int, tokenizer: Path, text_bytes: int, repeats: int = 1) -> dict:
    """The median of `repeats` fresh prepares (each into an empty directory)."""
    out = work / "out" / f"{layout}-w{workers}"
    argv = ["data", "prepare", "--paths", str(work / layout), "--out", str(out), "--tokenizer", str(tokenizer)]
    times = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        times.append(timed([*argv, "--workers", str(workers)]))
    seconds = statistics.median(times)
    train, heldout = Manifest.load(out / "train"), Manifest.load(out / "heldout")
    tokens = train.tokens + heldout.tokens
    shard_bytes = sum(s.bytes for m in (train, heldout) for s in m.shards)
    return {
        "layout": layout,
        "workers": workers,
        "seconds": round(seconds, 1),
        "all_seconds": [round(x, 1) for x in times],
        "text_mb_per_s": round(text_bytes / seconds / 1e6, 2),
        "text_mb_per_s_per_process": round(text_bytes / seconds / 1e6 / workers, 2),
        "tokens": tokens,
        "documents": train.documents + heldout.documents,
        "shards": len(train.shards) + len(heldout.shards),
        "tar_bytes_per_token": round(shard_bytes / tokens, 4),
        "tar_over_token_bytes": round(shard_bytes / (tokens * 2), 4),
    }


def old_prepare(work: Path, text_bytes: int, vocab: int) -> dict:
    """The prepare this replaced: a tokenizer pass, then one pass per split (plain JSON lines)."""
    out = work / "out" / "old"
    shutil.rmtree(out, ignore_errors=True)
    corpus = ["--paths", str(work / "jsonl")]
    tokenizer = timed(["data", "tokenizer", *corpus, "--out", str(out / "tokenizer"), "--vocab-size", str(vocab)])
    shards = 0.0
    for split in ("train", "heldout"):
        argv = ["data", "shards", *corpus, "--tokenizer", str(out / "tokenizer"), "--out", str(out / split)]
        shards += timed([*argv, "--split", split])
    seconds = tokenizer + shards
    return {
        "tokenizer_seconds": round(tokenizer, 1),
        "shards_seconds": round(shards, 1),
        "seconds": round(seconds, 1),
        "text_mb_per_s": round(text_bytes / seconds / 1e6, 2),
        "shards_text_mb_per_s": round(text_bytes / shards / 1e6, 2),
    }


def summarise(runs: list[dict], old: dict | None) -> dict:
    by = {(r["layout"], r["workers"]): r for r in runs}
    summary = {}
    for layout in ("zst", "parquet"):
        if (layout, 1) in by and (layout, 2) in by:
            summary[f"{layout}_speedup_2_workers"] = round(by[layout, 1]["seconds"] / by[layout, 2]["seconds"], 2)
    if old is not None:
        for layout in ("zst", "parquet"):
            if (layout, 1) in by:
                # the shard passes against the shard pass (both given a tokenizer)
                summary[f"{layout}_1_worker_vs_replaced_shard_passes"] = round(
                    old["shards_seconds"] / by[layout, 1]["seconds"], 2
                )
    return summary


def markdown(results: dict) -> str:
    corpus, runs, old = results["corpus"], results["runs"], results.get("old_prepare")
    rows = [
        [
            {"zst": "`.jsonl.zst`", "parquet": "Parquet"}[r["layout"]],
            r["workers"],
            f"{r['seconds']:.0f} s",
            f"{r['text_mb_per_s']:.1f}",
            f"{r['text_mb_per_s_per_process']:.1f}",
            f"{r['tar_bytes_per_token']:.3f} ({r['tar_over_token_bytes']:.3f}x)",
        ]
        for r in runs
    ]
    if old is not None:
        rows.append(
            [
                "plain JSON lines, the replaced prepare's two shard passes",
                "1 + tokenizer pool",
                f"{old['shards_seconds']:.0f} s",
                f"{old['shards_text_mb_per_s']:.1f}",
                "",
                "",
            ]
        )
    summary = results["summary"]
    text = (
        f"`performer data prepare` on a synthetic web-like corpus: {corpus['text_bytes'] / 1e6:,.0f} MB of text, "
        f"{corpus['documents']:,} documents in {corpus['files']} files; vocab {results['settings']['vocab']}, "
        "the tokenizer given "
        f"(trained once on prepare's sample in {results['tokenizer_seconds']:.0f} s).\n\n"
        + common.table(
            ["corpus", "workers", "time", "text MB/s", "MB/s per process", "tar bytes/token (vs token bytes)"],
            rows,
            "lrrrrr",
        )
    )
    notes = [f"{k.replace('_', ' ')}: {v}x" for k, v in summary.items()]
    if old is not None:
        notes.append(
            f"the replaced prepare's tokenizer (a full pass, then training) took {old['tokenizer_seconds']:.0f} s, "
            f"ours (a seeded sample, then training) {results['tokenizer_seconds']:.0f} s"
        )
    machine = results["machine"]
    text += "\n" + "; ".join(notes) + f".\n\nMachine: {machine.get('cpu_model')}, {machine.get('cpu_count')} cores.\n"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="MB of text in the synthetic corpus")
    parser.add_argument("--work", default="runs/bench-prepare", help="where the corpus and the outputs go")
    parser.add_argument("--vocab", type=int, default=32000, help="tokenizer vocabulary (smaller for a small corpus)")
    parser.add_argument("--repeats", type=int, default=3, help="prepares per configuration (the median is reported)")
    parser.add_argument("--no-old", action="store_true", help="skip the replaced prepare (the slowest part)")
    parser.add_argument("--out-name", default="data_prepare", help="results file name under benchmarks/results")
    args = parser.parse_args()
    work = Path(args.work)
    corpus = write_corpus(work, args.size_mb)
    tokenizer = train_shared_tokenizer(work, args.vocab)
    runs = [
        prepare_run(work, layout, workers, tokenizer["path"], corpus["text_bytes"], args.repeats)
        for layout in ("zst", "parquet")
        for workers in (1, 2)
    ]
    old = None if args.no_old else old_prepare(work, corpus["text_bytes"], args.vocab)
    results = {
        "settings": {
            "size_mb": args.size_mb,
            "vocab": args.vocab,
            "files": FILES,
            "row_group": ROW_GROUP,
            "repeats": args.repeats,
        },
        "machine": common.machine(),
        "corpus": corpus,
        "tokenizer_seconds": tokenizer["seconds"],
        "runs": runs,
        "old_prepare": old,
        "summary": summarise(runs, old),
    }
    common.publish(args.out_name, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
