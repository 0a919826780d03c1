"""Shards -> one rank's fixed-shape batches, exactly once per epoch, resumable.

Public API::

    stream = TokenStream(StreamConfig(manifest="out/train"), rank=None, world_size=None, gather=None)
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
1. Verify. At construction the split's index is memory-mapped and checked against the manifest
   (a missing, stale or damaged index is a DataError), and the shards are verified against both
   without parsing a tar (size, sha256, that the index's members fit in the file, the first
   member's header; `data.shards.verify_shard` with full=False; version-1 splits, which have no
   index, parse every tar header as before). Given a `gather` (a trainer's ranks), each rank
   verifies 1/W of the shards and the verdicts are gathered, so every rank acts on the same ones.
   Damaged shards (missing, empty, truncated, cut at a member boundary, not a tar) are reported
   by name, counted (`bad_shards`, `lost_samples`) and left out of the plan on every rank. A
   shard of the right size whose sha256 differs is a DataError instead, on every rank: it is
   another file in the shard's place or silent corruption, and training on it would quietly
   change the data the manifest (and every checkpoint's cursor) promises. No good shard at all is
   a DataError. A member that turns out unreadable later (the file changed after verification:
   short read, crc32 other than the index's; or a token id >= the vocabulary size) loses its
   documents: each is replaced in place by the tokens that follow it in its window's order, so
   every row keeps its shape and every rank its number of batches; they are reported by (shard,
   document) and counted (`lost_documents`), and their tokens are lost, nothing else.
2. Order (`data.plan`). Epoch e's document order is a pure function of (seed, e), planned in
   O(shards): the good shards permuted and cut into windows of `interleave_shards`, each window's
   documents interleaved from all its shards, built only by the reader that needs it. Documents
   are concatenated with eos after each and cut into rows of `raw_length` tokens (568 for span
   corruption at 512): row k is tokens [k*raw, (k+1)*raw) of that stream. Every token count
   comes from the manifest and the index, so nothing is read to plan.
3. Cursor. The state is (epoch, cursor) where cursor = rows of the epoch consumed by all ranks
   together. After the cursor, consecutive groups of `batch_size` rows are dealt round-robin:
   batch i of rank r holds rows cursor + (i*W + r)*B ... + B-1. Each rank yields exactly
   floor((rows - cursor) / (W*B)) batches per epoch; the last < W*B rows of an epoch are
   dropped (the defined remainder; at most W*B-1 rows). Equal counts whatever the shard sizes,
   shards per rank or workers.
4. Workers. DataLoader worker w of N builds batches j = w, w+N, ... of its rank; the DataLoader
   returns them in order j = 0, 1, 2, ..., so a batch does not depend on the number of
   workers. `for batch in stream` uses one DataLoader across epochs, so workers run on into the
   next epoch without a restart. Reading, packing, the objective and batching all happen inside
   workers; a worker reads only the members holding the documents that overlap its rows (seek +
   read of each member, at most ~1 MiB, cached while the window reads from it).
5. Randomness. The objective's RNG for row k of epoch e is seeded with (seed, e, k), so a row
   is corrupted the same way whoever builds it.
6. Mixtures (`sources`, `data.mixture`). Row k of a blend comes from a source chosen by a
   function of (weights, seed, k), and is that source's next row in its own epochs (each source
   runs through its epochs exactly once each, in its own order); it is seeded (seed, e, r,
   source) with e, r the source's epoch and row. The cursor counts rows of the blend (the epoch
   stays 0): rows per source follow from it (`source_rows`). Sources must share a tokenizer.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data import objectives
from data.errors import DataError
from data.mixture import Mixture, SourceConfig
from data.plan import ShardSizes, SplitOrder, Window
from data.shards import Manifest, ShardChecksumError, ShardError, ShardIndex, read_shard_bytes, verify_manifest
from performer import strict

STATE_VERSION = 2  # 1: epochs planned with a document shuffle buffer (loaded with a warning)
_OBJECTIVE_KEY = 0x0B7
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
    manifest: str | None = None  # manifest.json of a split, or the directory that holds it
    sources: tuple[SourceConfig, ...] = ()  # instead of manifest: a weighted mixture of splits
    objective: str = "span_corruption"  # one of data.objectives.OBJECTIVES
    input_length: int = 512  # tokens per model input row (encoder input for span corruption)
    batch_size: int = 32  # rows per batch on each rank
    noise_density: float = 0.15  # span corruption: share of tokens replaced
    mean_noise_span_length: float = 3.0  # span corruption: mean span length
    mlm_probability: float = 0.15  # masked LM: share of ordinary tokens chosen
    seed: int = 0  # order and objective randomness; the same on every rank
    shuffle: bool = True  # permute shards, blocks and documents each epoch; false keeps the split's order
    interleave_shards: int = 32  # shards whose documents are interleaved in each window of an epoch
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
        if self.input_length < 3 or self.batch_size < 1 or self.num_workers < 0 or self.interleave_shards < 1:
            raise DataError(
                "stream.input_length >= 3, stream.batch_size >= 1, stream.num_workers >= 0, "
                "stream.interleave_shards >= 1"
            )
        if (self.manifest is None) == (not self.sources):
            raise DataError("give stream.manifest (one split) or stream.sources (a mixture), not both or neither")

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


# ----------------------------------------------------------------------------------- the sources


class ShardIndices(Mapping):
    """The good shards' indices by manifest position. A version-2 split builds each from its
    memory-mapped index when first asked (and keeps the last few), so no rank holds them all;
    a version-1 split holds the ones its verification parsed."""

    def __init__(self, manifest: Manifest, parsed: dict[int, ShardIndex], good: Sequence[int], cached: int = 256):
        self.manifest, self.parsed, self.cached = manifest, parsed, cached
        self.good = frozenset(int(p) for p in good)
        self._built: OrderedDict[int, ShardIndex] = OrderedDict()

    def __getitem__(self, position: int) -> ShardIndex:
        if position not in self.good:
            raise KeyError(position)
        if position in self.parsed:
            return self.parsed[position]
        index = self._built.get(position)
        if index is None:
            index = self.manifest.split_index.shard(position, self.manifest.itemsize)
            self._built[position] = index
            while len(self._built) > self.cached:
                self._built.popitem(last=False)
        return index

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.good))

    def __len__(self) -> int:
        return len(self.good)

    def __contains__(self, position) -> bool:
        return position in self.good

    def lengths(self, position: int) -> np.ndarray:
        """Token count of each document of the shard (a memory-mapped slice for version 2)."""
        if position in self.parsed:
            return self.parsed[position].lengths
        (first, _), (stop, _) = self.manifest.split_index.shards[position : position + 2]
        return self.manifest.split_index.documents[first:stop]


class Source:
    """One prepared split of a stream: its manifest, its good shards and their order.

    `label` names a shard in reports: its path, or "name:path" in a mixture (two splits may hold
    shards of the same name). Build it, `verify` a share of its shards, `exclude` what any rank
    found bad, then `plan`.
    """

    def __init__(self, manifest: Manifest, name: str, weight: float, in_mixture: bool):
        self.manifest, self.name, self.weight, self.in_mixture = manifest, name, weight, in_mixture
        self.parsed: dict[int, ShardIndex] = {}
        self.bad: dict[str, str] = {}  # shard path -> reason
        self.indices: ShardIndices | None = None
        self.order: SplitOrder | None = None

    def label(self, path: str) -> str:
        return f"{self.name}:{path}" if self.in_mixture else path

    def verify(self, positions: Sequence[int], check_sha256: bool) -> dict[str, ShardError]:
        """Verify the shards at these positions (all of a version-1 split, whose plan needs every
        shard's parsed index): the errors by path."""
        if self.manifest.version == 1:
            positions = range(len(self.manifest.shards))
        parsed, errors = verify_manifest(self.manifest, check_sha256=check_sha256, full=False, positions=positions)
        if self.manifest.version == 1:
            self.parsed = parsed
        return errors

    def exclude(self, reasons: dict[str, str]) -> list[str]:
        """Leave these shards (path -> reason) out; the paths newly left out."""
        new = sorted(path for path in reasons if path not in self.bad)
        self.bad.update({path: reasons[path] for path in new})
        return new

    def plan(self, config: "StreamConfig") -> None:
        """The good shards' sizes and the order over them (O(shards))."""
        good = [p for p, shard in enumerate(self.manifest.shards) if shard.path not in self.bad]
        self.indices, self.order = None, None
        if not good:
            return
        self.indices = ShardIndices(self.manifest, self.parsed, good)
        shards = [self.manifest.shards[p] for p in good]
        sizes = ShardSizes(
            positions=np.array(good, dtype=np.int64),
            documents=np.array([s.documents for s in shards], dtype=np.int64),
            tokens=np.array([s.tokens for s in shards], dtype=np.int64),
        )
        self.order = SplitOrder(
            sizes,
            self.indices.lengths,
            seed=config.seed,
            raw_length=config.raw_length,
            interleave_shards=config.interleave_shards,
            shuffle=config.shuffle,
        )

    def reader(self, interleave_shards: int) -> "ShardReader":
        # A window reads one or two members of each of its shards at a time: keep them all cached.
        member_bytes = int(self.manifest.writer.get("max_bytes_per_member", 1 << 20))
        return ShardReader(
            self.manifest, self.indices, max_cached_bytes=max(32 << 20, (interleave_shards + 2) * 2 * member_bytes)
        )


def source_name(manifest: str) -> str:
    """A mixture source's default name: the directory holding the split (OUT of OUT/train)."""
    path = Path(manifest)
    split = path.parent if path.name == "manifest.json" else path
    return split.resolve().parent.name or split.name


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


def _report(lost: list, reader: ShardReader, source: Source, shard: int, error: UnreadableDocument) -> None:
    """Append (shard label, document, reason) for every document the error lost, once each."""
    label = source.label(reader.manifest.shards[shard].path)
    known = {(entry[0], entry[1]) for entry in lost}
    lost.extend((label, d, str(error)) for d in error.documents if (label, d) not in known)


def read_rows(
    source: Source,
    reader: ShardReader,
    epoch: int,
    first_row: int,
    num_rows: int,
    raw_length: int,
    eos_id: int,
    lost: list | None = None,
) -> np.ndarray:
    """Rows [first_row, first_row + num_rows) of the epoch's packed token stream: (num_rows, raw).

    An unreadable document's place is filled by `_stand_in`, so the rows keep their shape and
    their place in the epoch; every document its member lost is appended to `lost` as (shard
    label, document, reason).
    """
    begin, end = first_row * raw_length, (first_row + num_rows) * raw_length
    eos = np.array([eos_id], dtype=np.int64)
    lost = [] if lost is None else lost
    pieces = []
    documents = source.order.documents(epoch, begin, end)
    for window, first, stop in documents:
        for d in range(first, stop):
            shard, document = int(window.shard[d]), int(window.document[d])
            try:
                pieces.append(reader.read(shard, document))
            except UnreadableDocument as error:
                _report(lost, reader, source, shard, error)
                count = min(int(window.length[d]), end - int(window.start[d]))
                pieces.append(_stand_in(source, window, reader, d, count, eos, lost))
            pieces.append(eos)
    stream = np.concatenate(pieces)
    window, first, _ = documents[0]
    offset = begin - int(window.start[first])
    return stream[offset : offset + num_rows * raw_length].reshape(num_rows, raw_length)


def _stand_in(
    source: Source, window: Window, reader: ShardReader, d: int, count: int, eos: np.ndarray, lost: list
) -> np.ndarray:
    """`count` tokens to stand in for unreadable document d: the documents after it in its window's
    order (with their eos), wrapping around. Every rank that needs d builds the same stand-in, and
    the tokens come from the stream itself, so no padding is ever trained on; they are seen twice."""
    pieces, have = [], 0
    for step in range(1, len(window)):
        if have >= count:
            break
        k = (d + step) % len(window)
        shard = int(window.shard[k])
        try:
            pieces.append(reader.read(shard, int(window.document[k])))
        except UnreadableDocument as error:
            _report(lost, reader, source, shard, error)
            continue
        pieces += [eos]
        have += len(pieces[-2]) + 1
    if have < count:
        raise UnreadableDocument(
            "no readable document left in its window of the epoch; check the shards with `performer data verify`"
        )
    return np.concatenate(pieces)[:count]


def make_batch(
    rows: np.ndarray, row_seeds: Sequence[Sequence[int]], config: StreamConfig, special
) -> dict[str, torch.Tensor]:
    """Apply the objective to each packed row; row i's RNG is seeded with row_seeds[i]."""
    batch_size = len(rows)
    if config.objective == "causal_lm":
        inputs, labels = rows[:, :-1], rows[:, 1:]
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
            "attention_mask": torch.ones(inputs.shape, dtype=torch.bool),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        }
    rngs = [np.random.default_rng(list(seed)) for seed in row_seeds]
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


class RowBuilder:
    """Builds the global rows of a stream: one split's epochs, or a mixture's blend."""

    def __init__(self, sources: list[Source], config: StreamConfig, mixture: Mixture | None):
        self.sources, self.config, self.mixture = sources, config, mixture
        self.special = sources[0].manifest.special
        self._readers: list[ShardReader] | None = None

    def _reader(self, s: int) -> ShardReader:
        if self._readers is None:
            self._readers = [source.reader(self.config.interleave_shards) for source in self.sources]
        return self._readers[s]

    def close(self) -> None:
        for reader in self._readers or ():
            reader.close()
        self._readers = None

    def rows(self, epoch: int, first: int, count: int, lost: list) -> tuple[np.ndarray, list[tuple[int, ...]]]:
        """Rows [first, first + count) and each row's objective seed. One split: rows of its epoch,
        seeded (seed, epoch, row). A mixture (``epoch`` unused): rows of the blend, each read from
        its source's own epoch e and row r, seeded (seed, e, r, source)."""
        raw, eos, seed = self.config.raw_length, self.special.eos_id, self.config.seed
        if self.mixture is None:
            rows = read_rows(self.sources[0], self._reader(0), epoch, first, count, raw, eos, lost)
            return rows, [(seed, epoch, k, _OBJECTIVE_KEY) for k in range(first, first + count)]
        sources, source_rows = self.mixture.assign(first, count)
        rows, seeds = np.empty((count, raw), dtype=np.int64), []
        for i, (s, j) in enumerate(zip(sources.tolist(), source_rows.tolist())):
            e, r = divmod(j, self.sources[s].order.rows)
            rows[i] = read_rows(self.sources[s], self._reader(s), e, r, 1, raw, eos, lost)[0]
            seeds.append((seed, e, r, _OBJECTIVE_KEY, s))
        return rows, seeds


class _RankBatches(IterableDataset):
    """Batches j = 0, 1, ... of one rank from a starting point; worker w of N builds j = w, w+N, ...

    `segments(j)` maps j to (epoch, cursor at the epoch's start of iteration, index in the epoch):
    batch j holds rows cursor + (i*W + rank)*B ... + B-1 of that epoch (or of a mixture's blend).
    """

    def __init__(self, builder: RowBuilder, positions, total: int | None, rank: int, world: int):
        super().__init__()
        self.builder, self.positions, self.total, self.rank, self.world = builder, positions, total, rank, world

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        size = self.builder.config.batch_size
        try:
            j = worker
            while self.total is None or j < self.total:
                epoch, cursor, i = self.positions(j)
                first = cursor + (i * self.world + self.rank) * size
                lost: list = []
                rows, seeds = self.builder.rows(epoch, first, size, lost)
                batch = make_batch(rows, seeds, self.builder.config, self.builder.special)
                # Travels with its batch through the DataLoader workers; TokenStream takes it off.
                batch[LOST_KEY] = [list(entry) for entry in lost]
                yield batch
                j += workers
        finally:
            self.builder.close()


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


Gather = Callable[[object], list]


class TokenStream:
    """One rank's view of a sharded split or a mixture: fixed-shape batches, exact resume (module docstring).

    ``gather``: where the ranks can talk (a trainer), a function that takes this rank's object and
    returns every rank's, in rank order (like torch.distributed.all_gather_object). With it each
    rank verifies 1/W of the shards and all ranks act on the gathered verdicts; without it every
    rank verifies every shard.
    """

    def __init__(
        self,
        config: StreamConfig,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        gather: Gather | None = None,
    ):
        self.config = config
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.sources = self._open_sources()
        self.mixture = Mixture([s.weight for s in self.sources], config.seed) if len(self.sources) > 1 else None
        self.lost_documents: dict[tuple[str, int], str] = {}  # (shard label, document) -> reason
        self._verify(gather)
        for source in self.sources:
            source.plan(config)
        self._require_good_shards()
        if config.objective == "span_corruption":
            spans = objectives._noise_counts(config.raw_length, config.noise_density, config.mean_noise_span_length)[1]
            if spans > self.manifest.special.num_sentinels:
                raise ValueError(
                    f"input_length {config.input_length} needs {spans} sentinels but the tokenizer has "
                    f"{self.manifest.special.num_sentinels}; train one with more sentinels"
                )
        self.epoch = 0  # current epoch (always 0 for a mixture, whose sources keep their own)
        self.cursor = 0  # rows of the current epoch (of the blend) consumed by all ranks together

    # --- sources and verification ------------------------------------------------------------
    def _open_sources(self) -> list[Source]:
        config = self.config
        specs = config.sources or (SourceConfig(manifest=config.manifest),)
        in_mixture = len(specs) > 1
        sources = []
        for spec in specs:
            manifest = Manifest.load(spec.manifest)
            check_shard_paths(
                manifest,
                allow_pipe=config.allow_pipe,
                allow_remote=config.allow_remote,
                allow_shell_characters=config.allow_shell_characters,
            )
            sources.append(Source(manifest, spec.name or source_name(spec.manifest), spec.weight, in_mixture))
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise DataError(f"data.sources: two sources named {names}; give each a distinct `name`")
        first = sources[0]
        for other in sources[1:]:
            if (other.manifest.tokenizer_fingerprint, other.manifest.special) != (
                first.manifest.tokenizer_fingerprint,
                first.manifest.special,
            ):
                raise DataError(
                    f"data.sources: {other.name} ({other.manifest.root}) was written with another tokenizer than "
                    f"{first.name} ({first.manifest.root}) (fingerprints "
                    f"{str(other.manifest.tokenizer_fingerprint)[:12]} and "
                    f"{str(first.manifest.tokenizer_fingerprint)[:12]}): a mixture's ids must mean the same "
                    "tokens; prepare every source with one tokenizer (`performer data prepare --tokenizer DIR`)"
                )
        return sources

    def _verify(self, gather: Gather | None) -> None:
        """Verify the shards (this rank's share when ranks can gather), agree on the verdicts, raise
        on a checksum mismatch anywhere, leave damaged shards out everywhere."""
        everything = [(s, p) for s, source in enumerate(self.sources) for p in range(len(source.manifest.shards))]
        share = everything[self.rank :: self.world_size] if gather is not None else everything
        mine: dict[tuple[int, str], tuple[str, bool]] = {}
        for s, source in enumerate(self.sources):
            positions = [p for t, p in share if t == s]
            for path, error in source.verify(positions, self.config.verify_sha256).items():
                mine[(s, path)] = (str(error), isinstance(error, ShardChecksumError))
        verdicts = {
            key: value for found in (gather(mine) if gather is not None else [mine]) for key, value in found.items()
        }
        mismatched = sorted((s, path) for (s, path), (_, checksum) in verdicts.items() if checksum)
        if mismatched:
            s, path = mismatched[0]
            raise DataError(
                f"{len(mismatched)} shard(s) of {self.sources[s].manifest.root} have the manifest's size but not its "
                f"sha256 (first: {path}: {verdicts[mismatched[0]][0]}): another file or silent corruption. Restore "
                "them from the source or rebuild the split with `performer data shards`; `performer data verify "
                "DIR` lists every bad shard. To train on them as they are, set data.verify_sha256=false "
                "(sizes and tar structure are still checked, token ids on every read)"
            )
        for (s, path), (reason, _) in sorted(verdicts.items()):
            self.sources[s].exclude({path: reason})
            warnings.warn(
                f"skipping corrupt shard {self.sources[s].label(path)}: {reason}", RuntimeWarning, stacklevel=3
            )

    def _require_good_shards(self) -> None:
        for source in self.sources:
            if source.order is None:
                first = next(iter(source.bad.items()))
                raise DataError(
                    f"all {len(source.manifest.shards)} shards of {source.manifest.root} failed verification "
                    f"(first: {first[0]}: {first[1]}); rebuild them with `performer data shards`"
                )

    @property
    def manifest(self) -> Manifest:
        """The (first) source's manifest: special tokens and tokenizer are the same in every source."""
        return self.sources[0].manifest

    @property
    def indices(self) -> ShardIndices:
        """The (first) source's good shards' indices by manifest position."""
        return self.sources[0].indices

    @property
    def bad_shards(self) -> dict[str, str]:
        """Shards left out, by label (the path; "source:path" in a mixture) -> reason."""
        return {source.label(path): reason for source in self.sources for path, reason in source.bad.items()}

    @property
    def shard_documents(self) -> dict[str, int]:
        """Documents of every shard by label."""
        return {source.label(s.path): s.documents for source in self.sources for s in source.manifest.shards}

    def exclude_shards(self, reasons: dict[str, str]) -> None:
        """Leave these shards (label -> reason) out from now on, e.g. ones another rank found bad, so
        that every rank plans the same epochs. Call it before iterating."""
        for source in self.sources:
            by_label = {source.label(shard.path): shard.path for shard in source.manifest.shards}
            new = source.exclude({by_label[label]: reason for label, reason in reasons.items() if label in by_label})
            for path in new:
                warnings.warn(f"skipping corrupt shard {source.label(path)}: {source.bad[path]}", RuntimeWarning, 2)
            source.plan(self.config)
        self._require_good_shards()

    @property
    def lost_samples(self) -> int:
        """Documents this stream cannot train on: those of skipped shards and unreadable ones found
        while reading (this rank's view; a trainer sums the latter over ranks)."""
        documents = self.shard_documents
        return sum(documents[label] for label in self.bad_shards) + len(self.lost_documents)

    def document_at(self, row: int, epoch: int | None = None) -> tuple[int, int]:
        """(manifest position of its shard, document in the shard) of the document holding the first
        token of row ``row`` of an epoch of a single split (the current epoch by default)."""
        source = self.sources[0]
        begin = row * self.config.raw_length
        window, first, _ = source.order.documents(self.epoch if epoch is None else epoch, begin, begin + 1)[0]
        return int(window.shard[first]), int(window.document[first])

    # --- sizes -------------------------------------------------------------------------------
    def _single(self, what: str) -> Source:
        if self.mixture is not None:
            raise DataError(
                f"a mixture of {len(self.sources)} sources has no epochs ({what}): each source runs through its "
                "own; train for train.max_steps"
            )
        return self.sources[0]

    @property
    def rows_per_epoch(self) -> int:
        """Packed rows per epoch (the same every epoch: the order changes, the tokens do not)."""
        return self._single("rows_per_epoch").order.rows

    @property
    def steps_per_epoch(self) -> int:
        """Batches every rank yields in a whole epoch at this world size."""
        return self.rows_per_epoch // (self.world_size * self.config.batch_size)

    @property
    def steps_left_in_epoch(self) -> int:
        return (self.rows_per_epoch - self.cursor) // (self.world_size * self.config.batch_size)

    def source_rows(self) -> dict[str, int]:
        """Rows drawn from each source so far, by all ranks together (a mixture; one split: its
        rows of all epochs)."""
        if self.mixture is None:
            source = self.sources[0]
            return {source.name: self.epoch * source.order.rows + self.cursor}
        return dict(zip((s.name for s in self.sources), self.mixture.counts(self.cursor).tolist()))

    # --- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches until config.max_epochs (never, by default), through one DataLoader: its workers
        run on across epoch boundaries, building the next epoch's first batches ahead."""
        if self.mixture is not None:
            if self.config.max_epochs is not None:
                raise DataError("stream.max_epochs counts epochs of one split; a mixture runs until stopped")
            cursor = self.cursor
            yield from self._run(lambda j: (0, cursor, j), None, cursor)
            return
        if self.steps_per_epoch == 0:
            # Otherwise an endless loop of empty epochs.
            raise ValueError(
                f"{self.sources[0].manifest.root} packs into {self.rows_per_epoch} rows per epoch, fewer than one "
                f"step of {self.world_size} rank(s) x batch_size {self.config.batch_size}; lower the "
                "batch size or input_length, or use more data"
            )
        epoch, cursor, first, per_epoch = self.epoch, self.cursor, self.steps_left_in_epoch, self.steps_per_epoch

        def positions(j: int) -> tuple[int, int, int]:
            if j < first:
                return epoch, cursor, j
            later, i = divmod(j - first, per_epoch)
            return epoch + 1 + later, 0, i

        epochs = None if self.config.max_epochs is None else max(self.config.max_epochs - epoch - 1, 0)
        total = None if epochs is None else (first + epochs * per_epoch if epoch < self.config.max_epochs else 0)
        yield from self._run(positions, total, cursor)
        self._close_epoch()

    def iter_epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """The remaining batches of the current epoch; afterwards the stream is at the next epoch.
        Use one iterator at a time: each advances the stream's cursor."""
        epoch, cursor = self.epoch, self.cursor
        yield from self._run(lambda j: (epoch, cursor, j), self.steps_left_in_epoch, cursor)
        self._close_epoch()

    def _close_epoch(self) -> None:
        if self.mixture is None and self.steps_left_in_epoch == 0:
            self.epoch, self.cursor = self.epoch + 1, 0

    def _run(self, positions, total: int | None, cursor: int) -> Iterator[dict[str, torch.Tensor]]:
        rows_per_step = self.world_size * self.config.batch_size
        builder = RowBuilder(self.sources, self.config, self.mixture)
        dataset = _RankBatches(builder, positions, total, self.rank, self.world_size)
        workers = self.config.num_workers
        loader = DataLoader(
            dataset,
            batch_size=None,  # workers yield whole batches
            num_workers=workers,
            prefetch_factor=self.config.prefetch_factor if workers else None,
            pin_memory=self.config.pin_memory,
        )
        for j, batch in enumerate(loader):
            epoch, start, i = positions(j)
            self.epoch, self.cursor = epoch, start + (i + 1) * rows_per_step
            self._note_lost(batch.pop(LOST_KEY))
            yield batch

    def _note_lost(self, entries: list) -> None:
        new: dict[tuple[str, str], list[int]] = {}  # (label, reason) -> documents newly lost
        for label, document, reason in entries:
            if (label, int(document)) not in self.lost_documents:
                self.lost_documents[(label, int(document))] = reason
                new.setdefault((label, reason), []).append(int(document))
        for (label, reason), documents in new.items():
            warnings.warn(
                f"shard {label}: {documents_phrase(documents)} lost ({reason}); replaced by the documents after them",
                RuntimeWarning,
                stacklevel=3,
            )

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the stream stands; the same on every rank. JSON-serialisable."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.config.seed,
            "raw_length": self.config.raw_length,
            "shuffle": self.config.shuffle,
            "interleave_shards": self.config.interleave_shards,
            "sources": [
                {"name": s.name, "weight": s.weight, "manifest_fingerprint": s.manifest.fingerprint}
                for s in self.sources
            ],
            "skipped_shards": sorted(self.bad_shards),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from any rank, any world size). Raises if it belongs to other data
        or another order: resuming then would silently repeat or skip samples."""
        if state.get("version") == 1:
            state = self._from_version_1(state)
        if state.get("version") != STATE_VERSION:
            raise DataError(f"stream state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "raw_length", "shuffle", "interleave_shards", "sources"):
            if state[key] != mine[key]:
                raise DataError(
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
        limit = self.rows_per_epoch if self.mixture is None else None
        if epoch < 0 or cursor < 0 or (limit is not None and cursor > limit) or (limit is None and epoch != 0):
            raise DataError(f"stream state cursor {cursor} is outside epoch {epoch}'s {limit} rows")
        self.epoch, self.cursor = epoch, cursor

    def _from_version_1(self, state: dict) -> dict:
        """A state saved when epochs were planned with a document shuffle buffer: the same data and
        seed continue at the same epoch and row, in this release's order (warned: within that epoch
        some rows repeat and others are missed; every later epoch is exact)."""
        mine = self.state_dict()
        if self.mixture is not None or state.get("manifest_fingerprint") != mine["sources"][0]["manifest_fingerprint"]:
            raise DataError("stream state (version 1) belongs to other data; resume with the shards it was saved with")
        for key in ("seed", "raw_length"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"stream state has {key}={state.get(key)!r} but this stream has {mine[key]!r}; "
                    "resume with the config and shards the state was saved with"
                )
        warnings.warn(
            f"stream state saved by a release that ordered epochs with a shuffle buffer: continuing at epoch "
            f"{state['epoch']}, row {state['cursor']} of this release's order; in that epoch some rows are seen "
            "twice and others not at all, later epochs are exact",
            RuntimeWarning,
            stacklevel=3,
        )
        keep = ("epoch", "cursor", "seed", "raw_length", "skipped_shards")
        return {**{key: mine[key] for key in mine if key not in keep}, **{key: state[key] for key in keep}}
