"""Weight-decay groups follow the field's convention: matrices decay; norms, biases, embeddings do not."""

import re

import pytest
import torch

from performer.config import preset
from performer.models import build_model
from performer.optim import describe_groups, parameter_kinds, weight_decay_groups

# The convention, written as name patterns independently of how performer.optim classifies.
DECAYING = re.compile(r"(q_proj|k_proj|v_proj|out_proj|w_in|w_out|lm_head)\.weight$")


def _names(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("norm", ["layernorm", "rezero", "scalenorm"])
@pytest.mark.parametrize("kind, tie", [("seq2seq", True), ("lm", True), ("lm", False), ("encoder", True)])
def test_matrices_decay_and_norms_biases_embeddings_do_not(kind, tie, norm):
    overrides = dict(vocab_size=300, d_model=32, position="absolute", tie_embeddings=tie, norm=norm)
    if kind == "encoder":
        overrides["num_classes"] = 3
    model = build_model(kind, preset("tiny", **overrides))
    groups = {group["name"]: group for group in weight_decay_groups(model, 0.1)}
    decay, no_decay = _names(model, groups["decay"]), _names(model, groups["no_decay"])
    every = set(dict(model.named_parameters()))
    assert decay | no_decay == every and not decay & no_decay
    expected = {name for name in every if DECAYING.search(name)}
    if kind == "encoder":
        expected.add("classifier.weight")
    assert decay == expected
    assert "embedding.tokens.weight" in no_decay and "embedding.positions.weight" in no_decay
    if norm == "layernorm":
        assert {n for n in no_decay if n.endswith("norm.weight")}  # gains exempt
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    # Each parameter once: a tied output head is the embedding table itself.
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == len(list(model.parameters()))


def test_counts_on_the_tiny_model():
    model = build_model("seq2seq", preset("tiny", vocab_size=8000))
    described = describe_groups(weight_decay_groups(model, 0.01))
    # 2 encoder layers x 6 matrices + 2 decoder layers x 10 matrices = 32 matrices.
    assert described["decay"]["tensors"] == 32
    assert described["no_decay"]["parameters"] == 8000 * 128 + sum(
        p.numel() for name, p in model.named_parameters() if p.ndim < 2
    )
    assert described["decay"]["parameters"] + described["no_decay"]["parameters"] == sum(
        p.numel() for p in model.parameters()
    )


def test_no_decay_is_configurable_and_checked():
    model = build_model("lm", preset("tiny", vocab_size=300, d_model=32))
    everything = weight_decay_groups(model, 0.1, no_decay=())
    assert [group["name"] for group in everything] == ["decay"]
    nothing = weight_decay_groups(model, 0.1, no_decay=("matrices", "norms", "biases", "embeddings"))
    assert [group["name"] for group in nothing] == ["no_decay"]
    with pytest.raises(ValueError, match="gains"):
        weight_decay_groups(model, 0.1, no_decay=("gains",))
    kinds = parameter_kinds(model)
    assert kinds["embedding.tokens.weight"] == "embeddings" and kinds["decoder.final_norm.weight"] == "norms"
    assert kinds["decoder.final_norm.bias"] == "norms"  # a norm's bias goes with the norm
    assert {kinds[n] for n in kinds if n.endswith("w_in.bias")} == {"biases"}


def test_frozen_parameters_are_left_out():
    model = build_model("lm", preset("tiny", vocab_size=300, d_model=32))
    model.embedding.tokens.weight.requires_grad_(False)
    grouped = {id(p) for group in weight_decay_groups(model, 0.1) for p in group["params"]}
    assert id(model.embedding.tokens.weight) not in grouped
    torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=1e-3)  # torch accepts the groups as they are
