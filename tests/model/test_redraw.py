"""Projection redraws: seeded, identical across processes, at step boundaries only, freezable."""

import math
import subprocess
import sys

import pytest
import torch

from performer import EncoderDecoderTransformer, PerformerDecoder, PerformerEncoder, PerformerLayer
from performer.config import preset
from performer.models import PerformerSeq2Seq

SMALL = dict(d_model=16, num_heads=2, num_layers=2, dropout=0.0)

_PROCESS_SCRIPT = """
import hashlib, torch
from performer import EncoderDecoderTransformer
model = EncoderDecoderTransformer(encoder_params=dict(d_model=16, num_heads=2, num_layers=2),
                                  decoder_params=dict(d_model=16, num_heads=2, num_layers=2))
model.redraw_projection_matrices_(seed=1234, step=17)
digest = hashlib.sha256()
for name, buffer in sorted(model.state_dict().items()):
    if name.endswith(".projection"):
        digest.update(name.encode()); digest.update(buffer.numpy().tobytes())
print(digest.hexdigest())
"""


def _projections(module):
    return {n: b.clone() for n, b in module.state_dict().items() if n.endswith(".projection")}


def test_same_seed_gives_bitwise_equal_projections_in_two_processes():
    # Different global torch seeds per process: only the explicit seed may matter.
    digests = {
        subprocess.run(
            [sys.executable, "-c", f"import torch; torch.manual_seed({global_seed})\n" + _PROCESS_SCRIPT],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for global_seed in (1, 2)
    }
    assert len(digests) == 1


def test_every_attention_gets_its_own_projection_and_steps_change_them():
    model = EncoderDecoderTransformer(encoder_params=SMALL, decoder_params=SMALL)
    model.redraw_projection_matrices_(seed=5, step=1)
    first = _projections(model)
    assert len(first) == 2 + 4  # encoder self x2, decoder self + cross x2
    tensors = list(first.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(tensors) for b in tensors[i + 1 :])
    model.redraw_projection_matrices_(seed=5, step=2)
    assert all(not torch.equal(first[n], p) for n, p in _projections(model).items())
    model.redraw_projection_matrices_(seed=5, step=1)
    assert all(torch.equal(first[n], p) for n, p in _projections(model).items())
    assert model.projection_state() == (5, 1)
    # A sub-module redraws its attentions exactly as the whole model would.
    model.encoder.redraw_projection_matrices_(seed=5, step=1)
    assert all(torch.equal(first[n], p) for n, p in _projections(model).items())


def test_auto_redraw_counts_outermost_training_forwards_only():
    encoder = PerformerEncoder(**SMALL, feature_redraw_interval=3)
    x = torch.randn(1, 4, 16)
    initial = _projections(encoder)
    for _ in range(3):
        encoder(x)
    assert all(torch.equal(initial[n], p) for n, p in _projections(encoder).items())
    encoder(x)  # the fourth training forward redraws first
    assert all(not torch.equal(initial[n], p) for n, p in _projections(encoder).items())
    assert encoder.projection_state()[1] == 1
    encoder.eval()
    for _ in range(10):
        encoder(x)
    assert encoder.projection_state()[1] == 1


def test_auto_redraw_of_nested_stacks_ticks_once_per_outer_call():
    model = EncoderDecoderTransformer(
        encoder_params=dict(SMALL, feature_redraw_interval=2), decoder_params=dict(SMALL, feature_redraw_interval=2)
    )
    src, tgt = torch.randn(1, 4, 16), torch.randn(1, 3, 16)
    for _ in range(5):
        model(src, tgt)
    assert model.encoder.projection_state()[1] == 2
    assert model.decoder.projection_state()[1] == 2


def test_fix_projection_matrices_stops_every_redraw():
    decoder = PerformerDecoder(**SMALL, use_cross_attention=False, feature_redraw_interval=1)
    decoder.fix_projection_matrices_()
    frozen = _projections(decoder)
    for _ in range(3):
        decoder(torch.randn(1, 4, 16))
    decoder.redraw_projection_matrices_(seed=99, step=7)
    assert all(torch.equal(frozen[n], p) for n, p in _projections(decoder).items())
    restored = PerformerDecoder(**SMALL, use_cross_attention=False)
    restored.load_state_dict(decoder.state_dict())
    restored.redraw_projection_matrices_(seed=3, step=3)
    assert all(torch.equal(frozen[n], p) for n, p in _projections(restored).items())


def test_projections_are_saved_in_state_dict_and_stay_float32_under_casts():
    layer = PerformerLayer(d_model=16, num_heads=2, use_cross_attention=True)
    state = layer.state_dict()
    assert "self_attention.projection" in state and "cross_attention.projection" in state
    half = layer.to(torch.float16)
    assert half.self_attention.projection.dtype == torch.float32
    assert torch.equal(half.self_attention.projection, state["self_attention.projection"])
    assert half.self_attention.q_proj.weight.dtype == torch.float16


def test_checkpoint_recompute_gives_the_same_gradients_and_never_redraws():
    config = preset("tiny", vocab_size=64, d_model=32, dropout=0.1, feature_redraw_interval=1)
    torch.manual_seed(3)
    plain = PerformerSeq2Seq(config)
    checkpointed = PerformerSeq2Seq(
        preset("tiny", vocab_size=64, d_model=32, dropout=0.1, feature_redraw_interval=1, gradient_checkpointing=1)
    )
    checkpointed.load_state_dict(plain.state_dict())
    batch = dict(
        input_ids=torch.randint(1, 64, (2, 12)),
        decoder_input_ids=torch.randint(1, 64, (2, 6)),
        labels=torch.randint(1, 64, (2, 6)),
    )
    gradients = []
    for model in (plain, checkpointed):
        torch.manual_seed(11)  # same dropout masks; checkpoint replays the RNG state
        model(**batch).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        assert torch.allclose(gradients[0][name], gradients[1][name], atol=1e-6), name
    # One outer forward each: one redraw each (interval 1 redraws before the 2nd forward only).
    assert plain.encoder.projection_state() == checkpointed.encoder.projection_state()


def test_redraw_schedule_names_the_draw_each_step_trains_with():
    from performer.redraw import RedrawSchedule

    every_three = RedrawSchedule(3)
    assert [every_three.draw_for_step(step) for step in range(0, 11)] == [0, 0, 0, 0, 3, 3, 3, 6, 6, 6, 9]
    assert [step for step in range(0, 11) if every_three.redraws_after(step)] == [3, 6, 9]
    # The draw in force after step s (what an eval, a checkpoint or an export at s sees) trained s.
    assert every_three.trained_steps(6) == (4, 6) and every_three.trained_steps(7) == (7, 7)
    assert every_three.trained_steps(0) is None
    never = RedrawSchedule(None)
    assert {never.draw_for_step(step) for step in range(0, 50)} == {0} and not any(map(never.redraws_after, range(50)))
    assert never.trained_steps(600) == (1, 600)
    with pytest.raises(ValueError, match="interval"):
        RedrawSchedule(0)


def test_smooth_schedule_moves_from_one_draw_to_the_next_one_step_at_a_time():
    from performer.redraw import RedrawSchedule

    smooth = RedrawSchedule(4, mode="smooth")
    blends = [smooth.blend_for_step(step) for step in range(1, 10)]
    assert blends == [
        (0, 0, 0.0),
        (0, 4, 0.25),
        (0, 4, 0.5),
        (0, 4, 0.75),
        (4, 8, 0.0),
        (4, 8, 0.25),
        (4, 8, 0.5),
        (4, 8, 0.75),
        (8, 12, 0.0),
    ]
    assert [s for s in range(0, 10) if smooth.changes_after(s)] == list(range(1, 10))
    assert [s for s in range(0, 10) if smooth.redraws_after(s)] == [4, 8]
    assert smooth.trained_steps(6) == (6, 6) and smooth.trained_steps(4) == (4, 4) and smooth.trained_steps(5) == (5, 5)
    assert smooth.trained_steps(1) == (1, 1)
    with pytest.raises(ValueError, match="mode"):
        RedrawSchedule(4, mode="jump")


def test_smooth_projections_are_blends_of_two_draws_and_meet_them_at_the_ends():
    from performer.redraw import RedrawSchedule

    model = PerformerSeq2Seq(preset("tiny", vocab_size=300, d_model=32))
    swap, smooth = RedrawSchedule(4), RedrawSchedule(4, mode="smooth")
    model.set_projections_for_step_(7, 5, swap)
    draw4 = _projections(model)
    model.set_projections_for_step_(7, 1, swap)
    draw0 = _projections(model)
    model.set_projections_for_step_(7, 5, smooth)  # the blend reaches draw 4 exactly at step 5
    assert all(torch.equal(draw4[n], p) for n, p in _projections(model).items())
    model.set_projections_for_step_(7, 3, smooth)  # half way: cos(pi/4) draw 0 + sin(pi/4) draw 4
    for name, projection in _projections(model).items():
        expected = math.cos(math.pi / 4) * draw0[name] + math.sin(math.pi / 4) * draw4[name]
        torch.testing.assert_close(projection, expected, rtol=1e-6, atol=1e-6)
    assert model.projection_state() == (7, 0)


def test_every_row_of_a_blend_is_a_standard_gaussian():
    """Unbiased FAVOR+ needs each row ~ N(0, I_D): a blend of two independent draws keeps that."""
    from performer.attention.module import Attention

    attention = Attention(16, 1, "favor", nb_features=16)
    rows = []
    for seed in range(400):
        attention.blend_projection_(seed, 0, 1, 0.37)
        rows.append(attention.projection.clone())
    rows = torch.cat(rows).double()  # (6400, 16)
    assert rows.mean(0).abs().max() < 0.1
    torch.testing.assert_close(rows.T @ rows / len(rows), torch.eye(16, dtype=torch.float64), atol=0.12, rtol=0)
