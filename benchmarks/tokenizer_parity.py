"""The export's fast tokenizer against SentencePiece: how many texts get other ids, before and after rounding.

    python benchmarks/tokenizer_parity.py [--slices 20000]    # needs the hf extra (transformers)

Trains the stdlib tokenizer (vocab 8000, `TokenizerConfig`'s defaults, as `make pretrain`'s data
preparation does) once, and compares two versions of it on the same texts:

* unrounded: the scores as SentencePiece trained them (every tokenizer before this change);
* rounded: the scores rounded to multiples of 1/16 and long texts encoded in runs of lines
  (`data.tokenizer`, "Exact scores"), what `train_tokenizer` writes now.

For each: `data.tokenizer.Tokenizer.encode_batch` against the export's `PerformerTokenizerFast`
(built by `performer.hf_files`, loaded through transformers) on every stdlib module (whole) and on
--slices random slices of 1-600 characters from them; the texts and tokens that differ, the tokens
per character of the corpus (what rounding costs in compression) and the encode time of the
corpus by each (medians of 3).

Writes benchmarks/results/tokenizer_parity.json and tokenizer_parity.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from data.corpus import CorpusConfig, iter_documents  # noqa: E402
from data.tokenizer import (  # noqa: E402
    INFO_FILE,
    MODEL_FILE,
    SpecialTokens,
    Tokenizer,
    TokenizerConfig,
    _rounded_scores,
    _train_sentencepiece,
    sample_training_lines,
)
from performer import hf_files  # noqa: E402

NAME = "tokenizer_parity"


def fast_tokenizer(model: bytes, special: SpecialTokens, directory: Path):
    """The export's fast tokenizer of `model`, as transformers loads it from an export."""
    from performer.hf.tokenization import PerformerTokenizerFast

    directory.mkdir(parents=True)
    (directory / MODEL_FILE).write_bytes(model)
    (directory / INFO_FILE).write_text(json.dumps({"special": special.to_dict()}))
    with warnings.catch_warnings(record=True) as caught:  # the unrounded tokenizer's (recorded)
        warnings.simplefilter("always")
        serialized = hf_files.fast_tokenizer(directory, special.to_dict(), "seq2seq")
    (directory / hf_files.HF_TOKENIZER_FILE).write_text(json.dumps(serialized))
    config = hf_files.tokenizer_config(serialized, special.to_dict())
    (directory / hf_files.HF_TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))
    return PerformerTokenizerFast.from_pretrained(directory), [str(warning.message) for warning in caught]


def median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def compare(ours: Tokenizer, fast, documents: list[str], slices: list[str]) -> dict:
    expected = ours.encode_batch(documents)
    got = fast(documents, add_special_tokens=False)["input_ids"]
    differing = [index for index, (a, b) in enumerate(zip(expected, got)) if a != b]
    slice_expected = ours.encode_batch(slices)
    slice_got = fast(slices, add_special_tokens=False)["input_ids"]
    return {
        "exact_chars": ours.exact_chars,
        "documents": len(documents),
        "documents_differing": len(differing),
        "longest_differing_chars": max((len(documents[i]) for i in differing), default=0),
        "tokens": sum(map(len, expected)),
        "tokens_differing": sum(
            sum(a != b for a, b in zip(expected[i], got[i])) + abs(len(expected[i]) - len(got[i])) for i in differing
        ),
        "chars": sum(map(len, documents)),
        "slices": len(slices),
        "slices_differing": sum(a != b for a, b in zip(slice_expected, slice_got)),
        "ours_encode_s": median_time(lambda: ours.encode_batch(documents)),
        "fast_encode_s": median_time(lambda: fast(documents, add_special_tokens=False)),
    }


def table(results: dict) -> str:
    """The comparison table and what it was measured on (the md file's and the README's)."""
    rows = []
    for name in ("unrounded", "rounded"):
        r = results["variants"][name]
        rows.append(
            [
                name,
                f"{r['documents_differing']} of {r['documents']:,}",
                f"{r['tokens_differing']:,} of {r['tokens']:,}",
                f"{r['slices_differing']:,} of {r['slices']:,}",
                f"{r['tokens'] / r['chars']:.4f}",
                f"{r['ours_encode_s']:.2f} s",
                f"{r['fast_encode_s']:.2f} s",
            ]
        )
    header = ["scores", "modules differing", "tokens differing", "slices differing", "tokens/char"]
    header += ["SentencePiece encode", "fast encode"]
    settings = results["settings"]
    return (
        f"The stdlib tokenizer (vocab {settings['vocab_size']}) on every stdlib module, whole, and on "
        f"{settings['slices']:,} random slices of 1-600 characters; ids of `data.tokenizer` against the export's "
        "fast tokenizer; encode times for the whole corpus:\n\n" + common.table(header, rows, "lrrrrrr")
    )


def markdown(results: dict) -> str:
    return "# Fast tokenizer against SentencePiece\n\n" + table(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=20_000)
    args = parser.parse_args()

    documents = [document.text for document in iter_documents(CorpusConfig())]
    config = TokenizerConfig()
    special = SpecialTokens(vocab_size=config.vocab_size, num_sentinels=config.num_sentinels)
    started = time.perf_counter()
    trained = _train_sentencepiece(sample_training_lines(documents, config), config, special)
    train_s = time.perf_counter() - started
    rng = random.Random(0)
    slices = []
    for _ in range(args.slices):
        text = documents[rng.randrange(len(documents))]
        start = rng.randrange(max(1, len(text)))
        slices.append(text[start : start + rng.randint(1, 600)])

    variants = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, model in (("unrounded", trained), ("rounded", _rounded_scores(trained))):
            fast, warned = fast_tokenizer(model, special, Path(scratch) / name)
            variants[name] = {**compare(Tokenizer(model, special), fast, documents, slices), "export_warnings": warned}
            print(name, variants[name], flush=True)
    results = {
        "machine": common.machine(),
        "settings": {"vocab_size": config.vocab_size, "slices": args.slices, "train_s": train_s},
        "variants": variants,
    }
    common.publish(NAME, results, markdown(results))


if __name__ == "__main__":
    main()
