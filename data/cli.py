"""`performer data ...`: build and check the data the trainer streams.

    performer data tokenizer --out DIR [corpus options] [--vocab-size 8000 ...]
    performer data shards    --tokenizer DIR --out DIR [--split train] [corpus options]
    performer data prepare   --source stdlib --out DIR     # tokenizer + train/heldout shards
    performer data prepare   --paths c4/ --out DIR         # ... of any corpus format (data/sources.py)
    performer data verify    DIR                           # every shard against its manifest
    performer data inspect   DIR [--tokenizer DIR]         # manifest summary + decoded documents
    performer data sample    DIR [--objective ...]         # one stream batch, decoded: what the model sees

Each subcommand is a plain function of its parsed arguments returning an exit code; what it
reads is checked before it writes anything, and a bad input is a DataError (one line, exit 2).
A corpus file or record that cannot be read stops the command (`--on-error stop`, before any
manifest is written) or is left out, counted, printed at the end and listed in the manifests'
`source.skipped` (`--on-error skip`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Iterator

from data.corpus import OLD_SOURCES, SOURCES, CorpusConfig, Skipped, iter_documents, plan
from data.objectives import OBJECTIVES
from data.prepare import PrepareSettings, prepare, skip_record, train_and_report
from data.shards import Manifest, ShardConfig, tokenize_texts, verify_manifest, write_shards
from data.sources import FORMATS, ON_ERROR
from data.stream import DataError, ShardReader, StreamConfig, TokenStream, check_shard_paths
from data.tokenizer import MODEL_TYPES, TOKENIZER_DIR, Tokenizer, TokenizerConfig
from performer import strict


def add_parser(subparsers) -> None:
    data = subparsers.add_parser(
        "data",
        help="corpora, tokenizer, shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    tok = commands.add_parser("tokenizer", help="train a SentencePiece tokenizer on a corpus sample")
    _corpus_options(tok)
    _tokenizer_options(tok)
    tok.add_argument("--out", required=True, help="directory for tokenizer.model + tokenizer.json")
    tok.set_defaults(func=cmd_tokenizer)

    shards = commands.add_parser("shards", help="tokenize a corpus into webdataset shards + manifest")
    _corpus_options(shards)
    _shard_options(shards)
    shards.add_argument("--tokenizer", required=True, help="directory written by `performer data tokenizer`")
    shards.add_argument(
        "--split",
        choices=("train", "heldout", "all"),
        default="train",
        help="which documents to write (the held-out split is by content hash)",
    )
    shards.add_argument("--out", required=True, help="directory for the shards and manifest.json")
    shards.set_defaults(func=cmd_shards)

    prep = commands.add_parser("prepare", help="corpus -> tokenizer -> train/heldout shards in one go")
    _corpus_options(prep)
    _tokenizer_options(prep)
    _shard_options(prep)
    prep.add_argument(
        "--out", required=True, help="writes OUT/tokenizer, OUT/train, OUT/heldout (an interrupted prepare continues)"
    )
    prep.add_argument(
        "--tokenizer",
        default=None,
        help="use this tokenizer directory (copied to OUT/tokenizer) instead of training one",
    )
    prep.add_argument(
        "--part-bytes",
        type=int,
        default=None,
        help="input bytes per unit of parallel work (default: a 64th of the corpus, 16-256 MiB)",
    )
    prep.set_defaults(func=cmd_prepare)

    verify = commands.add_parser("verify", help="check every shard against its manifest")
    verify.add_argument("manifest", help="manifest.json or its directory")
    verify.add_argument("--no-sha256", action="store_true", help="skip hashing (size/structure/counts only)")
    _shard_path_options(verify)
    verify.set_defaults(func=cmd_verify)

    inspect = commands.add_parser("inspect", help="summarise a manifest and decode a few documents")
    inspect.add_argument("manifest", help="manifest.json or its directory")
    inspect.add_argument("--tokenizer", help="tokenizer directory, to print text (default: ../tokenizer)")
    inspect.add_argument("--documents", type=int, default=1, help="documents to show")
    inspect.add_argument("--chars", type=int, default=400, help="characters of each to print")
    _shard_path_options(inspect)
    inspect.set_defaults(func=cmd_inspect)

    sample = commands.add_parser("sample", help="decode the first rows of the stream's first batch")
    sample.add_argument("manifest", help="manifest.json or its directory")
    sample.add_argument("--tokenizer", help="tokenizer directory (default: ../tokenizer)")
    sample.add_argument("--objective", choices=OBJECTIVES, default="span_corruption")
    sample.add_argument("--input-length", type=int, default=128)
    sample.add_argument("--rows", type=int, default=1, help="rows to print")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=cmd_sample)


def _shard_path_options(parser: argparse.ArgumentParser) -> None:
    # Verifying a pipe: shard runs it: a manifest from elsewhere must not run commands by being checked.
    group = parser.add_argument_group("shard paths (refused unless allowed, as in training)")
    group.add_argument("--allow-pipe", action="store_true", help="run `pipe:` shard commands")
    group.add_argument("--allow-remote", action="store_true", help="fetch http(s)/s3/gs/hf shard URLs")
    group.add_argument("--allow-shell-characters", action="store_true", help="accept shell metacharacters in paths")


def _checked_manifest(args) -> Manifest:
    manifest = Manifest.load(args.manifest)
    check_shard_paths(
        manifest,
        allow_pipe=args.allow_pipe,
        allow_remote=args.allow_remote,
        allow_shell_characters=args.allow_shell_characters,
    )
    return manifest


def _corpus_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("corpus")
    group.add_argument(
        "--source",
        choices=(*SOURCES, *OLD_SOURCES),
        default=None,
        help="stdlib = this Python's standard library sources, no download (the default without --paths); "
        "paths = --paths (the default with them); files/jsonl = --paths read as text/JSON lines",
    )
    group.add_argument(
        "--paths",
        nargs="*",
        default=(),
        help="files, directories (recursive) or quoted globs: JSON lines, JSON lists, Parquet, save_to_disk "
        "directories, WebDataset tars, .txt/.md/.py; .gz/.zst/.xz/.bz2 compressed or not",
    )
    group.add_argument(
        "--format", choices=FORMATS, default=None, help="read every file as this format (default: from its name)"
    )
    group.add_argument(
        "--text-field", default="text", help="field holding the text in records; dotted for nested (meta.text)"
    )
    group.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="stop",
        help="a file or record that cannot be read: stop (exit 2, nothing written) or skip (leave it out, list it)",
    )
    group.add_argument("--heldout-fraction", type=float, default=CorpusConfig.heldout_fraction)
    group.add_argument("--max-documents", type=int, default=None, help="use only the first N documents")


def _tokenizer_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--vocab-size", type=int, default=TokenizerConfig.vocab_size)
    group.add_argument("--model-type", choices=MODEL_TYPES, default=TokenizerConfig.model_type)
    group.add_argument("--num-sentinels", type=int, default=TokenizerConfig.num_sentinels)
    group.add_argument(
        "--sample-lines", type=int, default=TokenizerConfig.sample_lines, help="corpus lines sampled for training"
    )
    group.add_argument("--seed", type=int, default=TokenizerConfig.seed)


def _shard_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("shards")
    group.add_argument("--max-samples-per-shard", type=int, default=ShardConfig.max_samples_per_shard)
    group.add_argument("--max-bytes-per-shard", type=int, default=ShardConfig.max_bytes_per_shard)
    group.add_argument(
        "--workers", type=int, default=ShardConfig.num_workers, help="tokenizer processes (0 = one per CPU)"
    )


def _corpus_config(args) -> CorpusConfig:
    """The corpus, its paths checked (they must name something) before any work."""
    corpus = CorpusConfig(
        source=args.source or ("paths" if args.paths else "stdlib"),
        paths=tuple(args.paths),
        format=args.format,
        text_field=args.text_field,
        heldout_fraction=args.heldout_fraction,
        max_documents=args.max_documents,
        on_error=args.on_error,
    )
    plan(corpus, skipped=[])  # what is skipped is counted while reading
    return corpus


def _out_dir(args) -> Path:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; name a directory (it is created if missing)")
    return out


def _tokenizer_config(args) -> TokenizerConfig:
    return TokenizerConfig(
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        num_sentinels=args.num_sentinels,
        sample_lines=args.sample_lines,
        seed=args.seed,
    )


def _shard_config(args) -> ShardConfig:
    return ShardConfig(
        max_samples_per_shard=args.max_samples_per_shard,
        max_bytes_per_shard=args.max_bytes_per_shard,
        num_workers=args.workers,
    )


# ------------------------------------------------------------------------------------- commands


def _train(
    corpus: CorpusConfig, config: TokenizerConfig, out: Path, split: str | None, skipped: list[Skipped]
) -> Tokenizer:
    return train_and_report((doc.text for doc in iter_documents(corpus, split, skipped)), config, out)


MAX_SKIPS_PRINTED = 50


def _print_skipped(corpus: CorpusConfig, skipped: list[Skipped]) -> None:
    if corpus.on_error != "skip":
        return
    files, records = sum(s.what == "file" for s in skipped), sum(s.what == "record" for s in skipped)
    print(f"skipped (--on-error skip): {files} file(s), {records} record(s)" + (":" if skipped else ""))
    for entry in skipped[:MAX_SKIPS_PRINTED]:
        print(f"  {entry.where}: {entry.problem}")
    if len(skipped) > MAX_SKIPS_PRINTED:
        print(f"  ... {len(skipped) - MAX_SKIPS_PRINTED} more: the manifests' source.skipped lists them")


def _write(
    corpus: CorpusConfig,
    tokenizer: Tokenizer,
    config: ShardConfig,
    out: Path,
    split: str,
    known: list[Skipped] | None = None,
    met: list[Skipped] | None = None,
) -> Manifest:
    """Tokenize and write one split. `known`: what an earlier pass over the corpus left out (it
    goes into the manifest as is); without it, what this pass meets (appended to `met`) fills the
    manifest's record as the documents run out, before the manifest is written."""
    source = {"corpus": strict.plain(corpus)}
    met = [] if met is None else met

    def texts() -> Iterator[str]:
        for doc in iter_documents(corpus, None if split == "all" else split, met):
            yield doc.text
        if known is None:
            source.update(skip_record(corpus, met))

    if known is not None:
        source.update(skip_record(corpus, known))
    arrays = tokenize_texts(
        texts(),
        tokenizer,
        num_workers=config.num_workers,
        documents_per_task=config.documents_per_task,
        description=f"{split} shards",
    )
    manifest = write_shards(
        arrays,
        out,
        split=split,
        special=tokenizer.special,
        config=config,
        tokenizer_fingerprint=tokenizer.fingerprint,
        source=source,
    )
    size = sum(s.bytes for s in manifest.shards)
    print(
        f"{split}: {manifest.samples} documents, {manifest.tokens:,} tokens in {len(manifest.shards)} "
        f"shard(s), {size:,} bytes ({size / max(manifest.tokens, 1):.2f} bytes/token) -> {out}"
    )
    return manifest


def cmd_tokenizer(args) -> int:
    out, corpus, config = _out_dir(args), _corpus_config(args), _tokenizer_config(args)
    skipped: list[Skipped] = []
    _train(corpus, config, out, split="train", skipped=skipped)
    _print_skipped(corpus, skipped)
    return 0


def cmd_shards(args) -> int:
    out, corpus, config = _out_dir(args), _corpus_config(args), _shard_config(args)
    skipped: list[Skipped] = []
    _write(corpus, Tokenizer.load(args.tokenizer), config, out, args.split, met=skipped)
    _print_skipped(corpus, skipped)
    return 0


def cmd_prepare(args) -> int:
    out, corpus = _out_dir(args), _corpus_config(args)
    if args.part_bytes is not None and args.part_bytes < 1:
        raise DataError(f"--part-bytes {args.part_bytes}: give a size >= 1 (bytes of input per part)")
    settings = PrepareSettings(
        corpus=corpus, tokenizer=_tokenizer_config(args), shards=_shard_config(args), part_bytes=args.part_bytes
    )
    started = time.perf_counter()
    manifests = prepare(settings, out, workers=args.workers, tokenizer_dir=args.tokenizer)
    for split, manifest in manifests.items():
        size = sum(s.bytes for s in manifest.shards)
        print(
            f"{split}: {manifest.documents:,} documents, {manifest.tokens:,} tokens in {len(manifest.shards)} "
            f"shard(s), {size:,} bytes ({size / max(manifest.tokens, 1):.2f} bytes/token) -> {out / split}"
        )
    print(f"prepared in {time.perf_counter() - started:.1f}s")
    skipped = manifests["train"].source.get("skipped", {}).get("list", [])
    _print_skipped(corpus, [Skipped(**entry) for entry in skipped])
    return 0


def cmd_verify(args) -> int:
    manifest = _checked_manifest(args)
    good, bad = verify_manifest(manifest, check_sha256=not args.no_sha256)
    for path, reason in sorted(bad.items()):
        print(f"BAD  {path}: {reason}")
    print(f"{len(good)} of {len(manifest.shards)} shards match the manifest")
    return 1 if bad else 0


def cmd_inspect(args) -> int:
    manifest = _checked_manifest(args)
    tokenizer = _tokenizer_for(manifest, args.tokenizer) if args.documents > 0 else None
    summary = {k: v for k, v in manifest.to_json().items() if k != "shards"}
    summary["shards"] = len(manifest.shards)
    summary["bytes"] = sum(s.bytes for s in manifest.shards)
    print(json.dumps(summary, indent=2))
    if tokenizer is None:
        return 0
    good, _ = verify_manifest(manifest, check_sha256=False)
    reader = ShardReader(manifest, good)
    shown = 0
    for position, index in sorted(good.items()):
        for member in range(len(index.lengths)):
            if shown == args.documents:
                reader.close()
                return 0
            ids = reader.read(position, member)
            print(f"--- {manifest.shards[position].path} document {member}: {len(ids)} tokens")
            print(tokenizer.decode(ids.tolist())[: args.chars])
            shown += 1
    reader.close()
    return 0


def _tokenizer_for(manifest: Manifest, directory: str | None) -> Tokenizer:
    """The tokenizer next to the split (OUT/tokenizer of `prepare`) unless one is named; it must be
    the one the shards were written with (another would decode them into nonsense)."""
    tokenizer = manifest.tokenizer(directory)
    if tokenizer is None:
        raise DataError(
            f"no tokenizer beside the shards of {manifest.root} (expected "
            f"{manifest.root.parent / TOKENIZER_DIR}); pass --tokenizer DIR"
        )
    return tokenizer


def cmd_sample(args) -> int:
    config = StreamConfig(
        manifest=args.manifest,
        objective=args.objective,
        input_length=args.input_length,
        batch_size=max(args.rows, 1),
        seed=args.seed,
    )
    stream = TokenStream(config, rank=0, world_size=1)
    tokenizer = _tokenizer_for(stream.manifest, args.tokenizer)
    batch = next(iter(stream))
    for row in range(args.rows):
        for key, ids in batch.items():
            if key == "attention_mask":
                continue
            ids = [i for i in ids[row].tolist() if i != -100]
            print(f"--- row {row} {key} ({len(ids)} ids)")
            print(tokenizer.decode(ids))
    return 0
