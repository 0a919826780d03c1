"""Corpora for pretraining: the embedded stdlib corpus, or files of any format `data.sources` reads.

A corpus yields `Document(doc_id, text)` in a deterministic order (sorted file names, then file
order), so every machine that builds shards from the same inputs builds the same shards.

Sources (`CorpusConfig.source`):
- ``"stdlib"``: the `.py` sources of the running interpreter's standard library (~730 files,
  ~12 MB of real text on every machine with Python; test suites and site-packages excluded).
  Document ids are paths relative to the stdlib root, so they do not name this machine.
- ``"paths"``: files, directories (recursively) and glob patterns in any format of
  `data.sources.FORMATS` (JSON lines, JSON lists, Parquet, saved Hugging Face datasets, WebDataset
  tars, plain text; compressed or not), detected from each file's name unless `format` forces one.
  `text_field` is a dotted path into records (``meta.text``).
- ``"files"`` and ``"jsonl"`` (older configs and manifests): paths read as plain text (directories
  filtered by `extensions`, ``.txt .md .py`` by default) or as JSON lines (``.jsonl``/``.json``).

A file or record that cannot be read stops the build (`on_error="stop"`, a DataError naming the
file, the line or row, the problem and the fix) or is left out and listed (``"skip"``).

The held-out split is a pure function of each document's content: a document is held out when
the first 8 bytes of sha256(salt + text) fall below `heldout_fraction` of 2**64. Duplicates
therefore always land on the same side, and adding documents never moves existing ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Iterator

from data.errors import DataError
from data.sources import FORMATS, ON_ERROR, Document, Skipped, WorkUnit, plan_units, read_unit, stdlib_units
from data.sources import stdlib_root as stdlib_root
from performer import strict

SOURCES = ("stdlib", "paths")
# Sources of older configs and manifests: paths read in one format, directories filtered by suffix.
OLD_SOURCES = {"files": ("text", (".txt", ".md", ".py")), "jsonl": ("jsonl", (".jsonl", ".json"))}
SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    source: str = "stdlib"  # one of SOURCES (or OLD_SOURCES)
    paths: tuple[str, ...] = ()  # files, directories or glob patterns
    format: str | None = None  # one of data.sources.FORMATS for every file; None: from each file's name
    text_field: str = "text"  # field holding the text in JSON/Parquet/Arrow records; dotted: nested
    extensions: tuple[str, ...] = ()  # files picked from directories; () = every recognised format
    heldout_fraction: float = 0.03  # share of documents held out for evaluation, by content hash
    split_salt: str = "performer-heldout-v1"  # change it to draw a different held-out split
    max_documents: int | None = None  # keep only the first N documents (after sorting): smoke runs
    min_chars: int = 1  # skip documents shorter than this (after stripping whitespace)
    on_error: str = "stop"  # a bad file or record: "stop" (DataError) or "skip" (left out, listed)

    @classmethod
    def from_dict(cls, values: dict) -> "CorpusConfig":
        """From a plain mapping (YAML, a manifest's recorded corpus); unknown keys are errors."""
        return strict.build(cls, values, "corpus")

    def __post_init__(self) -> None:
        if self.source not in SOURCES and self.source not in OLD_SOURCES:
            raise DataError(f"corpus.source={self.source!r}: choose one of {SOURCES}")
        if self.source != "stdlib" and not self.paths:
            raise DataError(f"corpus.source={self.source!r} needs corpus.paths (files, dirs or globs)")
        if self.source == "stdlib" and self.paths:
            raise DataError("corpus.source='stdlib' reads no paths; drop --source stdlib to read corpus.paths")
        if self.format is not None and (self.format not in FORMATS or self.source != "paths"):
            raise DataError(f"corpus.format={self.format!r}: choose one of {FORMATS} (with source 'paths') or None")
        if self.on_error not in ON_ERROR:
            raise DataError(f"corpus.on_error={self.on_error!r}: choose one of {ON_ERROR}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise DataError(f"corpus.heldout_fraction={self.heldout_fraction} must be in [0, 1)")
        if self.max_documents is not None and self.max_documents < 1:
            raise DataError(f"corpus.max_documents={self.max_documents} must be >= 1 or None")


def plan(config: CorpusConfig, skipped: list[Skipped] | None = None) -> list[WorkUnit]:
    """The corpus's work units in reading order; a path that names nothing is a DataError (so
    checking the plan before any work catches it), unreadable Parquet footers go by `on_error`."""
    if config.source == "stdlib":
        return stdlib_units()
    form, extensions = config.format, config.extensions
    if config.source in OLD_SOURCES:
        form, default = OLD_SOURCES[config.source]
        extensions = default if config.source == "jsonl" else (extensions or default)
    return plan_units(
        config.paths,
        format=form,
        text_field=config.text_field,
        extensions=extensions,
        on_error=config.on_error,
        skipped=skipped,
    )


def source_paths(config: CorpusConfig) -> list[tuple[str, Path]]:
    """(name, path) of every file of the corpus, sorted; DataError when a path names nothing."""
    return sorted({(unit.name, Path(unit.path)) for unit in plan(config)})


def _iter_raw(config: CorpusConfig, skipped: list[Skipped] | None) -> Iterator[Document]:
    for unit in plan(config, skipped):
        yield from read_unit(unit, text_field=config.text_field, on_error=config.on_error, skipped=skipped)


def iter_documents(
    config: CorpusConfig, split: str | None = None, skipped: list[Skipped] | None = None
) -> Iterator[Document]:
    """Documents of the corpus in deterministic order; `split` = "train", "heldout" or None (all).
    Under ``on_error="skip"`` what was left out is appended to `skipped` as it is met."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {SPLITS} or None")
    kept = 0
    for doc in _iter_raw(config, skipped):
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
