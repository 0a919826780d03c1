"""Text sources for pretraining: files, directories, globs, JSONL, and the embedded stdlib corpus.

A corpus yields `Document(doc_id, text)` in a deterministic order (sorted ids), so every machine
that builds shards from the same inputs builds the same shards.

Sources (`CorpusConfig.source`):
- ``"stdlib"``: the `.py` sources of the running interpreter's standard library (~730 files,
  ~12 MB of real text on every machine with Python; test suites and site-packages excluded).
  Document ids are paths relative to the stdlib root, so they do not name this machine.
- ``"files"``: text files from paths, directories (recursively, filtered by `extensions`) and
  glob patterns; one file is one document.
- ``"jsonl"``: JSON Lines files; each line is an object whose `text_field` holds one document.

The held-out split is a pure function of each document's content: a document is held out when
the first 8 bytes of sha256(salt + text) fall below `heldout_fraction` of 2**64. Duplicates
therefore always land on the same side, and adding documents never moves existing ones.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator, NamedTuple

from data.errors import DataError
from performer import strict

SOURCES = ("stdlib", "files", "jsonl")
SPLITS = ("train", "heldout")

# Directories of the stdlib that are not "library text": test suites and third-party packages.
_STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})


class Document(NamedTuple):
    doc_id: str  # stable identifier: a relative path, or "file:line" for JSONL
    text: str


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    source: str = "stdlib"  # one of SOURCES
    paths: tuple[str, ...] = ()  # files, directories or glob patterns (for "files" and "jsonl")
    text_field: str = "text"  # JSONL field holding the document text
    extensions: tuple[str, ...] = (".txt", ".md", ".py")  # files picked from directories
    heldout_fraction: float = 0.03  # share of documents held out for evaluation, by content hash
    split_salt: str = "performer-heldout-v1"  # change it to draw a different held-out split
    max_documents: int | None = None  # keep only the first N documents (after sorting): smoke runs
    min_chars: int = 1  # skip documents shorter than this (after stripping whitespace)

    @classmethod
    def from_dict(cls, values: dict) -> "CorpusConfig":
        """From a plain mapping (YAML); unknown keys are errors."""
        return strict.build(cls, values, "corpus")

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"corpus.source={self.source!r}: choose one of {SOURCES}")
        if self.source != "stdlib" and not self.paths:
            raise DataError(f"corpus.source={self.source!r} needs corpus.paths (files, dirs or globs)")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise DataError(f"corpus.heldout_fraction={self.heldout_fraction} must be in [0, 1)")
        if self.max_documents is not None and self.max_documents < 1:
            raise DataError(f"corpus.max_documents={self.max_documents} must be >= 1 or None")


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_paths() -> list[tuple[str, Path]]:
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    if not found:
        raise DataError(f"no .py files under the stdlib directory {root}; use --source files or jsonl")
    return sorted(found)


def _expand_paths(patterns: tuple[str, ...], extensions: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Expand files, directories and globs to (id, path) pairs; ids are as given, never absolute
    paths of this machine unless the user passed them."""
    found: dict[str, Path] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"corpus path {pattern!r} matched nothing; check the path or quote the glob")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                for child in sorted(path.rglob("*")):
                    if child.is_file() and child.suffix in extensions:
                        found[child.as_posix()] = child
            elif path.is_file():
                found[path.as_posix()] = path
            else:
                raise DataError(f"corpus path {match!r} does not exist")
    return sorted(found.items())


def _read_text(path: Path) -> str:
    # Undecodable bytes are replaced, not fatal: one odd file must not stop a corpus build.
    return path.read_text(encoding="utf-8", errors="replace")


def source_paths(config: CorpusConfig) -> list[tuple[str, Path]]:
    """(id, path) of every file of the corpus; DataError when a path names nothing (check it
    before any work starts)."""
    if config.source == "stdlib":
        return _stdlib_paths()
    return _expand_paths(config.paths, config.extensions if config.source == "files" else (".jsonl", ".json"))


def _iter_raw(config: CorpusConfig) -> Iterator[Document]:
    if config.source != "jsonl":
        for doc_id, path in source_paths(config):
            yield Document(doc_id, _read_text(path))
    else:
        for file_id, path in source_paths(config):
            with open(path, "rb") as handle:
                for line_no, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line.decode("utf-8"))
                    except ValueError as error:  # not UTF-8, not JSON
                        raise DataError(
                            f"{file_id}:{line_no}: not a JSON line ({error}); JSONL holds one JSON object per line"
                        ) from None
                    if not isinstance(record, dict) or config.text_field not in record:
                        raise DataError(
                            f"{file_id}:{line_no}: no field {config.text_field!r}; "
                            "set corpus.text_field to the field that holds the text"
                        )
                    yield Document(f"{file_id}:{line_no}", str(record[config.text_field]))


def iter_documents(config: CorpusConfig, split: str | None = None) -> Iterator[Document]:
    """Documents of the corpus in deterministic order; `split` = "train", "heldout" or None (all)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {SPLITS} or None")
    kept = 0
    for doc in _iter_raw(config):
        if config.max_documents is not None and kept >= config.max_documents:
            return
        if len(doc.text.strip()) < config.min_chars:
            continue
        kept += 1
        if split is None or split_of(doc.text, config.heldout_fraction, config.split_salt) == split:
            yield doc


def split_of(text: str, heldout_fraction: float, salt: str = CorpusConfig.split_salt) -> str:
    """ "heldout" or "train" for a document, from its content hash (see the module docstring)."""
    digest = hashlib.sha256(salt.encode() + text.encode("utf-8", errors="replace")).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    return "heldout" if position < heldout_fraction else "train"
