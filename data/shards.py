"""Tokenized documents -> packed WebDataset tar shards + a memory-mapped index + manifest.json.

On disk, one split is a directory (format version 2)::

    manifest.json          what the stream trusts: per split and per shard the documents, tokens,
                           bytes and sha256, the tokenizer, the writer's settings, and the size and
                           sha256 of each index file
    index-documents.npy    (D,) uint32: every document's token count, in split order
    index-members.npy      (M, 3) int64: per member pair, its first document (index in the split),
                           the byte offset of its token data in its shard, and that data's crc32
    index-shards.npy       (S+1, 2) int64: per shard, its first document and first member pair;
                           the last row is (D, M)
    train-000000.tar       plain ustar tars, mtime 0 and owner 0 (reproducible bytes), holding
    train-000001.tar       member pairs of whole documents, in split order:
    ...                      "<key>.lengths.u32"  each document's token count, uint32 little-endian
                             "<key>.tokens.u16"   their token ids concatenated, raw little-endian
                                                  uint16 ("u32": uint32 when the vocabulary exceeds
                                                  65536 ids)

The key is the 9-digit index in its shard of the pair's first document (shard path and key tell
where a document lies; a shard's keys never depend on the shards before it, so parts of a split
can be written in parallel: `write_part`, then `finish_split`). A pair holds at most `max_bytes_per_member` (1 MiB)
of token data unless one document is larger; it never spans shards. A shard closes once it holds
`max_samples_per_shard` documents or `max_bytes_per_shard` token bytes. Per ~1 MiB of tokens a
pair costs two 512-byte headers, padding, and 4 bytes per document; each shard ends with tar's
end blocks and record padding (< 11 KiB). `webdataset.WebDataset` reads a shard as one sample
per pair, {"__key__", "lengths.u32", "tokens.u16"}. A document is stored without eos; the stream
inserts eos between documents when it packs.

The index lets every rank plan an epoch without opening a tar: `Manifest.split_index` maps the
three files (``np.load(mmap_mode="r")``) and checks them against the manifest (size, sha256, and
the per-shard document and token counts); a stale or damaged index is a DataError. `verify_shard`
checks a shard against manifest and index and returns the shard's `ShardIndex`: with ``full=False``
(the stream's start-up) the file's size, its sha256 unless disabled, that the index's members fit
in it and that the first token member's header is where the index says; with ``full=True``
(`performer data verify`, `performer check`) every tar header, name, size and offset, every
lengths member, every token member's crc32 and token ids. The stream checks each member's crc32
when it reads it, so a member that changed after verification loses its documents, no more.

Version-1 splits (one member "<key>.u16" per document, "samples" in the manifest, no index) are
still read: their shards are verified by parsing every tar header, as when they were written, and
each document is a member of its own. `write_shards_v1` writes them, for tests and benchmarks. A
tar cut at a member boundary parses without error, which is why counts are always compared with
the manifest and the index.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds
from tqdm import tqdm

from data.errors import DataError
from data.tokenizer import TOKENIZER_DIR, SpecialTokens, Tokenizer
from performer import strict

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "performer-token-shards"
MANIFEST_VERSION = 2  # what write_shards writes
READABLE_VERSIONS = (1, 2)
KEY_DIGITS = 9
# The index files beside manifest.json: name in the manifest -> (file, dtype, columns; None = 1-D).
INDEX_FILES = {
    "documents": ("index-documents.npy", "<u4", None),
    "members": ("index-members.npy", "<i8", 3),
    "shards": ("index-shards.npy", "<i8", 2),
}
LENGTHS_FIELD = "lengths.u32"
VERIFY_THREADS = 8  # shards verified at once
REBUILD = "rebuild the split with `performer data shards` (or `performer data prepare`) or restore it"


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    max_samples_per_shard: int = 10_000  # documents per shard at most
    max_bytes_per_shard: int = 64 * 2**20  # token bytes per shard at most (tar headers come on top)
    max_bytes_per_member: int = 2**20  # token bytes per member pair at most, unless one document is larger
    num_workers: int = 0  # tokenizer processes; 0 = one per CPU, 1 = in this process
    documents_per_task: int = 8  # documents sent to a tokenizer process at a time

    @classmethod
    def from_dict(cls, values: dict) -> "ShardConfig":
        """From a plain mapping (YAML); unknown keys are errors."""
        return strict.build(cls, values, "shards")

    def layout(self) -> dict:
        """The settings that shape the bytes written (how many processes wrote them does not)."""
        return {k: v for k, v in strict.plain(self).items() if k not in ("num_workers", "documents_per_task")}

    def __post_init__(self) -> None:
        if min(self.max_samples_per_shard, self.max_bytes_per_shard, self.max_bytes_per_member) < 1:
            raise DataError(
                "shards.max_samples_per_shard, shards.max_bytes_per_shard and shards.max_bytes_per_member must be >= 1"
            )


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the manifest's directory, or a URL
    documents: int  # documents in the shard
    tokens: int  # token ids in the shard (eos not included)
    bytes: int  # size of the tar file
    sha256: str  # of the tar file

    @property
    def samples(self) -> int:
        """Version 1's name for `documents`."""
        return self.documents

    def to_json(self, version: int = MANIFEST_VERSION) -> dict:
        entry = dataclasses.asdict(self)
        if version == 1:
            entry["samples"] = entry.pop("documents")
        return entry


@dataclasses.dataclass(frozen=True)
class Manifest:
    split: str
    dtype: str  # "uint16" or "uint32"
    special: SpecialTokens
    tokenizer_fingerprint: str | None  # None for synthetic token data (tests, benchmarks)
    shards: tuple[ShardInfo, ...]
    writer: dict  # the ShardConfig and tar settings used
    source: dict  # what the documents came from (corpus config), informational
    root: Path = Path(".")  # directory of manifest.json; shard and index paths are relative to it
    version: int = MANIFEST_VERSION
    index: dict | None = None  # version 2: name -> {"path", "bytes", "sha256"} of each INDEX_FILES file

    @property
    def field(self) -> str:
        """Extension of the token arrays: "u16" or "u32" (version 2 members are "<key>.tokens.<field>")."""
        return "u16" if self.dtype == "uint16" else "u32"

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def samples(self) -> int:
        """Version 1's name for `documents`."""
        return self.documents

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def shard_url(self, shard: ShardInfo) -> str:
        """Local path (joined to the manifest's directory) or the URL as written."""
        if "://" in shard.path or shard.path.startswith("pipe:"):
            return shard.path
        return str(self.root / shard.path)

    def position(self, shard: ShardInfo) -> int:
        """Where `shard` is in the shard list."""
        return self._positions[shard.path]

    @functools.cached_property
    def _positions(self) -> dict[str, int]:
        return {shard.path: position for position, shard in enumerate(self.shards)}

    def to_json(self) -> dict:
        counts = {"samples": self.documents} if self.version == 1 else {"documents": self.documents}
        raw = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "split": self.split,
            "dtype": self.dtype,
            **counts,
            "tokens": self.tokens,
            "special": self.special.to_dict(),
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "writer": self.writer,
            "source": self.source,
        }
        if self.version >= 2:
            raw["index"] = self.index
        raw["shards"] = [s.to_json(self.version) for s in self.shards]
        return raw

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        """Load `path` (a manifest.json or the directory holding one); DataError if it is not one."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILE
        if not path.is_file():
            raise DataError(
                f"no shard manifest at {path}; build shards with `performer data shards` "
                "or `performer data prepare`, or correct the path"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:  # not UTF-8, not JSON, cut short
            problem = "is empty" if path.stat().st_size == 0 else f"is not JSON ({error})"
            raise DataError(f"shard manifest {path} {problem}: damaged or not a manifest; {REBUILD}") from None
        form = (raw.get("format"), raw.get("version")) if isinstance(raw, dict) else (type(raw).__name__, None)
        if form[0] != MANIFEST_FORMAT or type(form[1]) is not int or form[1] not in READABLE_VERSIONS:
            raise DataError(
                f"{path} is not a {MANIFEST_FORMAT} manifest of version {' or '.join(map(str, READABLE_VERSIONS))} "
                f"(format={form[0]!r}, version={form[1]!r}); point to a split written by `performer data shards`"
            )
        version = form[1]
        try:
            count = "samples" if version == 1 else "documents"
            shards = tuple(
                ShardInfo(path=s["path"], documents=s[count], tokens=s["tokens"], bytes=s["bytes"], sha256=s["sha256"])
                for s in raw["shards"]
            )
            index = None if version == 1 else _index_entries(raw["index"])
            return cls(
                split=raw["split"],
                dtype=raw["dtype"],
                special=SpecialTokens.from_dict(raw["special"]),
                tokenizer_fingerprint=raw["tokenizer_fingerprint"],
                shards=shards,
                writer=raw["writer"],
                source=raw["source"],
                root=path.parent,
                version=version,
                index=index,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"shard manifest {path} is incomplete or malformed ({type(error).__name__}: {error}); {REBUILD}"
            ) from None

    def tokenizer(self, directory: str | os.PathLike | None = None) -> Tokenizer | None:
        """The tokenizer these shards were written with, checked against the fingerprint they pin.

        ``directory`` names it; by default it is the one beside the split (`performer data prepare`
        writes OUT/tokenizer next to OUT/train), and None when there is none there. A directory
        that does not load, or holds another tokenizer, is a DataError naming it.
        """
        beside = directory is None
        directory = self.root.parent / TOKENIZER_DIR if beside else Path(directory)
        if beside and not directory.exists():
            return None
        tokenizer = Tokenizer.load(directory)
        if self.tokenizer_fingerprint and tokenizer.fingerprint != self.tokenizer_fingerprint:
            raise DataError(
                f"tokenizer {directory} is not the one the shards of {self.root} were written with (fingerprint "
                f"{tokenizer.fingerprint[:12]}, the manifest pins {self.tokenizer_fingerprint[:12]}): put the "
                "shards' tokenizer there, or rebuild the shards with this one (`performer data shards`)"
            )
        return tokenizer

    @property
    def fingerprint(self) -> str:
        """sha256 of the shard list (names, counts, hashes): identifies the data a cursor refers to.
        Computed over the entries as the manifest's version writes them, so that cursors saved
        against a version-1 split still match it."""
        shards = json.dumps([s.to_json(self.version) for s in self.shards], sort_keys=True)
        return hashlib.sha256(shards.encode()).hexdigest()

    @functools.cached_property
    def split_index(self) -> "SplitIndex":
        """The split's index (version 2), memory-mapped and checked on first use; DataError if it
        is missing, stale or damaged."""
        if self.version == 1 or self.index is None:
            raise DataError(f"the version-{self.version} split {self.root} has no index")
        return SplitIndex.load(self)


def _index_entries(raw: dict) -> dict:
    """The manifest's "index" mapping, checked for shape (every file named, a plain file name)."""
    entries = {}
    for name in INDEX_FILES:
        entry = raw[name]
        path, size, digest = entry["path"], entry["bytes"], entry["sha256"]
        if not isinstance(path, str) or Path(path).name != path or path in ("", ".", ".."):
            raise ValueError(f"index file {path!r} is not a file name beside the manifest")
        if not isinstance(size, int) or not isinstance(digest, str):
            raise TypeError(f"index entry {name!r} needs an integer 'bytes' and a string 'sha256'")
        entries[name] = {"path": path, "bytes": size, "sha256": digest}
    return entries


def split_beside(manifest: str | os.PathLike, split: str) -> Path | None:
    """The split named ``split`` that `performer data prepare` writes beside another (OUT/heldout
    next to OUT/train, both next to OUT/tokenizer), or None when there is none. ``manifest`` is a
    split's manifest.json or its directory."""
    path = Path(manifest)
    split_dir = path.parent if path.name == MANIFEST_FILE or path.suffix == ".json" else path
    candidate = split_dir.parent / split
    return candidate if (candidate / MANIFEST_FILE).is_file() else None


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def member_names(key: int, field: str) -> tuple[str, str]:
    """Names of a version-2 member pair: (lengths, tokens)."""
    return f"{key:0{KEY_DIGITS}d}.{LENGTHS_FIELD}", f"{key:0{KEY_DIGITS}d}.tokens.{field}"


# ----------------------------------------------------------------------------------------- index


@dataclasses.dataclass(frozen=True, eq=False)
class ShardIndex:
    """Where each document of a verified shard lies: what the stream reads by offset.

    Documents are grouped in members, read whole: a version-2 member pair's token data, or a
    version-1 document's own member.
    """

    lengths: np.ndarray  # (n,) tokens of each document
    member_first: np.ndarray  # (m+1,) int64: first document of each member; the last entry is n
    member_offsets: np.ndarray  # (m,) int64: byte offset of each member's token data in the tar
    member_crc32: np.ndarray | None  # (m,) crc32 of each member's token data; None: not recorded (version 1)
    itemsize: int  # bytes per token id
    first_document: int = 0  # index in the split of the shard's first document

    @classmethod
    def per_document(cls, offsets: np.ndarray, lengths: np.ndarray, itemsize: int) -> "ShardIndex":
        """A version-1 shard: every document is a member of its own."""
        return cls(lengths, np.arange(len(lengths) + 1, dtype=np.int64), offsets, None, itemsize)

    @property
    def members(self) -> int:
        return len(self.member_offsets)

    def member_of(self, document: int) -> int:
        return int(np.searchsorted(self.member_first, document, side="right")) - 1

    def member_documents(self, member: int) -> range:
        return range(int(self.member_first[member]), int(self.member_first[member + 1]))

    def member_tokens(self, member: int) -> int:
        first, last = self.member_documents(member).start, self.member_documents(member).stop
        return int(np.sum(self.lengths[first:last], dtype=np.int64))

    @property
    def offsets(self) -> np.ndarray:
        """int64 (n,): byte offset of each document's first token in the tar."""
        lengths = np.asarray(self.lengths, dtype=np.int64)
        before = np.concatenate(([0], np.cumsum(lengths)))  # tokens before each document in the shard
        member = np.repeat(np.arange(self.members), np.diff(self.member_first))
        within = before[:-1] - before[self.member_first[member]]
        return self.member_offsets[member] + within * self.itemsize


@dataclasses.dataclass(frozen=True, eq=False)
class SplitIndex:
    """A version-2 split's index files, memory-mapped (module docstring)."""

    documents: np.ndarray  # (D,) uint32 token counts
    members: np.ndarray  # (M, 3) int64: first document, token data offset, crc32
    shards: np.ndarray  # (S+1, 2) int64: first document, first member

    @classmethod
    def load(cls, manifest: Manifest) -> "SplitIndex":
        """Map the index files and check them against the manifest; DataError naming the file if
        one is missing, stale (another writing of the split) or damaged."""
        arrays = {}
        for name, (_, dtype, columns) in INDEX_FILES.items():
            entry = manifest.index[name]
            path = manifest.root / entry["path"]
            if not path.is_file():
                raise DataError(f"index file {path} of split {manifest.root} is missing; {REBUILD}")
            size = path.stat().st_size
            if size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                found = f"size {size}, manifest says {entry['bytes']}" if size != entry["bytes"] else "sha256 differs"
                raise DataError(
                    f"index file {path} does not match the manifest ({found}): stale (from another writing of "
                    f"the split) or damaged; {REBUILD}"
                )
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as error:
                raise DataError(f"index file {path} is not a .npy array ({error}); {REBUILD}") from None
            shape_ok = array.ndim == 1 if columns is None else (array.ndim == 2 and array.shape[1] == columns)
            if array.dtype != np.dtype(dtype) or not shape_ok:
                raise DataError(f"index file {path} holds {array.dtype} {array.shape}, not {dtype}; {REBUILD}")
            arrays[name] = array
        index = cls(**arrays)
        problem = index._disagreement(manifest)
        if problem:
            raise DataError(f"the index of split {manifest.root} disagrees with its manifest ({problem}); {REBUILD}")
        return index

    def _disagreement(self, manifest: Manifest) -> str | None:
        """Why the index does not describe the manifest's shards, or None."""
        shards, members = self.shards, self.members
        if len(shards) != len(manifest.shards) + 1:
            return f"{len(shards) - 1} shards, the manifest lists {len(manifest.shards)}"
        if tuple(shards[0]) != (0, 0) or tuple(shards[-1]) != (len(self.documents), len(members)):
            return "the shard table does not span the documents and members"
        documents = np.diff(shards[:, 0])
        if np.any(np.diff(shards[:, 1]) < 1) or np.any(documents < 1):
            return "a shard without documents or members"
        want = np.array([s.documents for s in manifest.shards])
        if not np.array_equal(documents, want):
            s = int(np.flatnonzero(documents != want)[0])
            return f"shard {manifest.shards[s].path}: {documents[s]} documents, the manifest says {want[s]}"
        tokens = self.shard_tokens()
        want = np.array([s.tokens for s in manifest.shards])
        if not np.array_equal(tokens, want):
            s = int(np.flatnonzero(tokens != want)[0])
            return f"shard {manifest.shards[s].path}: {tokens[s]} tokens, the manifest says {want[s]}"
        firsts = members[:, 0]
        if len(firsts) and (firsts[0] != 0 or np.any(np.diff(firsts) < 1) or firsts[-1] >= len(self.documents)):
            return "member pairs out of order"
        if not np.array_equal(firsts[shards[:-1, 1]], shards[:-1, 0]):
            return "a shard that does not start with a member pair"
        return None

    def shard_tokens(self, shards_at_a_time: int = 1024) -> np.ndarray:
        """int64 (S,): tokens of each shard, summed a slice of shards at a time: summing the whole
        uint32 column as int64 at once would first copy it (8 bytes a document: 8 GB at 1e9)."""
        starts = self.shards[:-1, 0]
        tokens = np.empty(len(starts), dtype=np.int64)
        for first in range(0, len(starts), shards_at_a_time):
            stop = min(first + shards_at_a_time, len(starts))
            lo, hi = int(self.shards[first, 0]), int(self.shards[stop, 0])
            tokens[first:stop] = np.add.reduceat(self.documents[lo:hi], starts[first:stop] - lo, dtype=np.int64)
        return tokens

    def shard(self, position: int, itemsize: int) -> ShardIndex:
        """The index of one shard (its documents numbered from 0)."""
        (d0, m0), (d1, m1) = self.shards[position], self.shards[position + 1]
        members = np.asarray(self.members[m0:m1])
        return ShardIndex(
            lengths=self.documents[d0:d1],
            member_first=np.append(members[:, 0] - d0, d1 - d0).astype(np.int64),
            member_offsets=members[:, 1].copy(),
            member_crc32=members[:, 2].copy(),
            itemsize=itemsize,
            first_document=int(d0),
        )


# --------------------------------------------------------------------------------------- writing


class _HashingFile(io.RawIOBase):
    """A file opened for writing that hashes what goes through it: a shard's sha256 and size are
    known when it closes, without reading it back."""

    def __init__(self, path: Path):
        self.handle = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        super().close()


class _PackedWriter:
    """Writes member pairs into shards, opening a tar only when a document arrives."""

    def __init__(self, out: Path, prefix: str, dtype: str, config: ShardConfig):
        self.out, self.prefix, self.config = out, prefix, config
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.field = "u16" if dtype == "uint16" else "u32"
        self.tar: tarfile.TarFile | None = None
        self.shard_files: list[Path] = []
        self.shard_rows: list[tuple[int, int]] = []  # per shard: first document, first member
        self.shard_counts: list[list[int]] = []  # per shard: documents, tokens
        self.shard_hashes: list[tuple[int, str]] = []  # per closed shard: bytes, sha256
        self.file: _HashingFile | None = None
        self.member_rows: list[tuple[int, int, int]] = []  # per pair: first document, data offset, crc32
        self.lengths: list[np.ndarray] = []  # per pair: its documents' lengths
        self.documents = 0  # written so far (in closed pairs)
        self.pending: list[bytes] = []
        self.pending_lengths: list[int] = []
        self.pending_bytes = 0

    def add(self, payload: bytes, length: int) -> None:
        counts = self.shard_counts[-1] if self.tar is not None else None
        pending_documents = len(self.pending_lengths)
        if counts is not None and (
            counts[0] + pending_documents >= self.config.max_samples_per_shard
            or counts[1] * self.dtype.itemsize + self.pending_bytes >= self.config.max_bytes_per_shard
        ):
            self._close_shard()
        if self.pending and self.pending_bytes + len(payload) > self.config.max_bytes_per_member:
            self._flush_pair()
        if self.tar is None:
            self._open_shard()
        self.pending.append(payload)
        self.pending_lengths.append(length)
        self.pending_bytes += len(payload)

    def _open_shard(self) -> None:
        path = self.out / f"{self.prefix}-{len(self.shard_files):06d}.tar"
        # ustar: identical inputs give identical bytes (and smaller headers than pax).
        self.file = _HashingFile(path)
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.shard_files.append(path)
        self.shard_rows.append((self.documents, len(self.member_rows)))
        self.shard_counts.append([0, 0])

    def _add_member(self, name: str, payload: bytes) -> int:
        """Append one member; returns the byte offset of its data."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(payload), 0, 0o444
        header = self.tar.offset
        self.tar.addfile(info, io.BytesIO(payload))
        return header + tarfile.BLOCKSIZE  # short names: a one-block ustar header

    def _flush_pair(self) -> None:
        if not self.pending:
            return
        lengths = np.asarray(self.pending_lengths, dtype="<u4")
        tokens = b"".join(self.pending)
        lengths_name, tokens_name = member_names(self.documents - self.shard_rows[-1][0], self.field)
        self._add_member(lengths_name, lengths.tobytes())
        offset = self._add_member(tokens_name, tokens)
        self.member_rows.append((self.documents, offset, zlib.crc32(tokens)))
        self.lengths.append(lengths)
        counts = self.shard_counts[-1]
        counts[0] += len(lengths)
        counts[1] += len(tokens) // self.dtype.itemsize
        self.documents += len(lengths)
        self.pending, self.pending_lengths, self.pending_bytes = [], [], 0

    def _close_shard(self) -> None:
        self._flush_pair()
        self.tar.close()  # end blocks and record padding go through the hashing file
        self.file.close()
        self.shard_hashes.append((self.file.size, self.file.sha256.hexdigest()))
        self.tar, self.file = None, None

    def abort(self) -> None:
        """Close what is open (after an error): the partial shard stays for the caller to remove."""
        if self.tar is not None:
            self.tar.close()
            self.file.close()
            self.tar, self.file = None, None

    def close(self) -> tuple[list[ShardInfo], dict[str, np.ndarray]]:
        if self.tar is not None:
            self._close_shard()
        shards = [
            ShardInfo(path=path.name, documents=documents, tokens=tokens, bytes=size, sha256=digest)
            for path, (documents, tokens), (size, digest) in zip(self.shard_files, self.shard_counts, self.shard_hashes)
        ]
        arrays = {
            "documents": np.concatenate([np.zeros(0, "<u4"), *self.lengths]).astype("<u4"),
            "members": np.array(self.member_rows, dtype="<i8").reshape(-1, 3),
            "shards": np.array([*self.shard_rows, (self.documents, len(self.member_rows))], dtype="<i8"),
        }
        return shards, arrays


@dataclasses.dataclass(frozen=True)
class Part:
    """Shards written by `write_part`, not yet a split: their records and their index arrays with
    documents and members numbered from the part's start."""

    shards: tuple[ShardInfo, ...]
    arrays: dict  # name of INDEX_FILES -> np.ndarray


class PartWriter:
    """Documents in, packed shards named ``<prefix>-NNNNNN.tar`` out, each hashed as it is closed;
    no index, no manifest (`finish_split` makes a split of parts). Writes nothing without documents."""

    def __init__(self, out_dir: str | os.PathLike, *, prefix: str, special: SpecialTokens, config: ShardConfig):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.special = special
        self.stored = np.dtype(token_dtype(special.vocab_size)).newbyteorder("<")
        self.writer = _PackedWriter(self.out, prefix, token_dtype(special.vocab_size), config)
        self.documents = 0

    def add(self, tokens: np.ndarray) -> None:
        """One document's token ids (an empty document is skipped)."""
        if len(tokens) == 0:
            return
        if int(np.max(tokens)) >= self.special.vocab_size or int(np.min(tokens)) < 0:
            raise ValueError(f"document {self.documents} has ids outside [0, {self.special.vocab_size})")
        if len(tokens) >= 2**32:
            raise ValueError(f"document {self.documents} has {len(tokens)} tokens, more than a uint32 length holds")
        self.writer.add(np.ascontiguousarray(tokens, dtype=self.stored).tobytes(), len(tokens))
        self.documents += 1

    def abort(self) -> None:
        self.writer.abort()

    def close(self) -> Part:
        shards, arrays = self.writer.close()
        return Part(tuple(shards), arrays)


def write_part(
    documents: Iterable[np.ndarray],
    out_dir: str | os.PathLike,
    *,
    prefix: str,
    special: SpecialTokens,
    config: ShardConfig = ShardConfig(),
) -> Part:
    """`PartWriter` over an iterable of token arrays."""
    writer = PartWriter(out_dir, prefix=prefix, special=special, config=config)
    try:
        for tokens in documents:
            writer.add(tokens)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def finish_split(
    out_dir: str | os.PathLike,
    parts: Sequence[Part],
    *,
    split: str,
    special: SpecialTokens,
    config: ShardConfig = ShardConfig(),
    tokenizer_fingerprint: str | None = None,
    source: dict | None = None,
) -> Manifest:
    """The split of `parts` (in order): its index files, then manifest.json (written last, by
    rename, so a split with a manifest is whole). DataError for a split without documents."""
    out = Path(out_dir)
    documents, members, shard_rows, doc_offset, member_offset = [], [], [], 0, 0
    for part in parts:
        if not part.shards:
            continue
        members.append(part.arrays["members"] + np.array([doc_offset, 0, 0], dtype="<i8"))
        shard_rows.append(part.arrays["shards"][:-1] + np.array([doc_offset, member_offset], dtype="<i8"))
        documents.append(part.arrays["documents"])
        doc_offset += len(part.arrays["documents"])
        member_offset += len(part.arrays["members"])
    if doc_offset == 0:
        raise DataError(
            f"split {split!r} has no non-empty documents; nothing to write (a larger corpus, or "
            "another --heldout-fraction)"
        )
    arrays = {
        "documents": np.concatenate(documents).astype("<u4"),
        "members": np.concatenate(members).astype("<i8").reshape(-1, 3),
        "shards": np.concatenate([*shard_rows, [[doc_offset, member_offset]]]).astype("<i8"),
    }
    entries = {}
    for name, (filename, _, _) in INDEX_FILES.items():
        path = out / filename
        save_array_atomically(path, arrays[name])
        entries[name] = {"path": filename, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    field = "u16" if token_dtype(special.vocab_size) == "uint16" else "u32"
    # The format's settings only: how many processes wrote the split does not change its bytes.
    layout = config.layout()
    manifest = Manifest(
        split=split,
        dtype=token_dtype(special.vocab_size),
        special=special,
        tokenizer_fingerprint=tokenizer_fingerprint,
        shards=tuple(shard for part in parts for shard in part.shards),
        writer={
            **layout,
            "tar_format": "ustar",
            "mtime": 0,
            "members": f"<key>.{LENGTHS_FIELD} + <key>.tokens.{field}",
        },
        source=source or {},
        root=out,
        version=MANIFEST_VERSION,
        index=entries,
    )
    _write_manifest(manifest, out)
    return manifest


def write_shards(
    documents: Iterable[np.ndarray],
    out_dir: str | os.PathLike,
    *,
    split: str,
    special: SpecialTokens,
    config: ShardConfig = ShardConfig(),
    tokenizer_fingerprint: str | None = None,
    source: dict | None = None,
) -> Manifest:
    """Write token arrays (one per document, empty ones skipped) as packed shards, their index and
    manifest.json (module docstring): one part, named after the split."""
    part = write_part(documents, out_dir, prefix=split, special=special, config=config)
    return finish_split(
        out_dir,
        [part],
        split=split,
        special=special,
        config=config,
        tokenizer_fingerprint=tokenizer_fingerprint,
        source=source,
    )


def _write_manifest(manifest: Manifest, out: Path) -> None:
    write_json_atomically(out / MANIFEST_FILE, manifest.to_json())


# Write-then-rename: a reader never sees a half-written manifest, index or prepare record.


def write_json_atomically(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def save_array_atomically(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(tmp, path)


def write_shards_v1(
    documents: Iterable[np.ndarray],
    out_dir: str | os.PathLike,
    *,
    split: str,
    special: SpecialTokens,
    config: ShardConfig = ShardConfig(),
    tokenizer_fingerprint: str | None = None,
    source: dict | None = None,
) -> Manifest:
    """The version-1 writer (one tar member per document, no index), kept so that tests and
    benchmarks can check and compare the reading of version-1 splits. `write_shards` is the writer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(special.vocab_size)
    field = "u16" if dtype == "uint16" else "u32"
    counts: dict[str, list[int]] = {}  # shard file -> [documents, tokens]
    documents = (d for d in documents if len(d))
    first = next(documents, None)  # ShardWriter opens its first tar eagerly
    if first is None:
        raise DataError(f"split {split!r} has no non-empty documents; nothing to write")
    with wds.ShardWriter(
        str(out / f"{split}-%06d.tar"),
        maxcount=config.max_samples_per_shard,
        maxsize=config.max_bytes_per_shard,
        verbose=0,
        mtime=0,
        format=tarfile.USTAR_FORMAT,
    ) as writer:
        for index, tokens in enumerate(_chain_first(first, documents)):
            if int(np.max(tokens)) >= special.vocab_size or int(np.min(tokens)) < 0:
                raise ValueError(f"document {index} has ids outside [0, {special.vocab_size})")
            payload = np.ascontiguousarray(tokens, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
            writer.write({"__key__": f"{index:0{KEY_DIGITS}d}", field: payload})
            stats = counts.setdefault(writer.fname, [0, 0])
            stats[0] += 1
            stats[1] += len(tokens)
    shards = tuple(
        ShardInfo(path=Path(f).name, documents=n, tokens=t, bytes=os.path.getsize(f), sha256=sha256_file(f))
        for f, (n, t) in sorted(counts.items())
    )
    writer_settings = {**strict.plain(config), "tar_format": "ustar", "mtime": 0, "field": field}
    del writer_settings["max_bytes_per_member"]
    manifest = Manifest(
        split=split,
        dtype=dtype,
        special=special,
        tokenizer_fingerprint=tokenizer_fingerprint,
        shards=shards,
        writer=writer_settings,
        source=source or {},
        root=out,
        version=1,
    )
    _write_manifest(manifest, out)
    return manifest


def _chain_first(first, rest):
    yield first
    yield from rest


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_texts(texts: Sequence[str]) -> list[np.ndarray]:
    assert _WORKER_TOKENIZER is not None
    dtype = token_dtype(_WORKER_TOKENIZER.vocab_size)
    return [np.asarray(ids, dtype=dtype) for ids in _WORKER_TOKENIZER.encode_batch(texts)]


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_texts(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    *,
    num_workers: int = 0,
    documents_per_task: int = 8,
    description: str = "tokenizing",
    progress: bool = True,
) -> Iterator[np.ndarray]:
    """Token arrays of `texts`, in input order, tokenized by a process pool; shows tokens/s."""
    workers = num_workers or os.cpu_count() or 1
    bar = tqdm(desc=description, unit="tok", unit_scale=True, disable=not progress, smoothing=0.1)
    try:
        if workers == 1:
            _init_worker(tokenizer)
            results: Iterable[list[np.ndarray]] = map(_encode_texts, _batched(texts, documents_per_task))
            for arrays in results:
                for array in arrays:
                    bar.update(len(array))
                    yield array
            return
        # fork is cheap and the tokenizer is small; the context is explicit so the choice is visible.
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
            for arrays in pool.imap(_encode_texts, _batched(texts, documents_per_task)):
                for array in arrays:
                    bar.update(len(array))
                    yield array
    finally:
        bar.close()


# ------------------------------------------------------------------------------------ verifying


class ShardError(Exception):
    """A shard does not match its manifest entry (or the index); the message says how."""


class ShardChecksumError(ShardError):
    """Right size, wrong sha256: another file in the shard's place, or silent corruption."""


def read_shard_bytes(url: str) -> bytes:
    """The whole shard, through webdataset's opener (local paths, URLs, and pipe: commands)."""
    with wds.gopen(url, "rb") as stream:
        return stream.read()


def verify_shard(manifest: Manifest, shard: ShardInfo, *, check_sha256: bool = True, full: bool = True) -> ShardIndex:
    """Check `shard` against its manifest entry; return its index or raise ShardError(reason).

    Always: the file exists and has the manifest's size, and its sha256 matches (unless disabled).
    Version 2 (a bad index is a DataError, raised for the whole split): the index's last member
    lies inside the file, and then with ``full=False`` the header of the first token member is
    where the index puts it (one 512-byte read); with ``full=True`` the whole tar parses and holds
    exactly the index's member pairs, each with its name, size and data offset, the index's
    document lengths, the index's crc32 and only ids < the vocabulary size. Version 1: the tar
    parses, its members all lie inside the file and hold whole token arrays, and the member and
    token counts match (``full`` changes nothing).
    """
    url = manifest.shard_url(shard)
    local = "://" not in url and not url.startswith("pipe:")
    try:
        if local:
            size = os.path.getsize(url)
            data = None
        else:
            data = read_shard_bytes(url)
            size = len(data)
    except OSError as error:
        raise ShardError(f"unreadable ({error.strerror or error})") from None
    if size != shard.bytes:
        raise ShardError(f"size {size} bytes, manifest says {shard.bytes} (truncated or replaced)")
    if check_sha256:
        digest = sha256_file(url) if local else hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise ShardChecksumError(f"sha256 {digest[:12]}... differs from the manifest's {shard.sha256[:12]}...")
    if manifest.version == 1:
        return _verify_v1(manifest, shard, url if local else io.BytesIO(data), size)
    position = manifest.position(shard)
    index = manifest.split_index.shard(position, manifest.itemsize)
    last = index.members - 1
    end = int(index.member_offsets[last]) + index.member_tokens(last) * index.itemsize
    if end > size:
        raise ShardError(
            f"the index puts the token data of member pair {last} up to byte {end}, past the end of the "
            f"{size}-byte file (cut short, or another file)"
        )
    try:
        with open(url, "rb") if local else io.BytesIO(data) as handle:
            if full:
                _verify_members(manifest, index, handle, size)
            else:
                _probe_first_member(manifest, index, handle)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardError(f"not a readable tar ({error})") from None
    return index


def _probe_first_member(manifest: Manifest, index: ShardIndex, handle) -> None:
    """The header of the first token member is where the index says: one read, no tar parse."""
    offset = int(index.member_offsets[0]) - tarfile.BLOCKSIZE
    name, size = member_names(0, manifest.field)[1], index.member_tokens(0) * index.itemsize
    if offset < 0:
        raise ShardError(f"the index puts member {name!r} at byte {offset}: not this shard's index")
    handle.seek(offset)
    try:
        info = tarfile.TarInfo.frombuf(handle.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
    except tarfile.HeaderError as error:
        raise ShardError(f"not a readable tar: no member header at byte {offset} ({error})") from None
    if (info.name, info.size) != (name, size):
        raise ShardError(
            f"not the tar the index describes: member {info.name!r} of {info.size} bytes at byte {offset}, "
            f"the index says {name!r} of {size}"
        )


def _verify_members(manifest: Manifest, index: ShardIndex, handle, size: int) -> None:
    """Every tar member against the index (verify_shard, full=True)."""
    with tarfile.open(fileobj=handle, mode="r:") as tar:
        members = tar.getmembers()
        if len(members) != 2 * index.members:
            raise ShardError(f"{len(members)} tar members, the index says {index.members} pairs ({2 * index.members})")
        stored = np.dtype(manifest.dtype).newbyteorder("<")
        for j in range(index.members):
            documents = index.member_documents(j)
            names = member_names(documents.start, manifest.field)
            lengths = np.asarray(index.lengths[documents.start : documents.stop], dtype=np.int64)
            sizes = (4 * len(documents), int(lengths.sum()) * index.itemsize)
            for member, name, nbytes in zip(members[2 * j : 2 * j + 2], names, sizes):
                if not member.isfile() or member.name != name or member.size != nbytes:
                    raise ShardError(
                        f"member {member.name!r} ({member.size} bytes) where the index expects {name!r} ({nbytes})"
                    )
                if member.offset_data + member.size > size:
                    raise ShardError(f"member {member.name!r} runs past the end of the file")
            lengths_member, tokens_member = members[2 * j : 2 * j + 2]
            if tokens_member.offset_data != index.member_offsets[j]:
                raise ShardError(
                    f"member {tokens_member.name!r} at byte {tokens_member.offset_data}, the index says "
                    f"{int(index.member_offsets[j])}"
                )
            found = np.frombuffer(tar.extractfile(lengths_member).read(), dtype="<u4")
            if not np.array_equal(found, lengths):
                raise ShardError(f"member {lengths_member.name!r} holds other document lengths than the index")
            tokens = tar.extractfile(tokens_member).read()
            crc = zlib.crc32(tokens)
            if crc != index.member_crc32[j]:
                raise ShardError(
                    f"member {tokens_member.name!r}: crc32 {crc:08x} differs from the index's "
                    f"{int(index.member_crc32[j]):08x}"
                )
            ids = np.frombuffer(tokens, dtype=stored)
            if len(ids) and int(ids.max()) >= manifest.special.vocab_size:
                raise ShardError(
                    f"member {tokens_member.name!r} holds token id {int(ids.max())} >= vocabulary size "
                    f"{manifest.special.vocab_size}"
                )


def _verify_v1(manifest: Manifest, shard: ShardInfo, source, size: int) -> ShardIndex:
    """A version-1 shard: one member per document, indexed by parsing every tar header."""
    try:
        with tarfile.open(source, "r:") if isinstance(source, str) else tarfile.open(fileobj=source, mode="r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardError(f"not a readable tar ({error})") from None
    if len(members) != shard.documents:
        raise ShardError(f"{len(members)} samples, manifest says {shard.documents}")
    itemsize = manifest.itemsize
    offsets = np.empty(len(members), dtype=np.int64)
    lengths = np.empty(len(members), dtype=np.int64)
    suffix = "." + manifest.field
    for i, member in enumerate(members):
        if not member.isfile() or not member.name.endswith(suffix) or member.size % itemsize:
            raise ShardError(f"member {member.name!r} is not a {manifest.dtype} token array")
        if member.offset_data + member.size > size:
            raise ShardError(f"member {member.name!r} runs past the end of the file")
        offsets[i] = member.offset_data
        lengths[i] = member.size // itemsize
    if int(lengths.sum()) != shard.tokens:
        raise ShardError(f"{int(lengths.sum())} tokens, manifest says {shard.tokens}")
    return ShardIndex.per_document(offsets, lengths, itemsize)


def verify_manifest(
    manifest: Manifest, *, check_sha256: bool = True, full: bool = True, positions: Iterable[int] | None = None
) -> tuple[dict[int, ShardIndex], dict[str, ShardError]]:
    """Verify every shard (`verify_shard`), or those at ``positions``: (index of each good shard by
    position, error of each bad shard by path; str(error) is the reason, its class tells a
    checksum mismatch from a damaged file). A version-2 index that is missing, stale or damaged is
    a DataError: nothing can be planned without it.

    Local shards are verified by a few threads at once (the work is a stat, a 512-byte read and,
    with ``check_sha256``, hashing, which releases the GIL): on a parallel file system the
    latencies overlap instead of adding up."""
    if manifest.version >= 2:
        manifest.split_index  # noqa: B018 - loads and checks the index, once
    positions = range(len(manifest.shards)) if positions is None else list(positions)
    manifest.position(manifest.shards[0])  # builds the position table before the threads share it

    def check(position: int) -> ShardIndex | ShardError:
        try:
            return verify_shard(manifest, manifest.shards[position], check_sha256=check_sha256, full=full)
        except ShardError as error:
            return error

    with concurrent.futures.ThreadPoolExecutor(max_workers=VERIFY_THREADS) as pool:
        outcomes = list(pool.map(check, positions))
    good = {p: outcome for p, outcome in zip(positions, outcomes) if isinstance(outcome, ShardIndex)}
    bad = {manifest.shards[p].path: out for p, out in zip(positions, outcomes) if isinstance(out, ShardError)}
    return good, bad
