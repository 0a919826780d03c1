"""`performer generate` on tiny exports with a tiny tokenizer: text out, clear errors."""

from __future__ import annotations

import pytest
import torch

import performer
from data.tokenizer import SpecialTokens, Tokenizer, TokenizerConfig, train_tokenizer
from launcher.__main__ import main
from launcher.commands.generate import encode_prompt
from performer.config import preset
from performer.models import build_model

# Tiny models gain nothing from threads, and on a busy 2-core machine two threads crawl.
pytestmark = pytest.mark.usefixtures("one_thread")

# A tokenizer trained in well under a second: 300 SentencePiece pieces (the smallest the project
# allows: 256 bytes + specials + a few) and 20 sentinels.
TOKENIZER_CONFIG = TokenizerConfig(vocab_size=320, num_sentinels=20, sample_lines=1000, num_threads=1)
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    x: int = 0\n",
    "the quick brown fox jumps over the lazy dog\n",
] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TEXTS, TOKENIZER_CONFIG, out)
    return out


def _export(root, kind, tokenizer_dir, attention_type="favor"):
    # As a training run builds it: targets start from the tokenizer's bos.
    config = preset(
        "tiny",
        vocab_size=TOKENIZER_CONFIG.vocab_size,
        d_model=32,
        num_heads=4,
        dropout=0.0,
        attention_type=attention_type,
        decoder_start_id=SpecialTokens(TOKENIZER_CONFIG.vocab_size).bos_id,
    )
    model = build_model(kind, config)
    return performer.save_pretrained(
        model, root / f"{kind}-{attention_type}", model_kind=kind, tokenizer_dir=tokenizer_dir
    )


@pytest.mark.parametrize("kind, attention_type", [("seq2seq", "favor"), ("lm", "favor"), ("lm", "softmax")])
def test_generate_prints_the_models_text_and_exits_0(tmp_path, tokenizer_dir, capsys, kind, attention_type):
    export = _export(tmp_path, kind, tokenizer_dir, attention_type)
    prompt = "def add(a, b):"
    code = main(["generate", "--model", str(export), "--prompt", prompt, "--max-new-tokens", "8"])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == "", captured.err
    # The same generation by hand, with the layout the data pipeline trains on.
    model, tokenizer = performer.from_pretrained(export), Tokenizer.load(export / "tokenizer")
    special = tokenizer.special
    if kind == "seq2seq":  # encoder input = prompt + eos; the decoder starts from bos
        source = torch.tensor([tokenizer.encode(prompt) + [special.eos_id]])
        ids = model.generate(source, max_new_tokens=8, decoder_start_id=special.bos_id, eos_id=special.eos_id)[0]
        expected = tokenizer.decode(ids.tolist()[: (ids.tolist() + [special.eos_id]).index(special.eos_id)])
    else:  # the prompt follows an eos, as documents do in the packed stream, and is continued
        context = torch.tensor([[special.eos_id] + tokenizer.encode(prompt)])
        ids = model.generate(context, max_new_tokens=8, eos_id=special.eos_id)[0, 1:].tolist()
        expected = tokenizer.decode(ids[: (ids + [special.eos_id]).index(special.eos_id)])
        assert expected.startswith(prompt)
    assert len(ids) > (1 if kind == "seq2seq" else len(tokenizer.encode(prompt)))  # something was generated
    assert captured.out == expected + "\n"


def test_seq2seq_beams_and_seeded_sampling(tmp_path, tokenizer_dir, capsys):
    export = str(_export(tmp_path, "seq2seq", tokenizer_dir))
    assert (
        main(
            ["generate", "--model", export, "--prompt", "x <extra_id_0> y", "--num-beams", "3", "--max-new-tokens", "6"]
        )
        == 0
    )
    sample = [
        "generate",
        "--model",
        export,
        "--prompt",
        "class",
        "--temperature",
        "1.5",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
        "--seed",
        "7",
        "--max-new-tokens",
        "12",
    ]
    assert main(sample) == 0
    capsys.readouterr()
    assert main(sample) == 0 and main(sample) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second  # same seed, same text


def test_sentinels_in_the_prompt_are_sentinel_ids(tokenizer_dir):
    tokenizer = Tokenizer.load(tokenizer_dir)
    special = tokenizer.special
    ids = encode_prompt(tokenizer, "def f(x):<extra_id_0> x<extra_id_1>")
    assert ids[-1] == special.sentinel_id(1) and special.sentinel_id(0) in ids
    assert tokenizer.decode(ids) == "def f(x):<extra_id_0> x<extra_id_1>"
    # Mid-text after a sentinel: no space SentencePiece would have invented.
    for text in ("<extra_id_0>x", "a<extra_id_0>return x", "<extra_id_3>\n  def", "<extra_id_0>"):
        assert tokenizer.decode(encode_prompt(tokenizer, text)) == text


@pytest.fixture(scope="module")
def error_exports(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("exports")
    bare = build_model("lm", preset("tiny", vocab_size=320, d_model=32, num_heads=4))
    # An export whose tokenizer was damaged after the export (which refuses a broken one).
    broken_tokenizer = _export(root / "broken-tokenizer", "seq2seq", tokenizer_dir, "softmax")
    (broken_tokenizer / "tokenizer" / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    return {
        "broken_tokenizer": broken_tokenizer,
        "missing": root / "nothing-here",
        "no_tokenizer": performer.save_pretrained(bare, root / "bare", model_kind="lm"),
        "encoder": _export(root, "encoder", tokenizer_dir),
        "seq2seq": _export(root, "seq2seq", tokenizer_dir),
        "lm": _export(root, "lm", tokenizer_dir),
    }


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "{missing}"], "no export at"),
        (["--model", "{no_tokenizer}"], "has no tokenizer/ directory"),
        (["--model", "{broken_tokenizer}"], "tokenizer/tokenizer.model is not a SentencePiece model"),
        (["--model", "{encoder}"], "encoder-only model does not generate"),
        (["--model", "{seq2seq}", "--num-beams", "2", "--temperature", "0.7"], "beam search is deterministic"),
        (["--model", "{seq2seq}", "--temperature", "0"], "temperature must be > 0"),
        (["--model", "{lm}", "--num-beams", "2"], "--num-beams works with seq2seq exports only"),
        (["--model", "{seq2seq}", "--prompt", "<extra_id_99>"], "this tokenizer has 20 sentinels"),
    ],
)
def test_errors_are_one_line_and_exit_2(error_exports, capsys, arguments, message):
    paths = error_exports
    arguments = [argument.format(**paths) for argument in arguments]
    if "--prompt" not in arguments:
        arguments += ["--prompt", "hello"]
    code = main(["generate", *arguments])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
