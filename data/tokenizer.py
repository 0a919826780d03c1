"""SentencePiece tokenizer with the special ids of the whole project in one place.

Id layout (vocabulary of `vocab_size` ids, defaults in brackets):

    0 pad   1 eos   2 unk   3 bos   4 mask        control/special pieces of the SentencePiece model
    5 .. V-S-1                                    pieces learned by SentencePiece (byte fallback on)
    V-S .. V-1                                    S span-corruption sentinels, T5 style [S=100]:
                                                  sentinel i has id V-1-i (counted down from the top)

The sentinels live outside the SentencePiece model (which has V-S pieces); `Tokenizer.decode`
renders them as ``<extra_id_i>``. `SpecialTokens` carries these ids to everything downstream (the
shard manifest stores it, the stream and the objectives read it), so no module hard-codes an id.

Training sample: SentencePiece is trained on lines of text, so we draw a uniform random sample
of at most `sample_lines` non-blank lines from the corpus with reservoir sampling (one pass,
bounded memory, seeded), and feed it through `sentence_iterator`. On the stdlib corpus
(~290k non-blank lines) the default 200k-line sample trains a unigram vocab of 8000 in 15-45 s
on 2 cores (depending on load; far under the 2-minute budget); at a larger scale the sample
keeps training time and memory bounded (SentencePiece needs ~1 GB and ~400 s for 1M lines).

Code-friendly settings: identity normalisation and kept whitespace (indentation is text),
whitespace-only pieces allowed (runs of spaces become single pieces), byte fallback (no text is
ever <unk>; newlines become the byte piece <0x0A>), digits split. `decode(encode(text)) == text`.

Exact scores: SentencePiece adds piece scores in float32, Hugging Face ``tokenizers`` (an export's
fast tokenizer) in float64, so where two segmentations score within float32's rounding of each
other (often the same whitespace pieces in another order) the two could pick differently. Training
therefore rounds every score to a multiple of `SCORE_STEP` (1/16; the pieces and the compression
stay as trained), and `encode` hands SentencePiece a long text in runs of whole lines short enough
that every sum stays under 2**20, where float32 adds multiples of 1/16 exactly. A newline is in no
piece (the model is trained on lines), so every segmentation breaks after it and the runs' ids are
the whole text's. Both libraries then compute the same exact sums and break ties alike, and give
the same ids on any text whose lines are each shorter than `Tokenizer.exact_chars` (~46k characters).
Tokenizers trained before (scores not rounded) encode as they always did.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data.errors import DataError
from performer import strict

MODEL_FILE = "tokenizer.model"
INFO_FILE = "tokenizer.json"
TOKENIZER_DIR = "tokenizer"  # `performer data prepare` writes OUT/tokenizer beside OUT/train and OUT/heldout
MODEL_TYPES = ("unigram", "bpe")
SENTINEL_FORMAT = "<extra_id_{}>"
SCORE_STEP = 2.0**-4  # trained piece scores are rounded to multiples of this (see "Exact scores")
# float32 holds every multiple of SCORE_STEP up to this size exactly (a 24-bit significand).
_EXACT_FLOAT32_SUM = 2.0**24 * SCORE_STEP
_UNKNOWN_PENALTY = 10.0  # SentencePiece scores a character no piece covers min_score - 10 (then bytes)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The special ids; stored in tokenizer.json and in every shard manifest."""

    vocab_size: int  # total ids, sentinels included
    num_sentinels: int = 100  # span-corruption sentinels at the top of the vocabulary
    pad_id: int = 0  # padding; never a training target (labels use -100 there)
    eos_id: int = 1  # end of document / end of sequence
    unk_id: int = 2  # unknown (byte fallback makes it rare)
    bos_id: int = 3  # start of sequence; also the decoder start token of seq2seq batches
    mask_id: int = 4  # masked-LM mask

    @property
    def num_model_pieces(self) -> int:
        """Size of the SentencePiece model: the vocabulary minus the sentinels."""
        return self.vocab_size - self.num_sentinels

    def sentinel_id(self, index: int) -> int:
        """Id of sentinel `index` (0 is the first span): vocab_size - 1 - index."""
        if not 0 <= index < self.num_sentinels:
            raise IndexError(f"sentinel {index} out of range: this vocabulary has {self.num_sentinels}")
        return self.vocab_size - 1 - index

    def sentinel_ids(self) -> np.ndarray:
        """All sentinel ids in span order (descending ids)."""
        return self.vocab_size - 1 - np.arange(self.num_sentinels, dtype=np.int64)

    def is_sentinel(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(ids) >= self.num_model_pieces

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SpecialTokens":
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 8000  # total ids including the special ids and the sentinels
    model_type: str = "unigram"  # "unigram" or "bpe"
    num_sentinels: int = 100  # T5 uses 100
    sample_lines: int = 200_000  # reservoir sample of corpus lines used for training
    max_line_chars: int = 2048  # longer lines are cut (SentencePiece drops over-long sentences)
    seed: int = 0  # sampling seed (and SentencePiece's shuffle)
    num_threads: int = 0  # SentencePiece threads; 0 = all CPUs

    @classmethod
    def from_dict(cls, values: dict) -> "TokenizerConfig":
        """From a plain mapping (YAML); unknown keys are errors."""
        return strict.build(cls, values, "tokenizer")

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise DataError(f"tokenizer.model_type={self.model_type!r}: choose one of {MODEL_TYPES}")
        if self.vocab_size - self.num_sentinels < 300:
            raise DataError(
                f"tokenizer.vocab_size={self.vocab_size} leaves fewer than 300 pieces after "
                f"{self.num_sentinels} sentinels and 256 byte pieces; raise vocab_size"
            )


class Tokenizer:
    """A loaded SentencePiece model plus its `SpecialTokens`. Picklable (ships to workers)."""

    def __init__(self, model_proto: bytes, special: SpecialTokens):
        self._proto = bytes(model_proto)
        self.special = special
        self.directory: Path | None = None  # where `load` found it
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        if self._sp.get_piece_size() != special.num_model_pieces:
            raise DataError(
                f"SentencePiece model has {self._sp.get_piece_size()} pieces but the special-token "
                f"table expects {special.num_model_pieces}; tokenizer.json and tokenizer.model differ"
            )
        self.exact_chars = _exact_chars(sentencepiece_model_pb2.ModelProto.FromString(self._proto))

    @functools.cached_property
    def _sp_continued(self) -> spm.SentencePieceProcessor:
        """The same model without its dummy prefix, for a run of lines after the first or text after
        a sentinel; loaded when first needed (most texts and workers never need it)."""
        return spm.SentencePieceProcessor(model_proto=_without_dummy_prefix(self._proto))

    def __getstate__(self):
        return {"proto": self._proto, "special": self.special}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["special"])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a directory written by `train_tokenizer` (tokenizer.model + tokenizer.json)."""
        directory = Path(path)
        if directory.is_file():
            directory = directory.parent
        model, info = directory / MODEL_FILE, directory / INFO_FILE
        missing = " and ".join(file.name for file in (model, info) if not file.is_file())
        if missing:
            problem = "does not exist" if not directory.is_dir() else f"has no {missing}"
            raise DataError(
                f"tokenizer directory {directory} {problem} (a tokenizer is {MODEL_FILE} + {INFO_FILE}); "
                "copy it again or train one with `performer data tokenizer --out DIR`"
            )
        damaged = "damaged or truncated; copy the tokenizer directory again from where it was written"
        try:
            special = SpecialTokens.from_dict(json.loads(info.read_text(encoding="utf-8"))["special"])
        except (ValueError, KeyError, TypeError) as error:  # not UTF-8 / JSON / the special-token table
            raise DataError(f"{info} is not a tokenizer table ({type(error).__name__}: {error}): {damaged}") from None
        proto = model.read_bytes()
        unreadable = f"{model} is not a SentencePiece model ({len(proto)} bytes): {damaged}"
        if not proto:
            raise DataError(unreadable)
        try:
            tokenizer = cls(proto, special)
        except RuntimeError:  # SentencePiece cannot parse it
            raise DataError(unreadable) from None
        except DataError as error:  # it parses, but does not fit the table
            raise DataError(f"{directory}: {error}") from None
        tokenizer.directory = directory
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.special.vocab_size

    @property
    def fingerprint(self) -> str:
        """sha256 of the model and the special-token table: what a manifest pins."""
        digest = hashlib.sha256(self._proto)
        digest.update(json.dumps(self.special.to_dict(), sort_keys=True).encode())
        return digest.hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added)."""
        if self.exact_chars is None or len(text) <= self.exact_chars:
            return self._sp.encode(text)
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if self.exact_chars is None or all(len(text) <= self.exact_chars for text in texts):
            return self._sp.encode(texts)
        # Long texts in runs of lines: the first run as a text's start, the others as continuations.
        runs = [_line_runs(text, self.exact_chars) for text in texts]
        firsts = iter(self._sp.encode([text_runs[0] for text_runs in runs]))
        continued = iter(self._sp_continued.encode([run for text_runs in runs for run in text_runs[1:]]))
        encoded = []
        for text_runs in runs:
            ids = next(firsts)
            for _ in text_runs[1:]:
                ids.extend(next(continued))
            encoded.append(ids)
        return encoded

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` read as the middle of a document: no dummy prefix (SentencePiece's space
        before a text), as after a sentinel in a span-corrupted input."""
        return [token for run in _line_runs(text, self.exact_chars) for token in self._sp_continued.encode(run)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; sentinels are rendered as <extra_id_i>, pad/bos/eos/mask as nothing."""
        pieces: list[str] = []
        run: list[int] = []
        limit = self.special.num_model_pieces
        for token in ids:
            token = int(token)
            if token >= limit:
                pieces.append(self._decode_run(run, first=not pieces))
                run = []
                pieces.append(SENTINEL_FORMAT.format(self.special.vocab_size - 1 - token))
            else:
                run.append(token)
        pieces.append(self._decode_run(run, first=not pieces))
        return "".join(pieces)

    def _decode_run(self, run: list[int], first: bool) -> str:
        if first or not run:
            return self._sp.decode(run)
        # SentencePiece drops the leading space of a text (its dummy prefix); a run after a
        # sentinel is mid-text, so decode it behind a one-byte anchor and cut the anchor off.
        return self._sp.decode([self._anchor_id, *run])[1:]

    @property
    def _anchor_id(self) -> int:
        return self._sp.piece_to_id("<0x41>")  # the byte piece of "A" (byte fallback is always on)

    def id_to_piece(self, token: int) -> str:
        if token >= self.special.num_model_pieces:
            return SENTINEL_FORMAT.format(self.special.vocab_size - 1 - token)
        return self._sp.id_to_piece(int(token))


def _exact_chars(proto) -> int | None:
    """Longest run of text whose scores float32 adds exactly: None unless the model is unigram,
    every ordinary piece's score is a multiple of SCORE_STEP and no piece holds a newline."""
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        return None
    scores = [piece.score for piece in proto.pieces if piece.type == normal]
    if any(score % SCORE_STEP for score in scores) or any("\n" in piece.piece for piece in proto.pieces):
        return None
    # A character costs at most min_score + the unknown penalty, so every sum over a run (the best
    # path's and each candidate's) stays under the bound.
    per_char = _UNKNOWN_PENALTY - min(scores, default=0.0)
    return int(_EXACT_FLOAT32_SUM // per_char) - 1


def _line_runs(text: str, limit: int | None) -> list[str]:
    """`text` cut after newlines into runs of at most `limit` characters (a longer line is one run)."""
    if limit is None or len(text) <= limit:
        return [text]
    runs, start = [], 0
    while len(text) - start > limit:
        cut = text.rfind("\n", start, start + limit)
        if cut < 0:  # a line longer than the limit: the run ends with it
            cut = text.find("\n", start + limit)
            if cut < 0:
                break
        runs.append(text[start : cut + 1])
        start = cut + 1
    if start < len(text):
        runs.append(text[start:])
    return runs


def _without_dummy_prefix(model_proto: bytes) -> bytes:
    proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    proto.normalizer_spec.add_dummy_prefix = False
    return proto.SerializeToString()


def _rounded_scores(model_proto: bytes) -> bytes:
    """The model with every ordinary piece's score rounded to a multiple of SCORE_STEP."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    for piece in proto.pieces:
        if piece.type == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL:
            piece.score = round(piece.score / SCORE_STEP) * SCORE_STEP
    return proto.SerializeToString()


def sample_training_lines(texts: Iterable[str], config: TokenizerConfig) -> list[str]:
    """Uniform reservoir sample of non-blank lines (order of first appearance kept)."""
    rng = np.random.default_rng(config.seed)
    reservoir: list[tuple[int, str]] = []
    seen = 0
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            line = line[: config.max_line_chars]
            if len(reservoir) < config.sample_lines:
                reservoir.append((seen, line))
            else:
                slot = int(rng.integers(0, seen + 1))
                if slot < config.sample_lines:
                    reservoir[slot] = (seen, line)
            seen += 1
    return [line for _, line in sorted(reservoir)]


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig, out_dir: str | os.PathLike) -> Tokenizer:
    """Train on a line sample of `texts`; write tokenizer.model and tokenizer.json to `out_dir`."""
    out = Path(out_dir)
    lines = sample_training_lines(texts, config)
    if not lines:
        raise DataError("the corpus has no non-blank lines to train a tokenizer on")
    special = SpecialTokens(vocab_size=config.vocab_size, num_sentinels=config.num_sentinels)
    model = _train_sentencepiece(lines, config, special)
    if config.model_type == "unigram":
        model = _rounded_scores(model)
    tokenizer = Tokenizer(model, special)
    out.mkdir(parents=True, exist_ok=True)  # only now: a corpus that fails leaves nothing behind
    (out / MODEL_FILE).write_bytes(model)
    info = {
        "special": special.to_dict(),
        "config": strict.plain(config),
        "fingerprint": tokenizer.fingerprint,
        "trained_on": {"lines": len(lines), "chars": sum(map(len, lines))},
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return tokenizer


def _train_sentencepiece(lines: list[str], config: TokenizerConfig, special: SpecialTokens) -> bytes:
    buffer = _BytesSink()
    spm.set_random_generator_seed(config.seed)  # SentencePiece's own sampling is seeded globally
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buffer,
            model_type=config.model_type,
            vocab_size=special.num_model_pieces,
            pad_id=special.pad_id,
            pad_piece="<pad>",
            eos_id=special.eos_id,
            eos_piece="</s>",
            unk_id=special.unk_id,
            unk_piece="<unk>",
            bos_id=special.bos_id,
            bos_piece="<s>",
            control_symbols=["<mask>"],  # takes the next free id, special.mask_id (checked below)
            byte_fallback=True,
            character_coverage=0.9999,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=config.max_line_chars * 4,  # bytes, not characters
            input_sentence_size=0,  # the sample is already drawn; use all of it
            shuffle_input_sentence=False,
            hard_vocab_limit=True,
            num_threads=config.num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise DataError(
            f"SentencePiece training failed ({error}); a smaller tokenizer.vocab_size or more "
            "tokenizer.sample_lines usually fixes 'Vocabulary size is too high'"
        ) from None
    processor = spm.SentencePieceProcessor(model_proto=buffer.data)
    if processor.piece_to_id("<mask>") != special.mask_id:
        raise AssertionError("SentencePiece placed <mask> away from SpecialTokens.mask_id")
    return buffer.data


class _BytesSink:
    """`model_writer` target of SentencePieceTrainer: keeps the serialized model in memory."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data
