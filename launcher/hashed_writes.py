"""Checkpoint files hashed while DeepSpeed writes them, not read back afterwards.

A checkpoint's COMPLETE marker records the size and digest of every file (launcher/checkpoint.py).
Reading the files back to hash them costs the step loop a second pass over the checkpoint; here
DeepSpeed's own writer (its ``TorchCheckpointEngine``, through which every state file of a save
goes) is wrapped so that ``torch.save`` writes into a file object that writes each block while a
helper thread hashes the same block: both release the GIL, so the hash runs beside the write
instead of after it, and no block is copied. The digest is XXH3-128 rather than sha256: the marker
guards against torn, corrupted and swapped files, not against whoever can rewrite the marker too
(it is not signed), which a 128-bit digest does as well, at a small fraction of sha256's CPU time
(benchmarks/checkpoint_io.py), which matters where a rank has no idle core to hide the hash on.
What a save wrote is handed to the commit by ``take_written_digests``; files written another way
are still read back and hashed there.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash

DIGEST = "xxh3_128"  # the digest's key in a COMPLETE marker (markers written before this change: "sha256")


def new_hash(algorithm: str = DIGEST):
    """A running hash of ``algorithm``: DIGEST, or a hashlib name (sha256, in older markers)."""
    return xxhash.xxh3_128() if algorithm == DIGEST else hashlib.new(algorithm)


# Blocks smaller than this are written and hashed in turn: handing them to the thread costs more.
_PARALLEL_BYTES = 1 << 20


class HashingWriter:
    """A write-only file that also computes the XXH3-128 digest and size of what goes through it.

    Deliberately without ``fileno``: torch.save then writes through ``write`` instead of to the
    descriptor directly, so every byte is hashed.
    """

    def __init__(self, path: str | os.PathLike, pool: ThreadPoolExecutor):
        self._file = open(path, "wb")
        self._pool = pool
        self._hash = new_hash()
        self.bytes = 0

    def write(self, data) -> int:
        block = memoryview(data).cast("B")  # the caller's buffer, valid until we return
        if block.nbytes >= _PARALLEL_BYTES:
            # The helper hashes while this thread writes (measured faster than the other way round).
            hashed = self._pool.submit(self._hash.update, block)
            self._file.write(block)
            hashed.result()
        else:
            self._file.write(block)
            self._hash.update(block)
        self.bytes += block.nbytes
        return block.nbytes

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def digest(self) -> dict[str, Any]:
        """As launcher.checkpoint records a file: its size and digest."""
        return {"bytes": self.bytes, DIGEST: self._hash.hexdigest()}


class HashingCheckpointEngine:
    """DeepSpeed's torch checkpoint engine with ``save`` writing through a `HashingWriter`.

    Everything else (create, load, commit, attributes) is the wrapped engine's.
    """

    def __init__(self, inner):
        self._inner = inner
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-write")
        self._lock = threading.Lock()
        self._digests: dict[str, dict[str, Any]] = {}

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def save(self, state_dict, path: str) -> None:
        import torch

        serialization = getattr(self._inner, "zipfile_serialization", True)
        with HashingWriter(path, self._pool) as handle:
            torch.save(state_dict, handle, _use_new_zipfile_serialization=serialization)
        with self._lock:
            self._digests[str(Path(path).resolve())] = handle.digest()

    def take_digests(self, tag_directory: Path) -> dict[str, dict[str, Any]]:
        """The digests of the files saved under ``tag_directory`` (names relative to it), forgotten here."""
        root = Path(tag_directory).resolve()
        taken = {}
        with self._lock:
            for path in list(self._digests):
                relative = Path(path)
                if relative.is_relative_to(root):
                    taken[relative.relative_to(root).as_posix()] = self._digests.pop(path)
        return taken


def install(engine) -> bool:
    """Wrap the engine's checkpoint writer when it is DeepSpeed's plain torch one; True if wrapped.

    Other writers (Nebula, the decoupled or fast engines a ``deepspeed:`` block may select) are left
    alone; their files are read back and hashed at the commit, as before.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is not TorchCheckpointEngine:
        return isinstance(current, HashingCheckpointEngine)
    engine.checkpoint_engine = HashingCheckpointEngine(current)
    return True


def take_written_digests(engine, tag_directory: Path) -> dict[str, dict[str, Any]]:
    """What this rank's save wrote under ``tag_directory``, hashed on the way; {} without the wrapper."""
    writer = getattr(engine, "checkpoint_engine", None)
    return writer.take_digests(tag_directory) if isinstance(writer, HashingCheckpointEngine) else {}
