"""`performer data ...` end to end on a small stdlib subset: prepare, verify, inspect, stream."""

from __future__ import annotations

import json

import pytest

from data.shards import Manifest
from data.stream import StreamConfig, TokenStream
from data.tokenizer import Tokenizer
from launcher.__main__ import main


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    code = main(
        [
            "data",
            "prepare",
            "--source",
            "stdlib",
            "--out",
            str(out),
            "--max-documents",
            "40",
            "--vocab-size",
            "700",
            "--sample-lines",
            "5000",
            "--heldout-fraction",
            "0.1",
            "--max-samples-per-shard",
            "8",
            "--workers",
            "2",
        ]
    )
    assert code == 0
    return out


def test_prepare_writes_tokenizer_and_both_splits(prepared, capsys):
    tokenizer = Tokenizer.load(prepared / "tokenizer")
    assert tokenizer.vocab_size == 700
    train, heldout = Manifest.load(prepared / "train"), Manifest.load(prepared / "heldout")
    assert train.samples + heldout.samples == 40 and heldout.samples >= 1
    assert len(train.shards) >= 4  # 8 documents per shard
    for manifest in (train, heldout):
        assert manifest.tokenizer_fingerprint == tokenizer.fingerprint and manifest.dtype == "uint16"
        assert manifest.special == tokenizer.special


def test_verify_and_inspect(prepared, capsys):
    assert main(["data", "verify", str(prepared / "train")]) == 0
    assert "shards match the manifest" in capsys.readouterr().out
    assert main(["data", "inspect", str(prepared / "train"), "--documents", "1", "--chars", "80"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[: printed.index("\n}\n") + 3])
    assert summary["split"] == "train" and summary["shards"] >= 4
    assert "--- train-p00000-000000.tar document 0" in printed


def test_stream_over_prepared_shards_decodes_to_text(prepared):
    tokenizer = Tokenizer.load(prepared / "tokenizer")
    stream = TokenStream(StreamConfig(manifest=str(prepared / "train"), input_length=128, batch_size=2))
    batch = next(iter(stream))
    assert batch["input_ids"].shape == (2, 128)
    text = tokenizer.decode(batch["input_ids"][0].tolist())
    assert "<extra_id_0>" in text and len(text) > 200


def test_sample_prints_what_the_model_sees(prepared, capsys):
    assert main(["data", "sample", str(prepared / "train"), "--input-length", "64"]) == 0
    printed = capsys.readouterr().out
    for key in ("input_ids (64 ids)", "decoder_input_ids", "labels"):
        assert key in printed
    assert "<extra_id_0>" in printed


def test_verify_reports_a_damaged_shard(tmp_path, prepared, capsys):
    import shutil

    copy = tmp_path / "train"
    shutil.copytree(prepared / "train", copy)
    victim = Manifest.load(copy).shards[1].path
    data = (copy / victim).read_bytes()
    (copy / victim).write_bytes(data[: len(data) // 3])
    assert main(["data", "verify", str(copy)]) == 1
    assert f"BAD  {victim}: size" in capsys.readouterr().out
