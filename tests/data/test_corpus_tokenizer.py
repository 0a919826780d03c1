"""Corpora and the tokenizer: deterministic documents and splits, round trips, special ids."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from data.corpus import CorpusConfig, iter_documents, split_of
from data.errors import DataError
from data.tokenizer import SENTINEL_FORMAT, SpecialTokens, Tokenizer


def test_stdlib_corpus_is_deterministic_with_relative_ids():
    config = CorpusConfig(max_documents=20)
    first, second = list(iter_documents(config)), list(iter_documents(config))
    assert first == second and len(first) == 20
    assert all(not doc.doc_id.startswith("/") and doc.doc_id.endswith(".py") for doc in first)
    assert not any(part in ("test", "site-packages") for d in first for part in d.doc_id.split("/"))


def test_heldout_split_is_disjoint_complete_and_content_based():
    config = CorpusConfig(max_documents=200, heldout_fraction=0.2)
    every = {d.doc_id for d in iter_documents(config)}
    train = {d.doc_id for d in iter_documents(config, "train")}
    heldout = {d.doc_id for d in iter_documents(config, "heldout")}
    assert train | heldout == every and not train & heldout
    assert 0.05 < len(heldout) / len(every) < 0.4
    assert split_of("same text", 0.5) == split_of("same text", 0.5)  # duplicates stay together


def test_files_globs_and_jsonl_sources(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first document")
    (tmp_path / "a" / "skip.bin").write_text("not text")
    (tmp_path / "two.md").write_text("second document")
    docs = list(iter_documents(CorpusConfig(source="files", paths=(str(tmp_path / "a"), str(tmp_path / "*.md")))))
    assert [d.text for d in docs] == ["first document", "second document"]

    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x y"}) + "\n\n" + json.dumps({"body": "z"}) + "\n")
    jsonl = CorpusConfig(source="jsonl", paths=(str(tmp_path / "c.jsonl"),), text_field="body")
    assert [d.text for d in iter_documents(jsonl)] == ["x y", "z"]
    with pytest.raises(DataError, match="text_field"):
        list(iter_documents(CorpusConfig(source="jsonl", paths=(str(tmp_path / "c.jsonl"),))))
    with pytest.raises(DataError, match="matched nothing"):
        list(iter_documents(CorpusConfig(source="files", paths=(str(tmp_path / "*.nope"),))))


def test_configs_reject_unknown_keys_and_bad_values():
    assert CorpusConfig.from_dict({"source": "stdlib", "max_documents": 3}).max_documents == 3
    assert CorpusConfig.from_dict({"source": "files", "paths": ["a.txt"]}).paths == ("a.txt",)  # YAML lists: tuples
    with pytest.raises(
        ValueError, match="unknown config key 'corpus.heldout_fractoin'; did you mean 'corpus.heldout_fraction'"
    ):
        CorpusConfig.from_dict({"heldout_fractoin": 0.1})
    with pytest.raises(ValueError, match="corpus.max_documents must be of type"):
        CorpusConfig.from_dict({"max_documents": "3"})
    with pytest.raises(ValueError, match="needs corpus.paths"):
        CorpusConfig(source="files")


TEXTS = [
    "def f(x):\n    return x  # indentation, newlines\n\n\tand tabs\n",
    "  leading spaces, trailing spaces   \n",
    "unicode: naïve café — 日本語 🙂",
]


@pytest.mark.parametrize("text", TEXTS, ids=["code", "spaces", "unicode"])
def test_tokenizer_round_trips_text(tiny_tokenizer, text):
    tokenizer, _ = tiny_tokenizer
    ids = tokenizer.encode(text)
    assert tokenizer.special.unk_id not in ids  # byte fallback: nothing is unknown
    assert tokenizer.decode(ids) == text


def test_tokenizer_special_ids_and_sentinels(tiny_tokenizer):
    tokenizer, directory = tiny_tokenizer
    special = tokenizer.special
    assert (special.pad_id, special.eos_id, special.unk_id, special.bos_id, special.mask_id) == (0, 1, 2, 3, 4)
    assert [tokenizer.id_to_piece(i) for i in range(5)] == ["<pad>", "</s>", "<unk>", "<s>", "<mask>"]
    assert special.vocab_size == 600 and special.num_model_pieces == 500
    assert special.sentinel_id(0) == 599 and special.sentinel_id(99) == 500
    assert list(special.sentinel_ids()[:3]) == [599, 598, 597]
    ids = tokenizer.encode("a b")
    assert max(ids) < special.num_model_pieces  # text never produces a sentinel
    decoded = tokenizer.decode([*ids, special.sentinel_id(0), *ids, special.sentinel_id(7)])
    assert decoded == f"a b{SENTINEL_FORMAT.format(0)} a b{SENTINEL_FORMAT.format(7)}"
    assert tokenizer.decode([special.bos_id, *ids, special.eos_id, special.pad_id]) == "a b"
    # Loading and pickling (how shard workers get it) keep everything.
    for copy in (Tokenizer.load(directory), pickle.loads(pickle.dumps(tokenizer))):
        assert copy.fingerprint == tokenizer.fingerprint and copy.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
    info = json.loads((directory / "tokenizer.json").read_text())
    assert SpecialTokens.from_dict(info["special"]) == special and info["fingerprint"] == tokenizer.fingerprint


def test_trained_scores_are_rounded_so_float32_adds_them_exactly(tiny_tokenizer):
    from sentencepiece import sentencepiece_model_pb2

    from data.tokenizer import SCORE_STEP

    tokenizer, directory = tiny_tokenizer
    proto = sentencepiece_model_pb2.ModelProto.FromString((directory / "tokenizer.model").read_bytes())
    scores = [piece.score for piece in proto.pieces if piece.type == 1]
    assert scores and all(score % SCORE_STEP == 0 for score in scores)
    assert len(set(scores)) > 50  # still the trained scores, not a handful of levels
    # Every sum over a run of exact_chars characters stays where float32 holds multiples of 1/16 exactly.
    assert (tokenizer.exact_chars + 1) * (10 - min(scores)) <= 2**20


LINE_RUN_TEXTS = [
    "def f(x):\n    return x\n\n\n    # after blank lines\n",
    "\nstarts with a newline\nand ends with two\n\n",
    "crlf line\r\nnext\r\n  indented\r\n",
    "one line far longer than the limit, no newline anywhere in it at all, " * 3 + "\nthen a short one",
    "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\nk\nl\nm\nn\no\np\nq\nr\ns\nt\nu\nv\nw",
    "    x = 1\n" * 40,
]


def test_long_texts_are_encoded_in_runs_of_lines_with_the_whole_texts_ids(tiny_tokenizer):
    # The runs start after a newline (in no piece, so every segmentation breaks there) and all but
    # the first have no dummy prefix: short texts, where float32 is exact either way, show the
    # runs give the whole text's ids whatever the limit.
    tokenizer, _ = tiny_tokenizer
    whole = pickle.loads(pickle.dumps(tokenizer))
    whole.exact_chars = None
    cut = pickle.loads(pickle.dumps(tokenizer))
    for limit in (1, 7, 30, 64):
        cut.exact_chars = limit
        expected = [whole.encode(text) for text in LINE_RUN_TEXTS]
        assert cut.encode_batch(LINE_RUN_TEXTS) == expected, limit
        assert [cut.encode(text) for text in LINE_RUN_TEXTS] == expected, limit
        assert cut.encode_batch(["", *LINE_RUN_TEXTS[:2]]) == [[], *expected[:2]]


def test_continuation_has_no_dummy_prefix(tiny_tokenizer):
    tokenizer, _ = tiny_tokenizer
    newline = tokenizer.encode("\n")  # the dummy prefix and the newline's byte piece
    for text in ("x = 1", "  two spaces", "a\nb"):
        ids = tokenizer.encode("\n" + text)
        assert ids[: len(newline)] == newline and tokenizer.encode_continuation(text) == ids[len(newline) :]
        assert tokenizer.decode([tokenizer.special.sentinel_id(0), *tokenizer.encode_continuation(text)]).endswith(text)


def test_tokenizer_training_is_reproducible(tmp_path):
    from data.tokenizer import TokenizerConfig, train_tokenizer

    texts = [d.text for d in iter_documents(CorpusConfig(max_documents=10))]
    config = TokenizerConfig(vocab_size=400, model_type="bpe", sample_lines=2000, num_sentinels=10)
    a = train_tokenizer(texts, config, tmp_path / "a")
    b = train_tokenizer(texts, config, tmp_path / "b")
    assert a.fingerprint == b.fingerprint
    assert a.special.sentinel_id(0) == 399 and np.all(a.special.is_sentinel(np.arange(390, 400)))
