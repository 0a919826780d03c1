"""The trainer's data streams: the rank's stream of a split, its damaged shards and documents reported.

The held-out split is found beside the training split (``data.shards.split_beside``) unless
``data.eval_manifest`` names one.
"""

from __future__ import annotations

from pathlib import Path

from launcher.config import ConfigError, RunConfig
from launcher.dist import Topology, gather_objects, ranks_connected
from launcher.metrics import MetricsLogger


def eval_manifest_path(config: RunConfig) -> Path | None:
    """data.eval_manifest, or the held-out split beside the training split (None if there is none)."""
    from data.shards import split_beside

    if config.data.eval_manifest is not None:
        return Path(config.data.eval_manifest)
    return split_beside(config.data.train_manifest, "heldout")


def make_stream(config: RunConfig, manifest: Path | None, topology: Topology, max_epochs=None):
    """The rank's stream of ``manifest``, or of the training data (a split or a mixture) when None.

    The ranks verify a share of the shards each and act on the gathered verdicts: every rank leaves
    out the same damaged shards (different step counts would hang the collectives)."""
    from data.stream import DataError, StreamConfig, TokenStream

    data = config.data
    if manifest is None:
        where = {"sources": data.sources} if data.sources else {"manifest": data.manifest}
    else:
        where = {"manifest": str(manifest)}
    stream_config = StreamConfig(
        **where,
        objective=data.objective,
        input_length=data.input_length,
        batch_size=config.train.micro_batch_size,
        seed=config.seed,
        num_workers=data.num_workers,
        interleave_shards=data.interleave_shards,
        verify_sha256=data.verify_sha256,
        allow_pipe=data.allow_pipe,
        allow_remote=data.allow_remote,
        allow_shell_characters=data.allow_shell_characters,
        max_epochs=max_epochs,
    )
    try:
        # Without peers (a tool building one rank's stream) the stream verifies every shard itself.
        gather = gather_objects if ranks_connected() else None
        return TokenStream(stream_config, rank=topology.rank, world_size=topology.world_size, gather=gather)
    except DataError as error:
        raise ConfigError(f"data: {error}") from error


def report_bad_shards(metrics: MetricsLogger, step: int, split: str, stream) -> None:
    """One event per skipped shard (name, reason, samples lost), in metrics.jsonl and on the console."""
    samples = stream.shard_documents
    for path, reason in sorted(stream.bad_shards.items()):
        metrics.log(
            "event", step, {"data_bad_shard": path, "split": split, "reason": reason, "samples_lost": samples[path]}
        )
        metrics.message(f"data: skipping {split} shard {path} ({samples[path]} samples lost): {reason}")


def report_lost_documents(metrics: MetricsLogger, step: int, stream, reported: dict, new_anywhere: bool) -> None:
    """Gather the documents the ranks found unreadable since the last report (only when one did:
    whether one did rides on the log interval's gather) and log each once; `reported` stays the same
    on every rank."""
    from data.stream import documents_phrase

    if not new_anywhere:
        return
    mine = {key: reason for key, reason in stream.lost_documents.items() if key not in reported}
    new: dict[tuple[str, str], list[int]] = {}  # (path, reason) -> documents: one console line each
    for share in gather_objects(mine):
        for (path, document), reason in sorted(share.items()):
            if (path, document) not in reported:
                reported[(path, document)] = reason
                # "member": the document's index in its shard (the field's name from version-1 shards).
                metrics.log("event", step, {"data_lost_document": path, "member": document, "reason": reason})
                new.setdefault((path, reason), []).append(document)
    for (path, reason), documents in new.items():
        metrics.message(
            f"data: shard {path} {documents_phrase(documents)} unreadable ({reason}); replaced by the documents "
            "after them"
        )


def source_tokens(stream) -> dict[str, int]:
    """A mixture's tokens drawn from each source so far, by all ranks together (packed row tokens,
    eos included), as train-record fields ``data_tokens_<name>``: a function of the stream's
    cursor, so the same on every rank with no collective. Empty for a single split."""
    if stream.mixture is None:
        return {}
    raw = stream.config.raw_length
    return {f"data_tokens_{name}": rows * raw for name, rows in stream.source_rows().items()}


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens the model read and predicted in this batch."""
    count = int(batch["attention_mask"].sum())
    if "decoder_input_ids" in batch:
        count += int((batch["labels"] != -100).sum())
    return count


def to_device(batch: dict, device) -> dict:
    return {name: tensor.to(device) for name, tensor in batch.items()}
