"""Pretraining models: presets, configs, weight transfer between kernels, cached generation."""

import pytest
import torch

from performer.config import PRESETS, ModelConfig, preset
from performer.generation import SamplingParams, filter_logits
from performer.models import (
    PerformerEncoderModel,
    PerformerLM,
    PerformerSeq2Seq,
    build_model,
    load_weights,
    training_flops,
)

VOCAB = 97


def _config(**overrides):
    return preset("tiny", vocab_size=VOCAB, d_model=32, num_heads=4, dropout=0.0, **overrides)


def test_presets_follow_the_guide():
    assert (PRESETS["small"]["d_model"], PRESETS["small"]["num_encoder_layers"], PRESETS["small"]["num_heads"]) == (
        256,
        4,
        4,
    )
    assert (PRESETS["medium"]["d_model"], PRESETS["medium"]["num_encoder_layers"], PRESETS["medium"]["num_heads"]) == (
        512,
        6,
        8,
    )
    assert (PRESETS["large"]["d_model"], PRESETS["large"]["num_encoder_layers"], PRESETS["large"]["num_heads"]) == (
        1024,
        12,
        16,
    )


def test_unknown_and_invalid_config_keys_are_clear_errors():
    with pytest.raises(ValueError, match="unknown config key 'model.d_modle'; did you mean 'model.d_model'"):
        ModelConfig.from_dict({"d_modle": 64})
    with pytest.raises(ValueError, match="attention_type"):
        ModelConfig(attention_type="linear_fast")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")
    assert ModelConfig.from_dict(_config().to_dict()) == _config()


@pytest.mark.parametrize("kind", ["seq2seq", "lm", "encoder"])
def test_models_train_a_step_and_loss_ignores_minus_100(kind):
    model = build_model(kind, _config())
    ids = torch.randint(1, VOCAB, (2, 10))
    labels = ids.clone()
    labels[:, 5:] = -100
    batch = dict(input_ids=ids, labels=labels, attention_mask=torch.ones(2, 10, dtype=torch.bool))
    if kind == "seq2seq":
        batch["decoder_input_ids"] = ids
    output = model(**batch)
    assert output.logits.shape == (2, 10, VOCAB)
    expected = torch.nn.functional.cross_entropy(output.logits[:, :5].reshape(-1, VOCAB), ids[:, :5].reshape(-1))
    assert torch.allclose(output.loss, expected, atol=1e-6)
    output.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_encoder_model_classifies_from_the_first_token():
    model = PerformerEncoderModel(_config(num_classes=3))
    output = model(torch.randint(1, VOCAB, (4, 9)), class_labels=torch.tensor([0, 1, 2, 1]))
    assert output.logits.shape == (4, 3) and output.loss.ndim == 0


def test_same_weights_load_into_softmax_and_favor_variants_and_agree_with_many_features():
    torch.manual_seed(0)
    softmax_model = PerformerSeq2Seq(_config(attention_type="softmax"))
    batch = dict(input_ids=torch.randint(1, VOCAB, (2, 16)), decoder_input_ids=torch.randint(1, VOCAB, (2, 8)))
    reference = softmax_model.eval()(**batch).logits
    errors = {}
    for nb_features in (16, 4096):
        favor_model = PerformerSeq2Seq(_config(attention_type="favor", nb_features=nb_features, projection_seed=1))
        load_weights(favor_model, softmax_model.state_dict())
        approx = favor_model.eval()(**batch).logits
        errors[nb_features] = ((approx - reference).norm() / reference.norm()).item()
    # Monte-Carlo error falls like 1/sqrt(M): measured ~0.29 at M=16 and ~0.03 at M=4096.
    assert errors[4096] < 0.25 * errors[16]
    assert errors[4096] < 0.06
    # And back: a FAVOR+ checkpoint loads into the softmax model (projections are ignored).
    load_weights(softmax_model, favor_model.state_dict())


def test_weights_of_another_shape_are_refused_with_names():
    with pytest.raises(ValueError, match="missing"):
        load_weights(PerformerSeq2Seq(_config()), PerformerLM(_config()).state_dict())


GENERATION_SETUPS = [
    pytest.param(dict(attention_type="favor"), id="favor-rotary"),
    pytest.param(dict(attention_type="softmax"), id="softmax-rotary"),
    pytest.param(dict(attention_type="favor", feature_map="favor++"), id="favor++-rotary"),
    pytest.param(dict(attention_type="favor", position="absolute"), id="favor-absolute"),
    pytest.param(dict(attention_type="favor", norm="scalenorm", activation="geglu"), id="favor-scalenorm"),
]


@pytest.mark.parametrize("setup", GENERATION_SETUPS)
def test_cached_lm_decoding_equals_full_forward(setup):
    model = PerformerLM(_config(**setup)).eval()
    ids = torch.randint(1, VOCAB, (2, 21))
    full = model(ids).logits
    cache = model.decoder.new_cache()
    prompt = 7  # a prompt in one cached pass, then one token at a time
    steps = [model.vocabulary_logits(model.decoder(model.embedding(ids[:, :prompt]), cache=cache))]
    for t in range(prompt, 21):
        hidden = model.decoder(model.embedding(ids[:, t : t + 1], offset=cache.length), cache=cache)
        steps.append(model.vocabulary_logits(hidden))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)


@pytest.mark.parametrize("setup", GENERATION_SETUPS[:3])
def test_cached_seq2seq_decoding_equals_full_forward(setup):
    model = PerformerSeq2Seq(_config(**setup)).eval()
    src = torch.randint(1, VOCAB, (2, 13))
    src_mask = torch.ones(2, 13, dtype=torch.bool)
    src_mask[1, 9:] = False
    tgt = torch.randint(1, VOCAB, (2, 9))
    full = model(src, tgt, attention_mask=src_mask).logits
    memory = model.encode(src, src_mask)
    cache = model.decoder.new_cache()
    steps = [
        model.vocabulary_logits(
            model.decoder(
                model.embedding(tgt[:, t : t + 1], offset=t),
                encoder_output=memory,
                cross_attn_mask=src_mask,
                cache=cache,
            )
        )
        for t in range(9)
    ]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)


def test_greedy_generation_matches_argmax_of_full_forward():
    model = PerformerLM(_config()).eval()
    prompt = torch.randint(1, VOCAB, (2, 5))
    generated = model.generate(prompt, max_new_tokens=6)
    assert generated.shape == (2, 11) and torch.equal(generated[:, :5], prompt)
    logits = model(generated[:, :-1]).logits
    assert torch.equal(logits[:, 4:].argmax(-1), generated[:, 5:])


def test_seq2seq_greedy_and_beam_search():
    torch.manual_seed(1)
    model = PerformerSeq2Seq(_config()).eval()
    src = torch.randint(1, VOCAB, (3, 11))
    greedy = model.generate(src, max_new_tokens=5, decoder_start_id=0)
    start = torch.zeros(3, 1, dtype=torch.long)
    logits = model(src, torch.cat([start, greedy[:, :-1]], 1)).logits
    assert torch.equal(logits.argmax(-1), greedy)

    def sequence_log_prob(tokens):
        log_probs = model(src, torch.cat([start, tokens[:, :-1]], 1)).logits.log_softmax(-1)
        return log_probs.gather(-1, tokens[..., None]).squeeze(-1).sum(-1)

    one_beam = model.generate(src, max_new_tokens=5, num_beams=1)
    beams = model.generate(src, max_new_tokens=5, num_beams=4, length_penalty=0.0)
    assert torch.equal(one_beam, greedy)
    # Without EOS all beams have the same length: beam search can only find likelier sequences.
    assert (sequence_log_prob(beams) >= sequence_log_prob(greedy) - 1e-5).all()


def test_generation_stops_at_eos_and_pads_finished_rows():
    model = PerformerLM(_config(pad_id=0)).eval()
    prompt = torch.randint(1, VOCAB, (2, 4))
    first = model.generate(prompt, max_new_tokens=1)[:, -1]
    eos = int(first[0])
    out = model.generate(prompt, max_new_tokens=6, eos_id=eos)
    assert out[0, 4] == eos and (out[0, 5:] == 0).all()


def test_sampling_filters_and_seeded_draws():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, SamplingParams(top_k=2))[0, 2:]).all()
    nucleus = filter_logits(logits, SamplingParams(top_p=0.7))  # p = .64, .24, ...: two tokens reach 0.7
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.1))[0, 0])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)
    model = PerformerLM(_config()).eval()
    prompt = torch.randint(1, VOCAB, (2, 4))
    draws = [
        model.generate(
            prompt,
            max_new_tokens=8,
            sampling=SamplingParams(temperature=1.5, top_k=20),
            generator=torch.Generator().manual_seed(5),
        )
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])


def test_absolute_positions_past_the_table_are_a_clear_error():
    model = PerformerLM(_config(position="absolute", max_positions=8))
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.randint(1, VOCAB, (1, 9)))


@pytest.mark.parametrize("kind", ["seq2seq", "lm", "encoder"])
def test_training_flops_match_the_matmuls_torch_counts_in_a_step(kind):
    """training_flops (6 x the parameters each token passes through) against torch's own count of
    the matrix products of a forward + backward, softmax attention so that only its SDPA (counted
    apart) is outside the products; what remains between them is norms and biases."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(kind, _config(attention_type="softmax"))
    encoder_tokens, decoder_tokens = 2 * 48, 2 * 16
    ids = torch.randint(5, VOCAB, (2, 48))
    targets = torch.randint(5, VOCAB, (2, 16))
    with FlopCounterMode(display=False) as counter:
        if kind == "seq2seq":
            loss = model(input_ids=ids, decoder_input_ids=targets, labels=targets).loss
        elif kind == "lm":
            loss = model(input_ids=targets, labels=targets).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    products = sum(
        count
        for op, count in counter.get_flop_counts()["Global"].items()
        if op.__name__.split(".")[0] in ("mm", "addmm", "bmm")
    )
    encoder_tokens = encoder_tokens if kind != "lm" else 0
    decoder_tokens = decoder_tokens if kind != "encoder" else 0
    counted = training_flops(model, encoder_tokens, decoder_tokens)
    assert counted == pytest.approx(products, rel=0.03)
    if kind == "seq2seq":  # every parameter for every token: about twice too many here
        everything = 6 * sum(p.numel() for n, p in model.named_parameters() if "embedding" not in n)
        assert everything * (encoder_tokens + decoder_tokens) > 1.3 * products
