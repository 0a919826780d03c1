"""Shards -> one rank's fixed-shape batches, exactly once per epoch, resumable.

Public API::

    stream = TokenStream(StreamConfig(manifest="out/train"), rank=None, world_size=None)
    for batch in stream: ...            # forever (or config.max_epochs), epoch after epoch
    for batch in stream.iter_epoch(): ...  # the rest of the current epoch only
    stream.steps_per_epoch              # batches per epoch on every rank (same for all ranks)
    state = stream.state_dict()         # identical on every rank: save it from any one
    stream.load_state_dict(state)       # before iterating; any world size or batch size

`rank`/`world_size` default to the RANK / WORLD_SIZE environment variables (0 / 1 if unset).

Batches (torch tensors; B = batch_size, L = input_length):
- span_corruption: input_ids (B, L) int64, attention_mask (B, L) bool, decoder_input_ids
  (B, T) int64, labels (B, T) int64, with T = span_corruption_lengths(L)[1] (114 for 512).
  decoder_input_ids = [bos] + labels[:-1]: bos is the decoder start token (not pad, so a
  key-padding mask computed as `ids != pad` never hides it). labels end with eos.
- causal_lm: input_ids (B, L), attention_mask (B, L) bool, labels (B, L) already shifted.
- masked_lm: input_ids (B, L), attention_mask (B, L) bool, labels (B, L) (-100 = not chosen).
Rows are packed, so attention masks are all True and labels hold -100 only where an objective
says so; the keys are there so that consumers never special-case packing.

How the guarantees are met:
1. Plan. At construction the split's index is memory-mapped and checked against the manifest
   (a missing, stale or damaged index is a DataError), and every shard is verified against both
   without parsing its tar (size, sha256, that the index's members fit in the file, the first
   member's header; `data.shards.verify_shard` with full=False; version-1 splits, which have no
   index, parse every tar header as before). Damaged shards (missing, empty, truncated, cut at a
   member boundary, not a tar) are reported by name, counted
   (`bad_shards`, `lost_samples`) and left out of the plan; every rank verifies the same files
   and so leaves out the same shards (`exclude_shards` lets a trainer make ranks agree). A shard
   of the right size whose sha256 differs is a DataError instead: it is another file in the
   shard's place or silent corruption, and training on it would quietly change the data the
   manifest (and every checkpoint's cursor) promises. No good shard at all is a DataError.
   A member that turns out unreadable later (the file changed after verification: short read,
   crc32 other than the index's; or a token id >= the vocabulary size) loses its documents: each
   is replaced in place by the tokens that follow it in the epoch's order, so every row keeps its
   shape and every rank its number of batches; they are reported by (shard path, document) and
   counted (`lost_documents`), and their tokens are lost, nothing else.
2. Order. Epoch e's document order is a pure function of (seed, e): a permutation of the good
   shards, then a bounded shuffle buffer over their documents. Documents are concatenated with
   eos after each and cut into rows of `raw_length` tokens (568 for span corruption at 512):
   row k is tokens [k*raw, (k+1)*raw) of that stream. Every token count comes from the index (or,
   for version 1, the verified tar headers), so the plan is computed without reading any token.
3. Cursor. The state is (epoch, cursor) where cursor = rows of the epoch consumed by all ranks
   together. After the cursor, consecutive groups of `batch_size` rows are dealt round-robin:
   batch i of rank r holds rows cursor + (i*W + r)*B ... + B-1. Each rank yields exactly
   floor((rows - cursor) / (W*B)) batches per epoch; the last < W*B rows of an epoch are
   dropped (the defined remainder; at most W*B-1 rows). Equal counts whatever the shard sizes,
   shards per rank or workers.
4. Workers. DataLoader worker w of N builds batches i = w, w+N, ... of its rank; the DataLoader
   returns them in order i = 0, 1, 2, ..., so a batch does not depend on the number of
   workers. Reading, packing, the objective and batching all happen inside workers; a worker
   reads only the members holding the documents that overlap its rows (seek + read of each
   member, at most ~1 MiB, kept in a small cache while its documents are used).
5. Randomness. The objective's RNG for row k of epoch e is seeded with (seed, e, k), so a row
   is corrupted the same way whoever builds it.
Resuming with the same world size therefore replays exactly the batches an uninterrupted run
would have produced; with a different world size (or batch size) the rows after the global
cursor are dealt anew: none repeated, none skipped. A batch counts as consumed once it has
been yielded: take state_dict() after the step that used it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import zlib
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data import objectives
from data.errors import DataError
from data.shards import Manifest, ShardChecksumError, ShardIndex, read_shard_bytes, verify_manifest
from performer import strict

STATE_VERSION = 1
_REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "hf://")
# Characters a POSIX shell gives meaning to. The manifest is data, possibly downloaded; a path
# holding one would become a command wherever a URL reaches a shell (pipe: shards, a GOPEN_REWRITE
# to a pipe, older webdataset versions that fetched through `curl` in a shell).
SHELL_METACHARACTERS = frozenset(";&|$`'\"<>(){}\\\n\r\0")


class UnreadableDocument(Exception):
    """A document could not be read after verification; the message says why. `documents` are
    those lost with it (its member's, numbered in their shard)."""

    def __init__(self, reason: str, documents: Sequence[int] = ()):
        super().__init__(reason)
        self.documents = tuple(documents)


LOST_KEY = "lost_documents"  # batch key, removed before a batch leaves TokenStream


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    manifest: str  # manifest.json of a split, or the directory that holds it
    objective: str = "span_corruption"  # one of data.objectives.OBJECTIVES
    input_length: int = 512  # tokens per model input row (encoder input for span corruption)
    batch_size: int = 32  # rows per batch on each rank
    noise_density: float = 0.15  # span corruption: share of tokens replaced
    mean_noise_span_length: float = 3.0  # span corruption: mean span length
    mlm_probability: float = 0.15  # masked LM: share of ordinary tokens chosen
    seed: int = 0  # order and objective randomness; the same on every rank
    shuffle_shards: bool = True  # permute shards each epoch
    shuffle_buffer: int = 1000  # documents in the bounded shuffle buffer; <= 1 keeps shard order
    num_workers: int = 0  # DataLoader worker processes per rank
    prefetch_factor: int = 4  # batches prefetched per worker (ignored without workers)
    pin_memory: bool = False  # page-locked batches for fast host-to-GPU copies
    verify_sha256: bool = True  # hash every shard at start (size and structure are always checked)
    allow_remote: bool = False  # accept http(s)://, s3://, gs://, hf:// shard URLs
    allow_pipe: bool = False  # accept "pipe:" shard commands (they run a shell command)
    allow_shell_characters: bool = False  # accept shell metacharacters (SHELL_METACHARACTERS) in shard paths
    max_epochs: int | None = None  # `for batch in stream` stops after this many epochs; None = never

    @classmethod
    def from_dict(cls, values: dict) -> "StreamConfig":
        """From a plain mapping (YAML); unknown keys are errors."""
        return strict.build(cls, values, "stream")

    def __post_init__(self) -> None:
        if self.objective not in objectives.OBJECTIVES:
            raise DataError(f"stream.objective={self.objective!r}: choose one of {objectives.OBJECTIVES}")
        if self.input_length < 3 or self.batch_size < 1 or self.num_workers < 0:
            raise DataError("stream.input_length >= 3, stream.batch_size >= 1, stream.num_workers >= 0")

    @property
    def raw_length(self) -> int:
        """Tokens per packed row before the objective."""
        if self.objective == "span_corruption":
            return objectives.span_corruption_lengths(
                self.input_length, self.noise_density, self.mean_noise_span_length
            )[0]
        if self.objective == "causal_lm":
            return self.input_length + 1
        return self.input_length

    @property
    def target_length(self) -> int:
        """Decoder length for span corruption; input_length otherwise."""
        if self.objective == "span_corruption":
            return objectives.span_corruption_lengths(
                self.input_length, self.noise_density, self.mean_noise_span_length
            )[1]
        return self.input_length


def check_shard_paths(
    manifest: Manifest, *, allow_pipe: bool = False, allow_remote: bool = False, allow_shell_characters: bool = False
) -> None:
    """Refuse (DataError) shard paths that would run a command or fetch from the network unless
    allowed. Call it before anything opens a shard: verifying a `pipe:` shard runs it."""
    for shard in manifest.shards:
        if shard.path.startswith("pipe:"):
            if not allow_pipe:
                raise DataError(
                    f"shard {shard.path!r} is a pipe: command; set data.allow_pipe=true (StreamConfig."
                    "allow_pipe) to run it"
                )
            continue  # a pipe: command is shell by definition; allow_pipe accepted that
        if shard.path.startswith(_REMOTE_PREFIXES) and not allow_remote:
            raise DataError(
                f"shard {shard.path!r} is remote; set data.allow_remote=true (StreamConfig.allow_remote) to fetch it"
            )
        if "://" in shard.path and not shard.path.startswith(_REMOTE_PREFIXES):
            raise DataError(f"shard {shard.path!r}: unsupported URL scheme")
        found = sorted(set(shard.path) & SHELL_METACHARACTERS)
        if found and not allow_shell_characters:
            raise DataError(
                f"shard {shard.path!r} holds shell metacharacter(s) {''.join(found)!r}; refused so that no "
                "manifest can smuggle a command. Rename the shard, or set data.allow_shell_characters=true "
                "(StreamConfig.allow_shell_characters) if the manifest is yours"
            )


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; otherwise RANK / WORLD_SIZE from the environment; otherwise 0 / 1."""
    world = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", 1))
    rank = int(rank if rank is not None else os.environ.get("RANK", 0))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of size {world}")
    return rank, world


# ------------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Documents of one epoch in stream order, and where each starts in the packed token stream."""

    shard: np.ndarray  # int64 (D,): position of the document's shard in the manifest
    member: np.ndarray  # int64 (D,): index of the document in its shard
    start: np.ndarray  # int64 (D,): offset of its first token in the epoch's token stream
    length: np.ndarray  # int64 (D,): its tokens (eos not counted)
    rows: int  # full rows of raw_length tokens in the epoch


def buffered_shuffle(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Order produced by a shuffle buffer of `buffer_size` over items 0..n-1 (webdataset-style):
    fill the buffer, emit a random slot, refill it with the next item. Displacement is bounded."""
    if buffer_size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    picks = rng.random(n)
    buffer = list(range(min(buffer_size, n)))
    upcoming = len(buffer)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        slot = int(picks[i] * len(buffer))
        out[i] = buffer[slot]
        if upcoming < n:
            buffer[slot] = upcoming
            upcoming += 1
        else:
            buffer[slot] = buffer[-1]
            buffer.pop()
    return out


def plan_epoch(indices: dict[int, ShardIndex], epoch: int, config: StreamConfig) -> EpochPlan:
    """The epoch's document order: a pure function of (config.seed, epoch) and the good shards."""
    rng = np.random.default_rng([config.seed, epoch, 0x5EED])
    positions = np.array(sorted(indices), dtype=np.int64)
    if config.shuffle_shards:
        positions = rng.permutation(positions)
    shard = np.concatenate([np.full(len(indices[p].lengths), p, dtype=np.int64) for p in positions])
    member = np.concatenate([np.arange(len(indices[p].lengths), dtype=np.int64) for p in positions])
    length = np.concatenate([np.asarray(indices[p].lengths, dtype=np.int64) for p in positions])
    order = buffered_shuffle(len(shard), config.shuffle_buffer, rng)
    shard, member, length = shard[order], member[order], length[order]
    start = np.concatenate(([0], np.cumsum(length + 1)[:-1])).astype(np.int64)  # +1: eos
    total = int(length.sum()) + len(length)
    return EpochPlan(shard=shard, member=member, start=start, length=length, rows=total // config.raw_length)


# ---------------------------------------------------------------------------------- the workers


class ShardReader:
    """Reads one document's tokens by (shard, document) through the verified index.

    A document is read as part of its member (a version-2 member pair's token data, or a version-1
    document's own member): the member is read whole (one seek + read), checked, and kept in a
    small cache while its documents are read. Its checks: the whole member was read (the file may
    have changed after verification), its crc32 is the index's (version 2), and no id reaches the
    vocabulary size. A member that fails them loses all its documents (`UnreadableDocument` lists
    them). Local shards are read through a small pool of open files; allowed remote or pipe:
    shards are fetched whole through webdataset's opener and the last few are kept in memory.
    """

    def __init__(
        self, manifest: Manifest, indices: dict[int, ShardIndex], max_open: int = 8, max_cached_bytes: int = 32 << 20
    ):
        self.manifest, self.indices, self.max_open = manifest, indices, max_open
        self.max_cached_bytes = max_cached_bytes
        self.dtype = np.dtype(manifest.dtype).newbyteorder("<")
        self._open: OrderedDict[int, object] = OrderedDict()
        self._members: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cached_bytes = 0
        self._failed: dict[tuple[int, int], str] = {}  # (shard, member) -> reason

    def _handle(self, shard: int):
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        url = self.manifest.shard_url(self.manifest.shards[shard])
        local = "://" not in url and not url.startswith("pipe:")
        handle = open(url, "rb") if local else memoryview(read_shard_bytes(url))
        self._open[shard] = handle
        if len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            if hasattr(old, "close"):
                old.close()
        return handle

    def read(self, shard: int, document: int) -> np.ndarray:
        """The document's token ids (int64); UnreadableDocument if its member no longer yields them."""
        index = self.indices[shard]
        member = index.member_of(document)
        tokens, starts = self._member(shard, member)
        i = document - int(index.member_first[member])
        return tokens[starts[i] : starts[i + 1]].astype(np.int64)

    def _member(self, shard: int, member: int) -> tuple[np.ndarray, np.ndarray]:
        """The member's token ids as stored and where each of its documents starts in them."""
        key = (shard, member)
        cached = self._members.get(key)
        if cached is not None:
            self._members.move_to_end(key)
            return cached
        index = self.indices[shard]
        documents = index.member_documents(member)
        if key not in self._failed:
            lengths = index.lengths[documents.start : documents.stop]
            starts = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
            try:
                tokens = self._load(shard, member, int(starts[-1]))
            except UnreadableDocument as error:
                self._failed[key] = str(error)
            else:
                self._members[key] = (tokens, starts)
                self._cached_bytes += tokens.nbytes
                while self._cached_bytes > self.max_cached_bytes and len(self._members) > 1:
                    _, (old, _) = self._members.popitem(last=False)
                    self._cached_bytes -= old.nbytes
                return tokens, starts
        raise UnreadableDocument(self._failed[key], documents)

    def _load(self, shard: int, member: int, count: int) -> np.ndarray:
        index = self.indices[shard]
        offset, nbytes = int(index.member_offsets[member]), count * self.dtype.itemsize
        try:
            handle = self._handle(shard)
            if isinstance(handle, memoryview):
                data = handle[offset : offset + nbytes]
            else:
                handle.seek(offset)
                data = handle.read(nbytes)
        except OSError as error:
            self._open.pop(shard, None)
            raise UnreadableDocument(f"unreadable ({error.strerror or error})") from None
        if len(data) != nbytes:
            raise UnreadableDocument(f"short read ({len(data)} of {nbytes} bytes): the file changed after verification")
        ids = np.frombuffer(data, dtype=self.dtype)
        # An id past the vocabulary would index outside the embedding on one rank only.
        vocab = self.manifest.special.vocab_size
        too_large = f"token id {int(ids.max())} >= vocabulary size {vocab}" if count and ids.max() >= vocab else None
        if index.member_crc32 is not None:
            crc = zlib.crc32(data)
            if crc != index.member_crc32[member]:
                raise UnreadableDocument(
                    f"crc32 {crc:08x} differs from the index's {int(index.member_crc32[member]):08x}: the file "
                    "changed after verification" + (f" (it holds {too_large})" if too_large else "")
                )
        if too_large:
            raise UnreadableDocument(too_large)
        return ids

    def close(self) -> None:
        for handle in self._open.values():
            if hasattr(handle, "close"):
                handle.close()
        self._open.clear()
        self._members.clear()
        self._cached_bytes = 0


def _report(lost: list, reader: ShardReader, shard: int, error: UnreadableDocument) -> None:
    """Append (shard path, document, reason) for every document the error lost, once each."""
    path = reader.manifest.shards[shard].path
    known = {(entry[0], entry[1]) for entry in lost}
    lost.extend((path, d, str(error)) for d in error.documents if (path, d) not in known)


def read_rows(
    plan: EpochPlan,
    reader: ShardReader,
    first_row: int,
    num_rows: int,
    raw_length: int,
    eos_id: int,
    lost: list | None = None,
) -> np.ndarray:
    """Rows [first_row, first_row + num_rows) of the epoch's packed token stream: (num_rows, raw).

    An unreadable document's place is filled by `_stand_in`, so the rows keep their shape and
    their place in the epoch; every document its member lost is appended to `lost` as (shard
    path, document, reason).
    """
    begin, end = first_row * raw_length, (first_row + num_rows) * raw_length
    # Documents overlapping [begin, end): the last one starting at or before `begin`, up to the
    # last one starting before `end`.
    lo = int(np.searchsorted(plan.start, begin, side="right")) - 1
    hi = int(np.searchsorted(plan.start, end, side="left"))
    eos = np.array([eos_id], dtype=np.int64)
    lost = [] if lost is None else lost
    pieces = []
    for d in range(lo, hi):
        try:
            pieces.append(reader.read(int(plan.shard[d]), int(plan.member[d])))
        except UnreadableDocument as error:
            _report(lost, reader, int(plan.shard[d]), error)
            pieces.append(_stand_in(plan, reader, d, min(int(plan.length[d]), end - int(plan.start[d])), eos, lost))
        pieces.append(eos)
    stream = np.concatenate(pieces)
    offset = begin - int(plan.start[lo])
    return stream[offset : offset + num_rows * raw_length].reshape(num_rows, raw_length)


def _stand_in(plan: EpochPlan, reader: ShardReader, d: int, count: int, eos: np.ndarray, lost: list) -> np.ndarray:
    """`count` tokens to stand in for unreadable document d: the documents after it in the epoch's
    order (with their eos), wrapping around. Every rank that needs d builds the same stand-in, and
    the tokens come from the stream itself, so no padding is ever trained on; they are seen twice."""
    pieces, have = [], 0
    for step in range(1, len(plan.shard)):
        if have >= count:
            break
        k = (d + step) % len(plan.shard)
        try:
            pieces.append(reader.read(int(plan.shard[k]), int(plan.member[k])))
        except UnreadableDocument as error:
            _report(lost, reader, int(plan.shard[k]), error)
            continue
        pieces += [eos]
        have += len(pieces[-2]) + 1
    if have < count:
        raise UnreadableDocument(
            "no readable document left in the epoch; check the shards with `performer data verify`"
        )
    return np.concatenate(pieces)[:count]


def make_batch(
    rows: np.ndarray, row_ids: np.ndarray, epoch: int, config: StreamConfig, special
) -> dict[str, torch.Tensor]:
    """Apply the objective to each packed row; row k's RNG is seeded with (seed, epoch, k)."""
    batch_size = len(rows)
    if config.objective == "causal_lm":
        inputs, labels = rows[:, :-1], rows[:, 1:]
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
            "attention_mask": torch.ones(inputs.shape, dtype=torch.bool),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        }
    rngs = [np.random.default_rng([config.seed, epoch, int(k), 0x0B7]) for k in row_ids]
    if config.objective == "masked_lm":
        pairs = [objectives.masked_lm(row, special, rng, config.mlm_probability) for row, rng in zip(rows, rngs)]
        inputs = np.stack([p[0] for p in pairs])
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.ones(inputs.shape, dtype=torch.bool),
            "labels": torch.from_numpy(np.stack([p[1] for p in pairs])),
        }
    pairs = [
        objectives.span_corruption(row, special, rng, config.noise_density, config.mean_noise_span_length)
        for row, rng in zip(rows, rngs)
    ]
    inputs = np.stack([p[0] for p in pairs])
    targets = np.stack([p[1] for p in pairs])
    decoder_inputs = np.empty_like(targets)
    decoder_inputs[:, 0] = special.bos_id
    decoder_inputs[:, 1:] = targets[:, :-1]
    assert inputs.shape == (batch_size, config.input_length), inputs.shape
    return {
        "input_ids": torch.from_numpy(inputs),
        "attention_mask": torch.ones(inputs.shape, dtype=torch.bool),
        "decoder_input_ids": torch.from_numpy(decoder_inputs),
        "labels": torch.from_numpy(targets),
    }


class _RankEpoch(IterableDataset):
    """Batches [0, steps) of one rank for one epoch segment; worker w builds i = w, w+N, ..."""

    def __init__(self, manifest, indices, plan, config, epoch, cursor, steps, rank, world):
        super().__init__()
        self.manifest, self.indices, self.plan, self.config = manifest, indices, plan, config
        self.epoch, self.cursor, self.steps, self.rank, self.world = epoch, cursor, steps, rank, world

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader(self.manifest, self.indices)
        size = self.config.batch_size
        try:
            for i in range(worker, self.steps, workers):
                first = self.cursor + (i * self.world + self.rank) * size
                lost: list = []
                rows = read_rows(
                    self.plan, reader, first, size, self.config.raw_length, self.manifest.special.eos_id, lost
                )
                row_ids = np.arange(first, first + size)
                batch = make_batch(rows, row_ids, self.epoch, self.config, self.manifest.special)
                # Travels with its batch through the DataLoader workers; TokenStream takes it off.
                batch[LOST_KEY] = [list(entry) for entry in lost]
                yield batch
        finally:
            reader.close()


# ----------------------------------------------------------------------------------- the stream


def documents_phrase(documents: list[int]) -> str:
    """ "document 5", "documents 0-7" (a member's documents are consecutive) or "3 documents (2, 9, ...)"."""
    documents = sorted(documents)
    if len(documents) == 1:
        return f"document {documents[0]}"
    if documents[-1] - documents[0] == len(documents) - 1:
        return f"documents {documents[0]}-{documents[-1]}"
    shown = ", ".join(map(str, documents[:5])) + (", ..." if len(documents) > 5 else "")
    return f"{len(documents)} documents ({shown})"


class TokenStream:
    """One rank's view of a sharded split: fixed-shape batches, exact resume (module docstring)."""

    def __init__(self, config: StreamConfig, *, rank: int | None = None, world_size: int | None = None):
        self.config = config
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.manifest = Manifest.load(config.manifest)
        self._check_urls()
        self.indices, errors = verify_manifest(self.manifest, check_sha256=config.verify_sha256, full=False)
        mismatched = sorted(path for path, error in errors.items() if isinstance(error, ShardChecksumError))
        if mismatched:
            raise DataError(
                f"{len(mismatched)} shard(s) of {config.manifest} have the manifest's size but not its sha256 "
                f"(first: {mismatched[0]}: {errors[mismatched[0]]}): another file or silent corruption. Restore "
                "them from the source or rebuild the split with `performer data shards`; `performer data verify "
                "DIR` lists every bad shard. To train on them as they are, set data.verify_sha256=false "
                "(sizes and tar structure are still checked, token ids on every read)"
            )
        self.bad_shards: dict[str, str] = {path: str(error) for path, error in errors.items()}
        self.lost_documents: dict[tuple[str, int], str] = {}  # (shard path, document) -> reason
        for path, reason in sorted(self.bad_shards.items()):
            warnings.warn(f"skipping corrupt shard {path}: {reason}", RuntimeWarning, stacklevel=2)
        self._require_good_shards()
        if config.objective == "span_corruption":
            spans = objectives._noise_counts(config.raw_length, config.noise_density, config.mean_noise_span_length)[1]
            if spans > self.manifest.special.num_sentinels:
                raise ValueError(
                    f"input_length {config.input_length} needs {spans} sentinels but the tokenizer has "
                    f"{self.manifest.special.num_sentinels}; train one with more sentinels"
                )
        self.epoch = 0  # current epoch
        self.cursor = 0  # rows of the current epoch consumed by all ranks together
        self._plan_cache: tuple[int, EpochPlan] | None = None

    def _require_good_shards(self) -> None:
        if not self.indices:
            first = next(iter(self.bad_shards.items()))
            raise DataError(
                f"all {len(self.manifest.shards)} shards of {self.config.manifest} failed verification "
                f"(first: {first[0]}: {first[1]}); rebuild them with `performer data shards`"
            )

    def _check_urls(self) -> None:
        check_shard_paths(
            self.manifest,
            allow_pipe=self.config.allow_pipe,
            allow_remote=self.config.allow_remote,
            allow_shell_characters=self.config.allow_shell_characters,
        )

    def exclude_shards(self, reasons: dict[str, str]) -> None:
        """Leave these shards (path -> reason) out from now on, e.g. ones another rank found bad, so
        that every rank plans the same epochs. The current epoch is re-planned: call it before
        iterating (the trainer does, once, at start-up)."""
        positions = {shard.path: p for p, shard in enumerate(self.manifest.shards)}
        for path, reason in sorted(reasons.items()):
            if path in self.bad_shards:
                continue
            self.bad_shards[path] = reason
            self.indices.pop(positions[path], None)
            warnings.warn(f"skipping corrupt shard {path}: {reason}", RuntimeWarning, stacklevel=2)
        self._plan_cache = None
        self._require_good_shards()

    @property
    def lost_samples(self) -> int:
        """Documents this stream cannot train on: those of skipped shards and unreadable ones found
        while reading (this rank's view; a trainer sums the latter over ranks)."""
        by_path = {shard.path: shard.samples for shard in self.manifest.shards}
        return sum(by_path[path] for path in self.bad_shards) + len(self.lost_documents)

    # --- sizes -------------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, plan_epoch(self.indices, epoch, self.config))
        return self._plan_cache[1]

    @property
    def rows_per_epoch(self) -> int:
        """Packed rows per epoch (the same every epoch: the order changes, the tokens do not)."""
        return self.plan(self.epoch).rows

    @property
    def steps_per_epoch(self) -> int:
        """Batches every rank yields in a whole epoch at this world size."""
        return self.rows_per_epoch // (self.world_size * self.config.batch_size)

    @property
    def steps_left_in_epoch(self) -> int:
        return (self.rows_per_epoch - self.cursor) // (self.world_size * self.config.batch_size)

    # --- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.steps_per_epoch == 0:
            # Otherwise an endless loop of empty epochs.
            raise ValueError(
                f"{self.config.manifest} packs into {self.rows_per_epoch} rows per epoch, fewer than one "
                f"step of {self.world_size} rank(s) x batch_size {self.config.batch_size}; lower the "
                "batch size or input_length, or use more data"
            )
        while self.config.max_epochs is None or self.epoch < self.config.max_epochs:
            yield from self.iter_epoch()

    def iter_epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """The remaining batches of the current epoch; afterwards the stream is at the next epoch.
        Use one iterator at a time: each advances the stream's cursor."""
        epoch, start, steps = self.epoch, self.cursor, self.steps_left_in_epoch
        rows_per_step = self.world_size * self.config.batch_size
        dataset = _RankEpoch(
            self.manifest, self.indices, self.plan(epoch), self.config, epoch, start, steps, self.rank, self.world_size
        )
        workers = self.config.num_workers
        loader = DataLoader(
            dataset,
            batch_size=None,  # workers yield whole batches
            num_workers=workers,
            prefetch_factor=self.config.prefetch_factor if workers else None,
            pin_memory=self.config.pin_memory,
        )
        for i, batch in enumerate(loader):
            self.cursor = start + (i + 1) * rows_per_step
            new: dict[tuple[str, str], list[int]] = {}  # (path, reason) -> documents newly lost
            for path, document, reason in batch.pop(LOST_KEY):
                if (path, int(document)) not in self.lost_documents:
                    self.lost_documents[(path, int(document))] = reason
                    new.setdefault((path, reason), []).append(int(document))
            for (path, reason), documents in new.items():
                warnings.warn(
                    f"shard {path}: {documents_phrase(documents)} lost ({reason}); replaced by the documents "
                    "after them",
                    RuntimeWarning,
                    stacklevel=2,
                )
            yield batch
        self.epoch, self.cursor = epoch + 1, 0

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the stream stands; the same on every rank. JSON-serialisable."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.config.seed,
            "raw_length": self.config.raw_length,
            "shuffle_shards": self.config.shuffle_shards,
            "shuffle_buffer": self.config.shuffle_buffer,
            "manifest_fingerprint": self.manifest.fingerprint,
            "skipped_shards": sorted(self.bad_shards),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from any rank, any world size). Raises if it belongs to other data
        or another order: resuming then would silently repeat or skip samples."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "raw_length", "shuffle_shards", "shuffle_buffer", "manifest_fingerprint"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"stream state has {key}={state[key]!r} but this stream has {mine[key]!r}; "
                    "resume with the config and shards the state was saved with"
                )
        if state["skipped_shards"] != mine["skipped_shards"]:
            warnings.warn(
                f"shards skipped when the state was saved {state['skipped_shards']} differ from now "
                f"{mine['skipped_shards']}; the epoch's order has changed",
                RuntimeWarning,
                stacklevel=2,
            )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor <= self.plan(epoch).rows:
            raise ValueError(f"stream state cursor {cursor} is outside epoch {epoch}'s {self.plan(epoch).rows} rows")
        self.epoch, self.cursor = epoch, cursor
