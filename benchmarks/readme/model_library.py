"""README section "The model library": the exported tokenizer's parity with SentencePiece ("Fine-tuning with
transformers and PEFT").
"""

from __future__ import annotations

from benchmarks.readme.core import Block, Figure, Results


def tokenizer_parity_table(r: Results) -> str:
    """The export's fast tokenizer against SentencePiece, scores unrounded and rounded."""
    from benchmarks import tokenizer_parity

    return tokenizer_parity.table(r["tokenizer_parity"])


BLOCKS: dict[str, Block] = {
    "tokenizer_parity": Block(("tokenizer_parity",), tokenizer_parity_table),
}


FIGURES: list[Figure] = []
