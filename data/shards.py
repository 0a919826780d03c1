"""Tokenized documents -> WebDataset tar shards + manifest.json, and shard verification.

On disk, one split is a directory::

    manifest.json            what the stream trusts: per shard its samples, tokens, bytes, sha256
    train-000000.tar         webdataset tars written by `webdataset.ShardWriter`: plain ustar,
    train-000001.tar         mtime 0 (reproducible bytes), one member per document:
    ...                      "<9-digit key>.u16" = the token ids as raw little-endian uint16
                             (uint32 when the vocabulary exceeds 65536 ids)

A document is stored without eos; the stream inserts eos between documents when it packs.
Keys are the document's index in the split, so members never collide across shards.

The manifest also pins the tokenizer (fingerprint + special ids) and the writer's settings;
`verify_shard` checks a shard against it (size, sha256, tar structure, member count and token
count) and returns the per-document token counts the stream plans with. A tar cut at a member
boundary parses without error, which is why counts are always compared with the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
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
MANIFEST_VERSION = 1
KEY_DIGITS = 9


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    max_samples_per_shard: int = 10_000  # documents per shard at most
    max_bytes_per_shard: int = 64 * 2**20  # token bytes per shard at most (tar headers come on top)
    num_workers: int = 0  # tokenizer processes; 0 = one per CPU, 1 = in this process
    documents_per_task: int = 8  # documents sent to a tokenizer process at a time

    @classmethod
    def from_dict(cls, values: dict) -> "ShardConfig":
        """From a plain mapping (YAML); unknown keys are errors."""
        return strict.build(cls, values, "shards")

    def __post_init__(self) -> None:
        if self.max_samples_per_shard < 1 or self.max_bytes_per_shard < 1:
            raise DataError("shards.max_samples_per_shard and shards.max_bytes_per_shard must be >= 1")


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the manifest's directory, or a URL
    samples: int  # documents in the shard
    tokens: int  # token ids in the shard (eos not included)
    bytes: int  # size of the tar file
    sha256: str  # of the tar file


@dataclasses.dataclass(frozen=True)
class Manifest:
    split: str
    dtype: str  # "uint16" or "uint32"
    special: SpecialTokens
    tokenizer_fingerprint: str | None  # None for synthetic token data (tests, benchmarks)
    shards: tuple[ShardInfo, ...]
    writer: dict  # the ShardConfig and tar settings used
    source: dict  # what the documents came from (corpus config), informational
    root: Path = Path(".")  # directory of manifest.json; shard paths are relative to it

    @property
    def field(self) -> str:
        """Member extension of the token arrays: "u16" or "u32"."""
        return "u16" if self.dtype == "uint16" else "u32"

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def shard_url(self, shard: ShardInfo) -> str:
        """Local path (joined to the manifest's directory) or the URL as written."""
        if "://" in shard.path or shard.path.startswith("pipe:"):
            return shard.path
        return str(self.root / shard.path)

    def to_json(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "split": self.split,
            "dtype": self.dtype,
            "samples": self.samples,
            "tokens": self.tokens,
            "special": self.special.to_dict(),
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "writer": self.writer,
            "source": self.source,
            "shards": [dataclasses.asdict(s) for s in self.shards],
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        """Load `path` (a manifest.json or the directory holding one); DataError if it is not one."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILE
        rebuild = "rebuild the split with `performer data shards` (or `performer data prepare`) or restore it"
        if not path.is_file():
            raise DataError(
                f"no shard manifest at {path}; build shards with `performer data shards` "
                "or `performer data prepare`, or correct the path"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:  # not UTF-8, not JSON, cut short
            problem = "is empty" if path.stat().st_size == 0 else f"is not JSON ({error})"
            raise DataError(f"shard manifest {path} {problem}: damaged or not a manifest; {rebuild}") from None
        form = (raw.get("format"), raw.get("version")) if isinstance(raw, dict) else (type(raw).__name__, None)
        if form != (MANIFEST_FORMAT, MANIFEST_VERSION):
            raise DataError(
                f"{path} is not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest (format={form[0]!r}, "
                f"version={form[1]!r}); point to a split written by `performer data shards`"
            )
        try:
            return cls(
                split=raw["split"],
                dtype=raw["dtype"],
                special=SpecialTokens.from_dict(raw["special"]),
                tokenizer_fingerprint=raw["tokenizer_fingerprint"],
                shards=tuple(ShardInfo(**s) for s in raw["shards"]),
                writer=raw["writer"],
                source=raw["source"],
                root=path.parent,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"shard manifest {path} is incomplete or malformed ({type(error).__name__}: {error}); {rebuild}"
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
        """sha256 of the shard list (names, counts, hashes): identifies the data a cursor refers to."""
        shards = json.dumps([dataclasses.asdict(s) for s in self.shards], sort_keys=True)
        return hashlib.sha256(shards.encode()).hexdigest()


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


# --------------------------------------------------------------------------------------- writing


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
    """Write token arrays (one per document, empty ones skipped) as shards + manifest.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(special.vocab_size)
    field = "u16" if dtype == "uint16" else "u32"
    counts: dict[str, list[int]] = {}  # shard file -> [samples, tokens]
    pattern = str(out / f"{split}-%06d.tar")
    index = 0
    # ShardWriter opens its first tar eagerly, so peek first: an empty split writes no files.
    documents = iter(documents)
    first = next((d for d in documents if len(d)), None)
    if first is None:
        raise DataError(
            f"split {split!r} has no non-empty documents; nothing to write (a larger corpus, or "
            "another --heldout-fraction)"
        )
    # mtime=0 and ustar: identical inputs give identical bytes (and smaller headers than pax).
    with wds.ShardWriter(
        pattern,
        maxcount=config.max_samples_per_shard,
        maxsize=config.max_bytes_per_shard,
        verbose=0,
        mtime=0,
        format=tarfile.USTAR_FORMAT,
    ) as writer:
        for tokens in _chain_first(first, documents):
            if len(tokens) == 0:
                continue
            if int(np.max(tokens)) >= special.vocab_size or int(np.min(tokens)) < 0:
                raise ValueError(f"document {index} has ids outside [0, {special.vocab_size})")
            payload = np.ascontiguousarray(tokens, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
            writer.write({"__key__": f"{index:0{KEY_DIGITS}d}", field: payload})
            stats = counts.setdefault(writer.fname, [0, 0])
            stats[0] += 1
            stats[1] += len(tokens)
            index += 1
    shards = tuple(
        ShardInfo(
            path=Path(fname).name,
            samples=samples,
            tokens=tokens,
            bytes=os.path.getsize(fname),
            sha256=sha256_file(fname),
        )
        for fname, (samples, tokens) in sorted(counts.items())
    )
    manifest = Manifest(
        split=split,
        dtype=dtype,
        special=special,
        tokenizer_fingerprint=tokenizer_fingerprint,
        shards=shards,
        writer={**strict.plain(config), "tar_format": "ustar", "mtime": 0, "field": field},
        source=source or {},
        root=out,
    )
    # Write-then-rename: a reader never sees a half-written manifest.
    tmp = out / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    os.replace(tmp, out / MANIFEST_FILE)
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
    """A shard does not match its manifest entry; the message says how."""


class ShardChecksumError(ShardError):
    """Right size, wrong sha256: another file in the shard's place, or silent corruption."""


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """Where each document of a verified shard lies: what the stream reads by offset."""

    offsets: np.ndarray  # int64, byte offset of each document's token array in the tar
    lengths: np.ndarray  # int64, tokens of each document


def read_shard_bytes(url: str) -> bytes:
    """The whole shard, through webdataset's opener (local paths, URLs, and pipe: commands)."""
    with wds.gopen(url, "rb") as stream:
        return stream.read()


def verify_shard(manifest: Manifest, shard: ShardInfo, *, check_sha256: bool = True) -> ShardIndex:
    """Check `shard` against its manifest entry; return its index or raise ShardError(reason).

    Checks, in order: the file exists and has the manifest's size; its sha256 matches (unless
    disabled); it parses as a tar whose members all lie inside the file; it has the manifest's
    member count, all named "<key>.<field>" with whole token arrays; token counts match.
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
    try:
        with tarfile.open(url, "r:") if local else tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardError(f"not a readable tar ({error})") from None
    if len(members) != shard.samples:
        raise ShardError(f"{len(members)} samples, manifest says {shard.samples}")
    itemsize = np.dtype(manifest.dtype).itemsize
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
    return ShardIndex(offsets=offsets, lengths=lengths)


def verify_manifest(
    manifest: Manifest, *, check_sha256: bool = True
) -> tuple[dict[int, ShardIndex], dict[str, ShardError]]:
    """Verify every shard: (index of each good shard by position, error of each bad shard by path;
    str(error) is the reason, its class tells a checksum mismatch from a damaged file)."""
    good: dict[int, ShardIndex] = {}
    bad: dict[str, ShardError] = {}
    for position, shard in enumerate(manifest.shards):
        try:
            good[position] = verify_shard(manifest, shard, check_sha256=check_sha256)
        except ShardError as error:
            bad[shard.path] = error
    return good, bad
