"""Corpus files of every format the pipeline reads: detection, work units, one small reader each.

    units = plan_units(["c4/"], text_field="text")      # sorted: one file, Parquet row group or Arrow file each
    for unit in units:
        for doc in read_unit(unit, text_field="text"):   # Document(doc_id, text), streamed
            ...

Formats (`FORMATS`; detected from the file name by `detect`, or forced with `format=`):

- ``jsonl``: JSON lines, one record per line; a document is the record's text field. Id
  ``name:LINE`` (1-based, blank lines counted).
- ``json``: a file holding one JSON list of records, parsed item by item (never loaded whole). Id
  ``name:itemN`` (0-based). A ``.json`` file whose first character is not ``[`` is read as JSON
  lines (C4 ships JSON lines as ``.json.gz``).
- ``parquet``: one unit per row group, read in batches and only the text column (a dotted field is
  a nested struct column). Id ``name:rgG:rowR`` (0-based, the row within its row group).
- ``arrow``: Arrow IPC files; a directory written by Hugging Face ``datasets.save_to_disk`` (it
  holds ``state.json``) is read through the files its ``_data_files`` lists, one unit each, with
  pyarrow only. Id ``name:rowR`` (0-based).
- ``webdataset``: tars whose samples hold a ``.txt`` member (the document) or a ``.json`` member (a
  record with the text field); other members are ignored. Id ``name:KEY.txt`` / ``name:KEY.json``.
- ``text``: one file, one document (``.txt``, ``.md``, ``.py``). Id: the name.

Every format but Parquet and Arrow may be compressed: ``.gz``, ``.zst``, ``.xz``, ``.bz2`` after the
format's suffix (``.tgz`` is a gzipped tar), decompressed as a stream. Names are the paths as the
user gave them (a directory's files joined to it), so document ids never name this machine
beyond that.

Bad input: a file that cannot be read (damaged or cut-short compression, not Parquet, bytes that
are not UTF-8, an empty record file) or a record that cannot be used (not JSON, no text field, a
null text) is one line naming the file, the line or row, the problem and the fix. With
``on_error="stop"`` it is raised as a `DataError`; with ``"skip"`` the record, or the rest of the
file, is left out and a `Skipped` entry appended to the caller's list. A path that names nothing, a
name whose format cannot be told, or a compressed Parquet file is always a DataError: those are
fixed on the command line.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import os
import sysconfig
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple, Sequence

from data.errors import DataError

FORMATS = ("jsonl", "json", "parquet", "arrow", "webdataset", "text")
ON_ERROR = ("stop", "skip")

# File name suffixes (after a compression suffix is taken off) -> format.
SUFFIXES: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".tar": "webdataset",
    ".txt": "text",
    ".md": "text",
    ".py": "text",
}
COMPRESSIONS: dict[str, str] = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz", ".bz2": "bz2"}
_SHORTHANDS = {".tgz": ("webdataset", "gzip")}
_UNCOMPRESSED_ONLY = ("parquet", "arrow")  # compressed inside; their readers need to seek

DATASET_STATE = "state.json"  # marks a directory written by datasets.save_to_disk
DATASET_DICT = "dataset_dict.json"  # a DatasetDict: one directory per split

# Directories of the stdlib that are not "library text": test suites and third-party packages.
_STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})

_CHUNK = 1 << 16
_BATCH_ROWS = 1024
_FIX_SKIP = "or pass --on-error skip to leave it out"
_FIX_DAMAGED = "re-download or re-create the file"
_FIX_FIELD = (
    "pass --text-field (corpus.text_field) naming the field that holds the text (a dotted path such as "
    "meta.text reaches into nested records)"
)
_FIX_UTF8 = "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"


class Document(NamedTuple):
    doc_id: str  # stable: the file as named, plus the line, item or row ("c4/x.json.gz:17")
    text: str


class WorkUnit(NamedTuple):
    """One piece of reading work: a file, one Parquet row group, or one Arrow file of a saved dataset."""

    name: str  # the file as the user named it; document ids start with it
    path: str  # where to open it (the same unless the name is relative to a root: the stdlib)
    format: str  # one of FORMATS
    compression: str | None = None  # one of COMPRESSIONS' values
    part: int | None = None  # the Parquet row group

    @property
    def label(self) -> str:
        return self.name if self.part is None else f"{self.name}:rg{self.part}"


class Skipped(NamedTuple):
    """What `on_error="skip"` left out: a whole file ("file") or one record ("record")."""

    where: str  # "c4/x.json.gz:17", or the file
    what: str  # "file" or "record"
    problem: str


class _Report:
    """Raise a bad input (stop) or note it and go on (skip)."""

    def __init__(self, on_error: str, skipped: list[Skipped] | None):
        if on_error not in ON_ERROR:
            raise DataError(f"on_error={on_error!r}: choose one of {ON_ERROR}")
        self.on_error = on_error
        self.skipped = skipped if skipped is not None else []

    def __call__(self, where: str, problem: str, fix: str, what: str = "record") -> None:
        if self.on_error == "stop":
            raise DataError(f"{where}: {problem}; {fix}, {_FIX_SKIP}")
        self.skipped.append(Skipped(where, what, problem))


# ----------------------------------------------------------------------------------- detection


def detect(name: str) -> tuple[str | None, str | None]:
    """(format, compression) of a file from its name; format None when the name says nothing."""
    lower = name.lower()
    for suffix, found in _SHORTHANDS.items():
        if lower.endswith(suffix):
            return found
    compression = None
    for suffix, kind in COMPRESSIONS.items():
        if lower.endswith(suffix):
            compression, lower = kind, lower[: -len(suffix)]
            break
    for suffix, form in SUFFIXES.items():
        if lower.endswith(suffix):
            return form, compression
    return None, compression


def _known_suffixes() -> str:
    return " ".join([*SUFFIXES, *_SHORTHANDS]) + f" (each may end in {' '.join(COMPRESSIONS)})"


# -------------------------------------------------------------------------------------- planning


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_units() -> list[WorkUnit]:
    """The `.py` files of this Python's standard library (test suites excluded), named relative to
    its root so ids do not name this machine."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append(WorkUnit(path.relative_to(root).as_posix(), str(path), "text"))
    if not found:
        raise DataError(f"no .py files under the stdlib directory {root}; pass --paths")
    return sorted(found)


def plan_units(
    paths: Sequence[str],
    *,
    format: str | None = None,
    text_field: str = "text",
    extensions: Sequence[str] = (),
    on_error: str = "stop",
    skipped: list[Skipped] | None = None,
) -> list[WorkUnit]:
    """The work units of files, directories and globs, sorted by (name, row group).

    `format` forces one format on every file (None: detect it from the name). Directories are
    walked recursively: hidden entries are passed over, a ``save_to_disk`` directory is a dataset,
    and the files taken are those of a recognised format (or, when `extensions` is given, those
    whose name minus a compression suffix ends in one of them). Named files and glob matches are
    always taken. Parquet footers and saved-dataset states are read here (a file that fails, or a
    Parquet file without `text_field`, is reported under `on_error`).
    """
    if format is not None and format not in FORMATS:
        raise DataError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    report = _Report(on_error, skipped)
    units: dict[tuple[str, int], WorkUnit] = {}

    def add(unit: WorkUnit) -> None:
        units[(unit.name, -1 if unit.part is None else unit.part)] = unit

    for pattern in paths:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"corpus path {pattern!r} matched nothing; check the path or quote the glob")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                for unit in _directory_units(path, format, text_field, extensions, report):
                    add(unit)
            elif path.is_file():
                for unit in _file_units(path.as_posix(), format, text_field, report):
                    add(unit)
            else:
                raise DataError(f"corpus path {match!r} does not exist")
    return [units[key] for key in sorted(units)]


def _directory_units(
    root: Path, format: str | None, text_field: str, extensions: Sequence[str], report: _Report
) -> Iterator[WorkUnit]:
    if (root / DATASET_STATE).is_file():
        yield from _dataset_units(root, report)
        return
    if (root / DATASET_DICT).is_file():
        splits = sorted(p.name for p in root.iterdir() if (p / DATASET_STATE).is_file())
        raise DataError(
            f"{root.as_posix()} is a datasets DatasetDict with splits {splits}; name one split's directory "
            f"(e.g. {(root / (splits[0] if splits else 'train')).as_posix()})"
        )
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _directory_units(entry, format, text_field, extensions, report)
        elif entry.is_file():
            if extensions:
                bare, _ = _strip_compression(entry.name)
                wanted = any(bare.endswith(suffix) for suffix in extensions)
            else:
                wanted = detect(entry.name)[0] is not None
            if wanted:
                yield from _file_units(entry.as_posix(), format, text_field, report)


def _strip_compression(name: str) -> tuple[str, str | None]:
    for suffix, kind in COMPRESSIONS.items():
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


def _file_units(name: str, format: str | None, text_field: str, report: _Report) -> list[WorkUnit]:
    detected, compression = detect(name)
    form = format or detected
    if form is None:
        raise DataError(
            f"{name}: cannot tell its format from the name (known: {_known_suffixes()}); "
            f"pass --format ({', '.join(FORMATS)}) or rename it"
        )
    if form in _UNCOMPRESSED_ONLY and compression is not None:
        raise DataError(
            f"{name}: a {form} file is compressed inside and is read by seeking; decompress it ({compression}) first"
        )
    if form == "parquet":
        return _parquet_units(name, text_field, report)
    return [WorkUnit(name, name, form, compression)]


def _parquet_units(name: str, text_field: str, report: _Report) -> list[WorkUnit]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(name) as parquet:
            metadata, schema = parquet.metadata, parquet.schema_arrow
    except (pa.ArrowException, OSError) as error:
        report(name, f"is not a readable Parquet file ({_why(error)})", _FIX_DAMAGED, what="file")
        return []
    problem = _column_problem(schema, text_field)
    if problem:
        report(name, problem, _FIX_FIELD, what="file")
        return []
    if metadata.num_rows == 0:
        report(name, "is empty (no rows)", "remove it from --paths", what="file")
        return []
    return [WorkUnit(name, name, "parquet", None, group) for group in range(metadata.num_row_groups)]


def _dataset_units(root: Path, report: _Report) -> list[WorkUnit]:
    state = root / DATASET_STATE
    fix = "re-save the dataset with datasets' save_to_disk"
    try:
        files = [entry["filename"] for entry in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        report(state.as_posix(), f"is not a datasets state with _data_files ({_why(error)})", fix, what="file")
        return []
    units = []
    for filename in files:
        path = root / filename
        if not path.is_file():
            report(path.as_posix(), f"is listed in {DATASET_STATE} but missing", fix, what="file")
            continue
        units.append(WorkUnit(path.as_posix(), path.as_posix(), "arrow"))
    return units


# --------------------------------------------------------------------------------------- reading


def read_unit(
    unit: WorkUnit, *, text_field: str = "text", on_error: str = "stop", skipped: list[Skipped] | None = None
) -> Iterator[Document]:
    """The documents of one unit, in file order, streamed. A bad record or file is raised as a
    DataError (``on_error="stop"``) or left out and appended to `skipped` (``"skip"``)."""
    report = _Report(on_error, skipped)
    cursor = _Cursor()
    reader = _READERS[unit.format]
    try:
        yield from reader(unit, text_field, report, cursor)
    except _Damaged as damaged:
        report(unit.label, damaged.problem + cursor.after(report), damaged.fix, what="file")
        return
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError, UnicodeDecodeError) as error:
        problem, fix = _classify(unit, error)
        report(unit.label, problem + cursor.after(report), fix, what="file")
        return
    except Exception as error:  # zstandard's and pyarrow's errors, imported lazily
        if type(error).__module__.split(".")[0] not in ("zstandard", "pyarrow"):
            raise
        problem, fix = _classify(unit, error)
        report(unit.label, problem + cursor.after(report), fix, what="file")
        return
    if cursor.records == 0 and unit.format in ("jsonl", "json", "webdataset"):
        what = "no .txt or .json members" if unit.format == "webdataset" else "no records"
        report(unit.name, f"is empty ({what})", "remove it from --paths", what="file")


class _Cursor:
    """How far a reader got: for the message of a file that breaks partway."""

    def __init__(self) -> None:
        self.records = 0
        self.position = ""  # "line 120", "item 7", "row 3071"

    def after(self, report: _Report) -> str:
        if not self.position:
            return ""
        kept = "; the records before it were kept" if report.on_error == "skip" else ""
        return f" (after {self.position}{kept})"


class _Damaged(Exception):
    def __init__(self, problem: str, fix: str = _FIX_DAMAGED):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def _why(error: BaseException) -> str:
    name = type(error).__name__
    if name == "error":  # zlib.error
        name = f"{type(error).__module__}.error"
    return f"{name}: {' '.join(str(error).split())}"


def _classify(unit: WorkUnit, error: BaseException) -> tuple[str, str]:
    """(problem, fix) of a low-level error reading `unit`."""
    stream = f"{unit.compression} stream" if unit.compression else "file"
    if isinstance(error, UnicodeDecodeError):
        return f"holds bytes that are not UTF-8 ({error.reason} at byte {error.start} of a read)", _FIX_UTF8
    if isinstance(error, EOFError):
        return f"is cut short: the {stream} ends before its end marker", _FIX_DAMAGED
    if isinstance(error, OSError) and error.errno is not None:
        return f"cannot be read ({_why(error)})", "check the path and its permissions"
    if isinstance(error, tarfile.TarError):
        return f"is not a readable tar archive ({_why(error)})", _FIX_DAMAGED
    if unit.format in ("parquet", "arrow") and unit.compression is None:
        return f"is not a readable {unit.format.capitalize()} file ({_why(error)})", _FIX_DAMAGED
    return f"is not valid {unit.compression or unit.format} data ({_why(error)})", _FIX_DAMAGED


def _open(unit: WorkUnit) -> BinaryIO:
    """The file's bytes, decompressed as a stream; a buffered reader (it can `peek`)."""
    if unit.compression is None:
        return open(unit.path, "rb")
    if unit.compression == "gzip":
        return gzip.open(unit.path, "rb")
    if unit.compression == "xz":
        return lzma.open(unit.path, "rb")
    if unit.compression == "bz2":
        return bz2.open(unit.path, "rb")
    return io.BufferedReader(_ZstdReader(open(unit.path, "rb")), buffer_size=_CHUNK)


class _ZstdReader(io.RawIOBase):
    """zstd frames decompressed as a stream; a stream cut inside a frame is an EOFError (the
    `zstandard` stream reader would end quietly there)."""

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._raw, self._zstd = raw, zstandard
        self._decoder = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False
        self._pending, self._offset = b"", 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset >= len(self._pending):
            if self._done:
                return 0
            chunk = self._raw.read(_CHUNK)
            if not chunk:
                self._done = True
                if self._in_frame:
                    raise EOFError("the zstd stream ends inside a frame")
                return 0
            self._pending, self._offset = self._feed(chunk), 0
        size = min(len(buffer), len(self._pending) - self._offset)
        buffer[:size] = self._pending[self._offset : self._offset + size]
        self._offset += size
        return size

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._decoder.decompress(data))
            if self._decoder.eof:  # a frame ended; what follows is the next frame
                data = self._decoder.unused_data
                self._decoder = self._zstd.ZstdDecompressor().decompressobj()
                self._in_frame = False
            else:
                data, self._in_frame = b"", True
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _decode(raw: bytes, where: str, report: _Report) -> str | None:
    """UTF-8 text; None when reported."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        report(where, f"holds bytes that are not UTF-8 ({error.reason} at byte {error.start})", _FIX_UTF8)
        return None


def _text(raw: bytes, where: str, report: _Report) -> str | None:
    """A document's UTF-8 text with universal newlines (as `Path.read_text`); None when reported."""
    text = _decode(raw, where, report)
    return None if text is None else text.replace("\r\n", "\n").replace("\r", "\n")


def _read_text(unit: WorkUnit, text_field: str, report: _Report, cursor: _Cursor) -> Iterator[Document]:
    with _open(unit) as stream:
        raw = stream.read()
    cursor.records += 1
    text = _text(raw, unit.name, _file_report(report))
    if text is not None:
        yield Document(unit.name, text)


def _file_report(report: _Report) -> Callable[[str, str, str], None]:
    return lambda where, problem, fix: report(where, problem, fix, what="file")


def _field(record: object, text_field: str) -> tuple[str | None, str]:
    """(text, "") or (None, problem) for one record."""
    if not isinstance(record, dict):
        return None, f"holds {_json_kind(record)}, not an object with a {text_field!r} field"
    if text_field in record:
        value = record[text_field]
    else:
        value = record
        for part in text_field.split("."):
            if not isinstance(value, dict) or part not in value:
                keys = ", ".join(list(record)[:8]) + (", ..." if len(record) > 8 else "")
                return None, f"has no field {text_field!r} (fields: {keys or 'none'})"
            value = value[part]
    if not isinstance(value, str):
        return None, f"field {text_field!r} is {_json_kind(value)}, not a string"
    return value, ""


def _json_kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _record(where: str, record: object, text_field: str, report: _Report) -> Document | None:
    text, problem = _field(record, text_field)
    if text is None:
        report(where, problem, _FIX_FIELD)
        return None
    return Document(where, text)


def _read_json(unit: WorkUnit, text_field: str, report: _Report, cursor: _Cursor) -> Iterator[Document]:
    with _open(unit) as stream:
        head = stream.peek(_CHUNK).lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
        if unit.format == "json" and head[:1] == b"[":
            yield from _json_array(unit, stream, text_field, report, cursor)
        else:
            yield from _json_lines(unit, stream, text_field, report, cursor)


def _json_lines(
    unit: WorkUnit, stream: BinaryIO, text_field: str, report: _Report, cursor: _Cursor
) -> Iterator[Document]:
    for line_no, line in enumerate(stream, start=1):
        if line_no == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        if not line.strip():
            cursor.position = f"line {line_no}"
            continue
        cursor.records += 1
        where = f"{unit.name}:{line_no}"
        text = _decode(line, where, report)
        cursor.position = f"line {line_no}"
        if text is None:
            continue
        try:
            record = json.loads(text)
        except ValueError as error:
            report(where, f"not a JSON line ({error})", "a JSON-lines file holds one JSON object per line")
            continue
        doc = _record(where, record, text_field, report)
        if doc is not None:
            yield doc


def _json_array(
    unit: WorkUnit, stream: BinaryIO, text_field: str, report: _Report, cursor: _Cursor
) -> Iterator[Document]:
    """Items of one top-level JSON list, decoded one at a time from a bounded buffer."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    decoder = json.JSONDecoder()
    buffer, pos, eof, chunk = "", 0, False, _CHUNK

    def more() -> None:
        nonlocal buffer, pos, eof, chunk
        data = text.read(chunk)
        eof = not data
        buffer, pos = buffer[pos:] + data, 0
        chunk = min(chunk * 2, 1 << 26)  # a large item: fewer re-parses

    def next_char() -> str:
        """The next non-blank character ("" at the end of the file), not consumed."""
        nonlocal pos
        while True:
            while pos < len(buffer) and buffer[pos] in " \t\r\n":
                pos += 1
            if pos < len(buffer) or eof:
                return buffer[pos] if pos < len(buffer) else ""
            more()

    def item() -> object:
        nonlocal pos, chunk
        while True:
            try:
                value, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError as error:
                # Out of input (the item goes on in the next chunk), or not JSON.
                cut = error.pos >= len(buffer) - 16 or error.msg.startswith("Unterminated string")
                if eof and cut:
                    raise _Damaged(f"is cut short: it ends inside item {index}") from None
                if not cut:
                    raise _Damaged(f"item {index} is not JSON ({error})", "fix the JSON list") from None
                more()
                continue
            if end == len(buffer) and not eof:  # a number may go on in the next chunk
                more()
                continue
            pos, chunk = end, _CHUNK
            return value

    index = 0
    if next_char() != "[":
        raise _Damaged("is not a JSON list", "a .json file holds one JSON list of records, or JSON lines")
    pos += 1
    if next_char() == "]":
        pos += 1
    else:
        while True:
            if next_char() == "":
                raise _Damaged("ends inside its JSON list (the file is cut short)")
            record = item()
            cursor.records += 1
            doc = _record(f"{unit.name}:item{index}", record, text_field, report)
            cursor.position = f"item {index}"
            index += 1
            if doc is not None:
                yield doc
            char = next_char()
            pos += 1
            if char == "]":
                break
            if char == "":
                raise _Damaged("ends inside its JSON list (the file is cut short)")
            if char != ",":
                raise _Damaged(f"item {index - 1} is followed by {char!r}, not ',' or ']'", "fix the JSON list")
    if next_char() != "":
        raise _Damaged("holds more after its JSON list", "a .json file holds one JSON list")


def _read_webdataset(unit: WorkUnit, text_field: str, report: _Report, cursor: _Cursor) -> Iterator[Document]:
    """Samples of a WebDataset tar (members grouped by key, as webdataset does): the ``.txt``
    member is the document, else the ``.json`` member's text field."""
    with _open(unit) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        key, sample = None, {}
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            stem, dot, extension = base.partition(".")
            if not dot:
                continue
            member_key = f"{directory}/{stem}" if directory else stem
            if member_key != key:
                yield from _sample(unit, key, sample, text_field, report, cursor)
                key, sample = member_key, {}
            if extension in ("txt", "json"):
                sample[extension] = tar.extractfile(member).read()
        yield from _sample(unit, key, sample, text_field, report, cursor)


def _sample(
    unit: WorkUnit, key: str | None, sample: dict, text_field: str, report: _Report, cursor: _Cursor
) -> Iterator[Document]:
    if key is None or not sample:
        return
    cursor.records += 1
    cursor.position = f"sample {key}"
    extension = "txt" if "txt" in sample else "json"
    where = f"{unit.name}:{key}.{extension}"
    text = (_text if extension == "txt" else _decode)(sample[extension], where, report)
    if text is None:
        return
    if extension == "txt":
        yield Document(where, text)
        return
    try:
        record = json.loads(text)
    except ValueError as error:
        report(where, f"not JSON ({error})", "a .json member holds one JSON object")
        return
    doc = _record(where, record, text_field, report)
    if doc is not None:
        yield doc


# ------------------------------------------------------------------------------- Parquet, Arrow


def _column_problem(schema, text_field: str) -> str:
    """Why `schema` has no text column at the dotted `text_field` ("" when it has)."""
    import pyarrow as pa

    names = ", ".join(schema.names[:8]) + (", ..." if len(schema.names) > 8 else "")
    fields, kind = schema, None
    for depth, part in enumerate(text_field.split(".")):
        index = fields.get_field_index(part) if fields is not None else -1
        if index < 0:
            return f"has no column {text_field!r} (columns: {names})"
        kind = fields.field(index).type
        fields = kind if pa.types.is_struct(kind) else None
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        return f"column {text_field!r} holds {kind}, not text"
    return ""


def _values(column, text_field: str) -> list:
    """Python strings of a text column (a struct column walked down the dotted field); a value that
    is not UTF-8 becomes a `_NotUtf8`."""
    import pyarrow.compute as pc

    for part in text_field.split(".")[1:]:
        column = pc.struct_field(column, part)
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        values = []
        for index in range(len(column)):
            try:
                values.append(column[index].as_py())
            except UnicodeDecodeError as error:
                values.append(_NotUtf8(error))
        return values


class _NotUtf8(NamedTuple):
    error: UnicodeDecodeError


def _rows(prefix: str, values: list, first: int, text_field: str, report: _Report) -> Iterator[Document]:
    for offset, value in enumerate(values):
        where = f"{prefix}:row{first + offset}"
        if isinstance(value, str):
            yield Document(where, value)
        elif isinstance(value, _NotUtf8):
            reason = f"{value.error.reason} at byte {value.error.start}"
            report(where, f"field {text_field!r} holds bytes that are not UTF-8 ({reason})", _FIX_UTF8)
        else:
            report(where, f"field {text_field!r} is null", "fill or drop the row")


def _read_parquet(unit: WorkUnit, text_field: str, report: _Report, cursor: _Cursor) -> Iterator[Document]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(unit.path) as parquet:
        problem = _column_problem(parquet.schema_arrow, text_field)
        if problem:  # the file changed since it was planned
            raise _Damaged(problem, _FIX_FIELD)
        row = 0
        # A dotted field reads only that leaf: the batch's one column is its top-level struct.
        batches = parquet.iter_batches(batch_size=_BATCH_ROWS, row_groups=[unit.part], columns=[text_field])
        for batch in batches:
            cursor.records += len(batch)
            yield from _rows(unit.label, _values(batch.column(0), text_field), row, text_field, report)
            row += len(batch)
            cursor.position = f"row {row - 1}"


def _read_arrow(unit: WorkUnit, text_field: str, report: _Report, cursor: _Cursor) -> Iterator[Document]:
    import pyarrow as pa

    top = text_field.split(".")[0]
    if os.path.getsize(unit.path) == 0:
        raise _Damaged("is empty (0 bytes)")
    with pa.memory_map(unit.path) as source:
        try:
            reader = pa.ipc.open_stream(source)  # what save_to_disk writes
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
        problem = _column_problem(reader.schema, text_field)
        if problem:
            raise _Damaged(problem, _FIX_FIELD)
        batches = reader if isinstance(reader, pa.ipc.RecordBatchStreamReader) else _file_batches(reader)
        row = 0
        for batch in batches:
            cursor.records += len(batch)
            yield from _rows(unit.name, _values(batch.column(top), text_field), row, text_field, report)
            row += len(batch)
            cursor.position = f"row {row - 1}"


def _file_batches(reader) -> Iterator:
    for index in range(reader.num_record_batches):
        yield reader.get_batch(index)


_READERS = {
    "jsonl": _read_json,
    "json": _read_json,
    "parquet": _read_parquet,
    "arrow": _read_arrow,
    "webdataset": _read_webdataset,
    "text": _read_text,
}
