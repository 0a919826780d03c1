"""Corpus formats (data/sources.py): every format, plain and compressed, reads as its JSON-lines
twin; dotted text fields; directories and globs; forcing a format; each bad input under
`--on-error stop` and `skip`; `performer data prepare` on a C4-shaped directory of `.json.gz`."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import random
import re
import tarfile
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import data.sources
from data.corpus import CorpusConfig, iter_documents
from data.errors import DataError
from data.shards import Manifest
from data.sources import Skipped, WorkUnit, detect, plan_units, read_unit
from launcher.__main__ import main

WORDS = Path(textwrap.__file__).read_text().split()


def records(count: int = 7, seed: int = 0) -> list[dict]:
    """Records shaped like C4/FineWeb rows: text, nested meta.text, other fields."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        text += ["", "\nsecond line", " naïve café — 日本語"][i % 3]
        rows.append({"id": i, "text": text, "meta": {"text": f"nested {i}: {text[::-1]}", "lang": "en"}})
    return rows


RECORDS = records()

COMPRESS = {
    "": lambda raw: raw,
    ".gz": gzip.compress,
    ".zst": lambda raw: zstandard.ZstdCompressor().compress(raw),
    ".xz": lzma.compress,
    ".bz2": bz2.compress,
}


def write(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(COMPRESS[next((s for s in COMPRESS if s and path.name.endswith(s)), "")](raw))
    return path


def jsonl_bytes(rows: list) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def tar_bytes(rows: list[dict], text_members: bool = False) -> bytes:
    """A WebDataset shard: one sample per row, a .json member (or a .txt one) plus a .meta.json."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, row in enumerate(rows):
            members = {"meta.json": b"{}"}
            if text_members:
                members["txt"] = row["text"].encode()
            else:
                members["json"] = json.dumps(row).encode()
            for extension, payload in members.items():
                info = tarfile.TarInfo(f"shard/{i:06d}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def read(*paths, **settings) -> list[tuple[str, str]]:
    config = CorpusConfig(source="paths", paths=tuple(str(p) for p in paths), heldout_fraction=0.0, **settings)
    return [(doc.doc_id, doc.text) for doc in iter_documents(config)]


def texts(*paths, **settings) -> list[str]:
    return [text for _, text in read(*paths, **settings)]


def expected(field: str, rows: list[dict] = RECORDS) -> list[str]:
    return [row["meta"]["text"] if field == "meta.text" else row["text"] for row in rows]


# ------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    "name, found",
    [
        ("c4/c4-train.00000-of-01024.json.gz", ("json", "gzip")),
        ("pile/00.jsonl.zst", ("jsonl", "zstd")),
        ("x.NDJSON.xz", ("jsonl", "xz")),
        ("fineweb/000_00000.parquet", ("parquet", None)),
        ("ds/data-00000-of-00002.arrow", ("arrow", None)),
        ("shard-000.tar", ("webdataset", None)),
        ("shard-000.tgz", ("webdataset", "gzip")),
        ("shard-000.tar.bz2", ("webdataset", "bz2")),
        ("notes.md", ("text", None)),
        ("module.py.gz", ("text", "gzip")),
        ("README", (None, None)),
        ("data.csv.gz", (None, "gzip")),
    ],
)
def test_detection_from_the_file_name(name, found):
    assert detect(name) == found


@pytest.mark.parametrize("field", ["text", "meta.text"])
@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_json_lines_and_json_lists_plain_and_compressed_match_the_jsonl_twin(tmp_path, suffix, field):
    twin = texts(write(tmp_path / "twin.jsonl", jsonl_bytes(RECORDS)), text_field=field)
    assert twin == expected(field)
    lines = read(write(tmp_path / f"x.jsonl{suffix}", jsonl_bytes(RECORDS)), text_field=field)
    assert [t for _, t in lines] == twin and lines[1][0] == f"{tmp_path}/x.jsonl{suffix}:2"
    array = read(write(tmp_path / f"y.json{suffix}", json.dumps(RECORDS, indent=1).encode()), text_field=field)
    assert [t for _, t in array] == twin and array[1][0] == f"{tmp_path}/y.json{suffix}:item1"
    # C4 ships JSON lines as .json.gz: a .json file that is not a list is read as lines.
    c4 = read(write(tmp_path / f"c4.json{suffix}", jsonl_bytes(RECORDS)), text_field=field)
    assert [t for _, t in c4] == twin and c4[0][0].endswith(f"c4.json{suffix}:1")


def test_a_json_list_is_streamed_item_by_item(tmp_path, monkeypatch):
    """Items far larger than the read chunk, numbers cut at a chunk edge, blank space, an empty list."""
    monkeypatch.setattr(data.sources, "_CHUNK", 7)
    rows = [{"n": 123456789, "text": "long " * 50}, {"text": "b", "pi": 3.14159}, {"text": "c"}]
    raw = ("\ufeff [\n" + ",\n\n".join(json.dumps(r) for r in rows) + "\n]\n").encode()
    assert texts(write(tmp_path / "a.json.gz", raw)) == [r["text"] for r in rows]
    assert read(write(tmp_path / "empty.json", b"[ ]"), on_error="skip") == []


def test_zstd_files_of_several_frames_read_as_one_stream(tmp_path):
    """pzstd and concatenated .zst files hold several frames; a cut inside the last is still found."""
    raw, compressor = jsonl_bytes(RECORDS), zstandard.ZstdCompressor()
    path = tmp_path / "x.jsonl.zst"
    path.write_bytes(compressor.compress(raw[:100]) + compressor.compress(raw[100:]))
    assert texts(path) == expected("text")
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="is cut short: the zstd stream ends before its end marker"):
        texts(path)


@pytest.mark.parametrize("field", ["text", "meta.text"])
def test_parquet_is_read_by_row_group_and_only_the_text_column(tmp_path, field, monkeypatch):
    path = tmp_path / "fineweb" / "000_00000.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(RECORDS), path, row_group_size=3)
    units = plan_units([str(path.parent)], text_field=field)
    assert [u.part for u in units] == [0, 1, 2] and {u.format for u in units} == {"parquet"}
    columns = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        columns.append(kwargs["columns"])
        return iter_batches(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    docs = read(path.parent, text_field=field)
    assert [t for _, t in docs] == expected(field) and columns == [[field]] * 3
    assert docs[4][0] == f"{path}:rg1:row1"


@pytest.mark.parametrize("field", ["text", "meta.text"])
def test_a_saved_hugging_face_dataset_is_read_with_pyarrow(tmp_path, field):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    units = plan_units([str(tmp_path / "ds")])
    assert [Path(u.name).name for u in units] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    docs = read(tmp_path / "ds", text_field=field)
    assert [t for _, t in docs] == expected(field) and docs[0][0] == f"{tmp_path}/ds/data-00000-of-00002.arrow:row0"
    assert "import datasets" not in Path(data.sources.__file__).read_text()
    # A DatasetDict: name one split.
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train'\]; name one split's directory"):
        read(tmp_path / "dd")


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_webdataset_tars_of_json_or_txt_members(tmp_path, suffix):
    docs = read(write(tmp_path / f"a.tar{suffix}", tar_bytes(RECORDS)), text_field="meta.text")
    assert [t for _, t in docs] == expected("meta.text") and docs[0][0].endswith(f"a.tar{suffix}:shard/000000.json")
    txt = read(write(tmp_path / "b.tar", tar_bytes(RECORDS, text_members=True)))
    assert [t for _, t in txt] == expected("text") and txt[2][0].endswith("b.tar:shard/000002.txt")


def test_text_files_are_one_document_each_with_universal_newlines(tmp_path):
    write(tmp_path / "a.txt", b"one\r\ntwo\rthree\n")
    write(tmp_path / "b.md.xz", "# café\n".encode())
    assert read(tmp_path / "a.txt", tmp_path / "b.md.xz") == [
        (f"{tmp_path}/a.txt", "one\ntwo\nthree\n"),
        (f"{tmp_path}/b.md.xz", "# café\n"),
    ]


def test_directories_recurse_sorted_and_globs_expand(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(Path("corpus/b/2.jsonl.zst"), jsonl_bytes(RECORDS[3:5]))
    write(Path("corpus/a.json.gz"), jsonl_bytes(RECORDS[:3]))
    write(Path("corpus/b/3.txt"), b"plain text")
    write(Path("corpus/README"), b"no format: passed over in a directory")
    write(Path("corpus/.hidden.jsonl"), b"not read")
    write(Path("corpus/.cache/x.jsonl"), b"not read")
    docs = read("corpus")
    assert [d for d, _ in docs] == [
        "corpus/a.json.gz:1",
        "corpus/a.json.gz:2",
        "corpus/a.json.gz:3",
        "corpus/b/2.jsonl.zst:1",
        "corpus/b/2.jsonl.zst:2",
        "corpus/b/3.txt",
    ]
    assert [t for _, t in docs] == [*expected("text", RECORDS[:5]), "plain text"]
    assert read("corpus/**/*.jsonl.zst", "corpus/*.gz") == docs[:5]  # sorted, whatever the order given
    assert read("corpus", "corpus/a.json.gz") == docs  # a file named twice is read once
    assert read("corpus", extensions=(".txt",)) == docs[5:]  # a suffix filter for directories
    with pytest.raises(DataError, match="matched nothing; check the path or quote the glob"):
        read("corpus/*.parquet")
    with pytest.raises(DataError, match="corpus/README: cannot tell its format from the name .*pass --format"):
        read("corpus/README")


def test_format_forces_one_reader(tmp_path):
    path = write(tmp_path / "dump.data", jsonl_bytes(RECORDS[:2]))
    with pytest.raises(DataError, match="cannot tell its format"):
        read(path)
    assert texts(path, format="jsonl") == expected("text", RECORDS[:2])
    assert texts(path, format="text") == [jsonl_bytes(RECORDS[:2]).decode()]
    with pytest.raises(DataError, match="corpus.format='csv'"):
        read(path, format="csv")
    with pytest.raises(DataError, match="decompress it"):
        read(write(tmp_path / "x.parquet.gz", b"x"))


def test_old_sources_and_recorded_configs_still_read(tmp_path):
    """`files`/`jsonl` as manifests before this module recorded them."""
    write(tmp_path / "d" / "a.jsonl", jsonl_bytes(RECORDS[:2]))
    write(tmp_path / "d" / "b.txt", b"text file")
    old = {"source": "jsonl", "paths": [str(tmp_path / "d")], "text_field": "text", "extensions": [".txt", ".md"]}
    old.update(heldout_fraction=0.0, split_salt="performer-heldout-v1", max_documents=None, min_chars=1)
    assert [d.text for d in iter_documents(CorpusConfig.from_dict(old))] == expected("text", RECORDS[:2])
    files = CorpusConfig.from_dict({**old, "source": "files"})
    assert [d.text for d in iter_documents(files)] == ["text file"]


# --------------------------------------------------------------------------------- bad inputs

GOOD = jsonl_bytes(RECORDS[:2])


def hex_lines(count: int) -> bytes:
    rng = random.Random(1)
    return b"".join(json.dumps({"text": rng.randbytes(40).hex()}).encode() + b"\n" for _ in range(count))


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


# name, bytes (written as is), where the message points, the problem, the fix, what skip leaves out
BAD = {
    "corrupt gzip": (
        "bad.jsonl.gz",
        b"\x1f\x8b\x08\x00" + bytes(range(200)),
        "bad.jsonl.gz",
        "is not valid gzip data",
        "re-download or re-create the file",
        "file",
    ),
    "not gzip at all": ("bad.json.gz", b"{}\n", "bad.json.gz", "is not valid gzip data", "re-download", "file"),
    "truncated zst": (
        "bad.jsonl.zst",
        zstandard.ZstdCompressor().compress(hex_lines(3000))[:100_000],
        "bad.jsonl.zst",
        r"is cut short: the zstd stream ends before its end marker \(after line \d+",
        "re-download",
        "file",
    ),
    "truncated xz": ("bad.jsonl.xz", lzma.compress(GOOD)[:-20], "bad.jsonl.xz", "is cut short", "re-download", "file"),
    "Parquet without the field": (
        "bad.parquet",
        parquet_bytes(pa.table({"body": ["a"], "url": ["u"]})),
        "bad.parquet",
        r"has no column 'text' \(columns: body, url\)",
        "pass --text-field",
        "file",
    ),
    "not Parquet": ("bad.parquet", b"PAR1 garbage", "bad.parquet", "is not a readable Parquet file", "re-", "file"),
    "Parquet null text": (
        "bad.parquet",
        parquet_bytes(pa.table({"text": ["a", None, "c"]})),
        "bad.parquet:rg0:row1",
        "field 'text' is null",
        "fill or drop the row",
        "record",
    ),
    "JSON line not UTF-8": (
        "bad.jsonl",
        GOOD + b'{"text": "caf\xe9"}\n',
        "bad.jsonl:3",
        "holds bytes that are not UTF-8",
        "re-encode the file as UTF-8",
        "record",
    ),
    "text file not UTF-8": ("bad.txt", b"caf\xe9", "bad.txt", "not UTF-8", "re-encode", "file"),
    "empty file": ("bad.jsonl", b"", "bad.jsonl", r"is empty \(no records\)", "remove it from --paths", "file"),
    "empty zst": ("bad.json.zst", b"", "bad.json.zst", "is empty", "remove it", "file"),
    "record without the field": (
        "bad.jsonl",
        GOOD + b'{"body": "x", "url": "u"}\n',
        "bad.jsonl:3",
        r"has no field 'text' \(fields: body, url\)",
        "pass --text-field",
        "record",
    ),
    "text not a string": ("bad.jsonl", b'{"text": 3}\n', "bad.jsonl:1", "is a number, not a string", "text", "record"),
    "JSON line not JSON": (
        "bad.jsonl",
        GOOD + b'{"text": "unclosed\n',
        "bad.jsonl:3",
        "not a JSON line",
        "one JSON object per line",
        "record",
    ),
    "JSON list cut short": (
        "bad.json",
        json.dumps(RECORDS).encode()[:-30],
        "bad.json",
        r"is cut short: it ends inside item 6 \(after item 5",
        "re-download",
        "file",
    ),
    "not a tar": ("bad.tar", b"x" * 1000, "bad.tar", "is not a readable tar archive", "re-download", "file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_input_stops_with_one_line_naming_file_position_problem_and_fix(tmp_path, case):
    name, raw, where, problem, fix, _ = BAD[case]
    (tmp_path / name).write_bytes(raw)
    write(tmp_path / "good.jsonl", GOOD)
    with pytest.raises(DataError) as caught:
        read(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{tmp_path}/{where}: "), message
    assert re.search(problem, message) and re.search(fix, message), message
    assert message.endswith("or pass --on-error skip to leave it out"), message


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_input_is_skipped_counted_and_listed(tmp_path, case):
    name, raw, where, problem, _, what = BAD[case]
    (tmp_path / name).write_bytes(raw)
    write(tmp_path / "good.jsonl", GOOD)
    config = CorpusConfig(source="paths", paths=(str(tmp_path),), on_error="skip", heldout_fraction=0.0)
    skipped: list[Skipped] = []
    got = [doc.text for doc in iter_documents(config, skipped=skipped)]
    assert got[-2:] == expected("text", RECORDS[:2])  # the good file is whole
    assert len(skipped) == 1 and skipped[0].where == f"{tmp_path}/{where}" and skipped[0].what == what, skipped
    assert re.search(problem, skipped[0].problem), skipped


def test_skip_keeps_the_records_around_a_bad_one_and_the_lines_before_a_cut(tmp_path):
    path = write(tmp_path / "x.jsonl", GOOD + b"not json\n\n" + GOOD + b'{"body": 1}\n')
    skipped: list[Skipped] = []
    assert len(list(read_unit(WorkUnit(str(path), str(path), "jsonl"), on_error="skip", skipped=skipped))) == 4
    assert [(s.where[len(str(tmp_path)) + 1 :], s.what) for s in skipped] == [
        ("x.jsonl:3", "record"),
        ("x.jsonl:7", "record"),
    ]
    cut = write(tmp_path / "cut.jsonl.gz", hex_lines(5000))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    skipped = []
    kept = list(read_unit(WorkUnit(str(cut), str(cut), "jsonl", "gzip"), on_error="skip", skipped=skipped))
    assert 0 < len(kept) < 5000 and f"(after line {len(kept)}; the records before it were kept)" in skipped[0].problem


# ------------------------------------------------------------------------------------------ CLI


def c4_directory(root: Path, bad: bytes | None = None) -> Path:
    """Two C4-shaped shards of JSON lines (text, timestamp, url), gzipped, and maybe a bad third."""
    c4 = root / "c4"
    for shard in range(2):
        rows = [
            {"text": row["text"] + " " + " ".join(WORDS[shard * 100 + i : shard * 100 + i + 60]), "url": "u"}
            for i, row in enumerate(records(30, seed=shard))
        ]
        write(c4 / f"c4-train.{shard:05d}-of-01024.json.gz", jsonl_bytes(rows))
    if bad is not None:
        (c4 / "c4-train.00002-of-01024.json.gz").write_bytes(bad)
    return c4


def prepare(paths: str, out: Path, *extra: str) -> int:
    return main(
        ["data", "prepare", "--paths", paths, "--out", str(out), "--vocab-size", "400", "--num-sentinels", "10"]
        + ["--heldout-fraction", "0.2", "--workers", "1", "--max-samples-per-shard", "16", *extra]
    )


def test_cli_prepares_a_c4_shaped_directory_and_its_glob(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c4_directory(tmp_path)
    assert prepare("c4", tmp_path / "out") == 0
    train, heldout = Manifest.load(tmp_path / "out" / "train"), Manifest.load(tmp_path / "out" / "heldout")
    assert train.samples + heldout.samples == 60 and heldout.samples >= 1
    assert train.source["corpus"]["source"] == "paths" and train.source["corpus"]["paths"] == ["c4"]
    assert "skipped" not in train.source
    assert prepare("c4/*.json.gz", tmp_path / "glob") == 0
    assert Manifest.load(tmp_path / "glob" / "train").shards == train.shards
    assert "Traceback" not in capsys.readouterr().err


def test_cli_stops_on_a_bad_file_before_any_manifest_and_skips_it_on_request(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c4_directory(tmp_path, bad=gzip.compress(hex_lines(10))[:-12])
    capsys.readouterr()
    assert prepare("c4", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: c4/c4-train.00002-of-01024.json.gz: is cut short: the gzip stream ") and "\n" not in err
    )
    assert not (tmp_path / "out").exists()

    assert prepare("c4", tmp_path / "out", "--on-error", "skip") == 0
    printed = capsys.readouterr().out
    assert (
        "skipped (--on-error skip): 1 file(s), 0 record(s):\n  c4/c4-train.00002-of-01024.json.gz: is cut short"
        in printed
    )
    for split in ("train", "heldout"):
        skipped = Manifest.load(tmp_path / "out" / split).source["skipped"]
        assert (skipped["files"], skipped["records"]) == (1, 0)
        assert skipped["list"][0]["where"] == "c4/c4-train.00002-of-01024.json.gz"

    # `data shards` (one pass) records what it met in its manifest too.
    argv = ["data", "shards", "--tokenizer", "out/tokenizer", "--paths", "c4", "--out", "more", "--on-error", "skip"]
    assert main([*argv, "--workers", "1"]) == 0
    assert Manifest.load(tmp_path / "more").source["skipped"]["files"] == 1
    assert "1 file(s), 0 record(s)" in capsys.readouterr().out
