"""README section "Data pipeline": preparing a corpus, planning the batches, and the stream."""

from __future__ import annotations

from benchmarks import common
from benchmarks.readme.core import Block, Figure, Results


def data_stream_table(r: Results) -> str:
    """Stream throughput by workers; with the layout of the shards when both layouts were measured."""
    from benchmarks import data_stream

    results = r["data_stream"]
    return data_stream.stream_table(data_stream.stream_rows(results), with_layout="stream_v1" in results)


def data_prepare_table(r: Results) -> str:
    """Prepare's pass (the tokenizer given) by corpus layout and workers, and the replaced prepare's."""
    results = r["data_prepare"]
    names = {"zst": "`.jsonl.zst`", "parquet": "Parquet"}
    rows = [
        [
            names[x["layout"]],
            x["workers"],
            f"{x['seconds']:.0f} s",
            f"{x['text_mb_per_s']:.1f}",
            f"{x['text_mb_per_s_per_process']:.1f}",
            f"{x['tar_over_token_bytes']:.3f}x",
        ]
        for x in results["runs"]
    ]
    old = results.get("old_prepare")
    if old is not None:
        rows.append(
            [
                "JSON lines: the replaced prepare's shard passes",
                "1 + pool",
                f"{old['shards_seconds']:.0f} s",
                f"{old['shards_text_mb_per_s']:.1f}",
                "",
                "",
            ]
        )
    corpus = results["corpus"]
    head = (
        f"{corpus['text_bytes'] / 1e9:.2f} GB of text, {corpus['documents']:,} documents in {corpus['files']} files, "
        f"vocab {results['settings']['vocab']}, the tokenizer given (ours trained in "
        f"{results['tokenizer_seconds']:.0f} s from a seeded sample"
        + (f"; the replaced prepare's full-pass tokenizer took {old['tokenizer_seconds']:.0f} s" if old else "")
        + "):\n\n"
    )
    header = ["corpus", "workers", "time", "text MB/s", "MB/s per process", "tar bytes / token bytes"]
    return head + common.table(header, rows, align="lrrrrr")


def data_plan_table(r: Results) -> str:
    """Planning at 1e6-1e9 documents, new / old planner; then the start-up verification per rank."""
    from benchmarks import data_plan

    results = r["data_plan"]
    settings = results["settings"]
    head = (
        f"Synthetic split indexes of {settings['documents_per_shard']:,} documents per shard (no tars), one rank of "
        f"{settings['world_size']}, batch {settings['batch_size']} rows of {settings['raw_length']} tokens, "
        f"interleave_shards {settings['interleave_shards']}; each cell is ours / the replaced planner's "
        f"(a {settings['old_shuffle_buffer']}-document shuffle buffer), the old one's larger sizes estimated:\n\n"
    )
    text = head + data_plan.comparison_table(results)
    if results.get("verification"):
        text += "\n\n" + data_plan.verification_table(results)
    return text


def _data_stream(r: Results) -> tuple[str, str, str]:
    model, stream = r["data_stream"]["tiny_model"], r["data_stream"]["stream"]
    faster = round(stream[0]["raw_tokens_per_s"] / model["raw_tokens_per_s"], -1)
    return f"{model['seconds_per_step']:.1f}", f"{model['raw_tokens_per_s'] / 1e3:.0f}", f"{faster:.0f}"


def _shard_bytes(r: Results) -> tuple[str, ...]:
    results = r["data_stream"]
    stdlib, web = results["shards"], results["web_like"]["shards"]
    return (
        f"{stdlib['bytes_per_token']:.3f}",
        f"{web['bytes_per_token']:.3f}",
        f"{round(web['tokens_per_document'], -2):.0f}",
        f"{max(stdlib['tar_over_token_bytes'], web['tar_over_token_bytes']):.3f}",
        f"{results['shards_v1']['bytes_per_token']:.3f}",
        f"{results['web_like']['shards_v1']['bytes_per_token']:.3f}",
    )


def _web_like_stream(r: Results) -> tuple[str, ...]:
    runs = {x["layout"]: x for x in r["data_stream"]["web_like"]["stream"]}
    packed, v1 = runs["packed"], runs["v1"]
    return (
        f"{packed['raw_tokens_per_s'] / 1e6:.2f}",
        f"{v1['raw_tokens_per_s'] / 1e6:.2f}",
        f"{packed['startup_seconds']:.3f}",
        f"{v1['startup_seconds']:.3f}",
    )


def _plan_largest(r: Results) -> dict:
    return max(r["data_plan"]["sizes"], key=lambda entry: entry["size"])


def _plan_summary(r: Results) -> dict:
    """The new planner's figures at the largest size measured."""
    return _plan_largest(r)["summary"]["new"]


BLOCKS: dict[str, Block] = {
    "data_prepare": Block(("data_prepare",), data_prepare_table),
    "data_plan": Block(("data_plan",), data_plan_table),
    "data_stream": Block(("data_stream",), data_stream_table),
}


FIGURES: list[Figure] = [
    Figure(
        "one rank, {}-core CPU; the tokenizer (vocab 8000) trained in {} s.",
        lambda r: (
            str(r["data_stream"]["machine"].get("cpu_count", r["data_stream"]["machine"].get("cpus"))),
            f"{r['data_stream']['prepare']['tokenizer_seconds']:.0f}",
        ),
    ),
    Figure(
        "A `tiny` model training step on the same batches takes {} s ({}k raw tokens/s): the stream is ~{}x faster",
        _data_stream,
    ),
    Figure(
        "median of five runs each; the machine was shared, 1-minute load average {} on its {} cores",
        lambda r: (
            f"{r['data_stream']['machine']['load_average_1m']:.1f}",
            str(r["data_stream"]["machine"]["cpu_count"]),
        ),
    ),
    Figure(
        "without workers the packed shards stream {} M raw tokens/s against {} M, and start in {} s against {} s",
        _web_like_stream,
    ),
    Figure(
        "At 1e9 documents a rank is at its first batch {} s after it starts reading the manifest, {} s of it checking "
        "the 4 GB index against the manifest ({} s its sha256), and holds {} MB beyond the mapped index",
        lambda r: (
            f"{_plan_summary(r)['startup_s']:.1f}",
            f"{_plan_summary(r)['index_check_s']:.1f}",
            f"{_plan_summary(r)['sha256_s']:.1f}",
            f"{_plan_summary(r)['anon_mb']:.0f}",
        ),
    ),
    Figure(
        "the replaced planner would take ~{} s and ~{} GB per rank. A global batch draws from {} shards",
        lambda r: (
            f"{_plan_largest(r)['old']['estimate']['startup_s']:.0f}",
            f"{_plan_largest(r)['old']['estimate']['anon_peak_bytes'] / 1e9:.0f}",
            f"{_plan_summary(r)['distinct_mean']:.0f}",
        ),
    ),
    Figure(
        "{} bytes/token on the stdlib corpus and {} on synthetic web-like documents of ~{} tokens (at most {}x the "
        "token bytes; with a tar member per document, version 1, {} and {})",
        _shard_bytes,
    ),
]
