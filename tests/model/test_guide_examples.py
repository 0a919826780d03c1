"""Every code example of the user's guide (docs/guide.md) runs, with ``model.`` imports replaced by
``performer.``, and gives the shapes it promises.

The blocks run in order in one namespace, as a reader would type them. Fragments that use names
the guide leaves to the reader (``batch_size``, ``embed``...) get those names from a preamble here;
nothing in a block is edited except the import path and the guide's ``(...)`` placeholder.
"""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
VOCAB = 1000


def _python_blocks() -> list[tuple[int, str]]:
    text = GUIDE.read_text()
    blocks = []
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1)))
    return blocks


def _adapt(code: str) -> str:
    code = re.sub(r"\bfrom model\.", "from performer.", code)
    code = re.sub(r"\bimport model\.", "import performer.", code)
    return code.replace("EncoderDecoderTransformer(...)", "EncoderDecoderTransformer()")


def _first_line_containing(blocks, needle: str) -> int:
    return next(line for line, code in blocks if needle in code)


def _preambles(blocks) -> dict[int, str]:
    """Names the reader supplies before a fragment, keyed by the block's first line."""
    return {
        _first_line_containing(blocks, "mask[:, :, pad_positions] = 0\n\n# Causal"): (
            "batch_size, seq_len, pad_positions = 4, 12, [10, 11]\n"
            "decoder = PerformerDecoder(num_layers=2, use_cross_attention=False)\n"
            "tgt = torch.randn(batch_size, seq_len, 512)\n"
        ),
        _first_line_containing(blocks, "cross_mask = torch.ones"): (
            "batch_size, tgt_len, src_len, pad_positions = 32, 50, 100, [97, 98, 99]\n"
            "tgt = torch.randn(batch_size, tgt_len, 512)\n"
        ),
        _first_line_containing(blocks, "translator = "): (
            "embed_source, embed_target = nn.Embedding(VOCAB, 512), nn.Embedding(VOCAB, 512)\n"
            "output_projection = nn.Linear(512, VOCAB)\n"
            "src_tokens, tgt_tokens = torch.randint(0, VOCAB, (2, 30)), torch.randint(0, VOCAB, (2, 20))\n"
        ),
        _first_line_containing(blocks, "summarizer = "): (
            "embed = nn.Embedding(VOCAB, 512)\n"
            "document_tokens, summary_tokens = torch.randint(0, VOCAB, (2, 40)), torch.randint(0, VOCAB, (2, 8))\n"
        ),
        _first_line_containing(blocks, "lm = PerformerDecoder"): "token_ids = torch.randint(0, VOCAB, (2, 16))\n",
        _first_line_containing(blocks, "classifier = PerformerEncoder"): (
            "tokens = torch.randint(0, VOCAB, (2, 16))\nclassification_head = nn.Linear(512, 3)\n"
        ),
        _first_line_containing(blocks, "d_head * log(d_head)"): "d_head = 64\nfrom math import log\n",
        _first_line_containing(blocks, "# Manual encoding"): (
            "src_mask = torch.ones(32, 100)\nsrc_mask[:, 90:] = 0\n"
            "causal_mask = torch.ones(50, 50).tril().expand(32, 50, 50)\n"
        ),
    }


def test_the_guide_has_the_examples_this_test_expects():
    assert len(_python_blocks()) >= 20


def test_every_guide_example_runs_and_gives_the_promised_shapes():
    blocks = _python_blocks()
    preambles = _preambles(blocks)
    namespace = {"torch": torch, "nn": nn, "math": math, "device": torch.device("cpu"), "VOCAB": VOCAB}
    torch.manual_seed(0)
    shapes, models = {}, {}
    for line, code in blocks:
        exec(compile(preambles.get(line, ""), f"preamble of guide line {line}", "exec"), namespace)
        try:
            # The examples only run forwards: no autograd graph keeps the test lean.
            with torch.no_grad():
                exec(compile(_adapt(code), f"docs/guide.md block at line {line}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - re-raised with the block's location
            pytest.fail(f"guide example at line {line} failed: {type(error).__name__}: {error}")
        models[line] = namespace.get("model")
        for name in ("encoded", "decoded", "output", "logits", "next_token_logits", "summary_continuation"):
            if isinstance(namespace.get(name), torch.Tensor):
                shapes[(line, name)] = tuple(namespace[name].shape)

    def shape_after(needle, name):
        return shapes[(_first_line_containing(blocks, needle), name)]

    assert shape_after("encoded = encoder(src)", "encoded") == (32, 100, 512)
    assert shape_after("decoded = decoder(tgt, encoder_output", "decoded") == (32, 50, 512)
    assert shape_after("output = model(src, tgt)", "output") == (32, 50, 512)
    assert shape_after("output = model(src, tgt)", "encoded") == (32, 100, 512)
    assert shape_after("output = model(src, tgt)", "decoded") == (32, 50, 512)
    assert shape_after("use_causal_mask=True)\n", "output") == (4, 12, 512)
    assert shape_after("cross_attn_mask=cross_mask)", "output") == (32, 50, 512)
    assert shape_after("translator = ", "logits") == (2, 20, VOCAB)
    assert shape_after("summarizer = ", "summary_continuation") == (2, 8, 512)
    assert shape_after("lm = PerformerDecoder", "next_token_logits") == (2, VOCAB)
    assert shape_after("classifier = PerformerEncoder", "logits") == (2, 3)
    assert shape_after("# Manual encoding", "decoded") == (32, 50, 512)

    # The guide's layer examples work in both modes.
    x, memory = torch.randn(2, 10, 512), torch.randn(2, 7, 512)
    assert namespace["encoder_layer"](x).shape == (2, 10, 512)
    assert namespace["decoder_layer"](x, encoder_output=memory).shape == (2, 10, 512)
    # The guide's own padding mask, (B, L, L) with padded columns, works with linear attention.
    encoder = namespace["encoder"]
    assert encoder(torch.randn(4, 12, 512), mask=namespace["mask"]).shape == (4, 12, 512)
    # Projections were fixed on the guide's request.
    fixed = models[_first_line_containing(blocks, "fix_projection_matrices_()")]
    assert all(bool(a.projection_fixed) for a in fixed.encoder.favor_attentions() + fixed.decoder.favor_attentions())
    # The mixed and the asymmetric models are what they say, and run.
    mixed = models[_first_line_containing(blocks, "Encoder with softmax")]
    asymmetric = models[_first_line_containing(blocks, "Deeper encoder")]
    assert mixed.encoder.layers[0].attention_type == "softmax"
    assert mixed.decoder.layers[0].attention_type == "causal_linear"
    assert (len(asymmetric.encoder.layers), len(asymmetric.decoder.layers)) == (12, 6)
    src, tgt = torch.randn(2, 9, 512), torch.randn(2, 5, 512)
    with torch.no_grad():
        assert mixed(src, tgt).shape == asymmetric(src, tgt).shape == (2, 5, 512)
