"""The Triton FAVOR+ / FAVOR++ kernels against the naive twins: values and gradients, causal,
bidirectional and cross attention, padding, chunk edges, queries without keys, and the plans
the GPU takes (scans split over many programs, feature tiles with a tail, split logits).

Without a GPU the kernels run in Triton's interpreter (float32 only: its tl.dot has no bf16),
on CPU tensors; on a machine with CUDA the same tests run the compiled kernels. The bf16 path is
checked on a GPU by benchmarks/gpu_check.sh.
"""

import dataclasses

import pytest
import torch
from favor_twins import naive, output_and_grads, upstream

from performer.attention import triton as favor_triton
from performer.attention.fused import favor_attention, favor_attention_torch
from performer.feature_maps import favorpp_default_a, gaussian_orthogonal_projection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and not favor_triton.interpreting():
    pytest.fail(
        "no GPU and the kernels are compiled: tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported"
    )


@pytest.fixture(params=["favor+", "favor++"])
def a(request):
    return None if request.param == "favor+" else favorpp_default_a(16)


def _inputs(batch=2, heads=2, length=37, head_dim=16, nb_features=24, key_length=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    key_length = key_length or length
    projection = gaussian_orthogonal_projection(nb_features, head_dim, seed=seed).to(DEVICE)

    def leaf(size):
        return torch.randn(batch, heads, size, head_dim, generator=generator).to(DEVICE).requires_grad_()

    return leaf(length), leaf(key_length), leaf(key_length), projection


def _kernel(q, k, v, projection, key_padding=None, causal=False, chunk_size=16, a=None, plan_changes=None):
    if plan_changes:
        plan = dataclasses.replace(favor_triton.make_plan(q, k, v, projection.shape[0], chunk_size), **plan_changes)
        out = favor_triton.favor_attention_planned(q, k, v, projection, key_padding, causal, a, plan)
    else:
        out = favor_triton.favor_attention_triton(q, k, v, projection, key_padding, causal, chunk_size, a)
    return output_and_grads(out, (q, k, v))


def _assert_same(got, expected, atol=2e-5, rtol=1e-4, grad_rtol=1e-3):
    (out_a, grads_a), (out_b, grads_b) = got, expected
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    for grad_a, grad_b, name in zip(grads_a, grads_b, "qkv"):
        torch.testing.assert_close(grad_a, grad_b, atol=atol, rtol=grad_rtol, msg=f"d{name} differs")


# Chunk edges at C = 16: shorter than a chunk, exactly one, one past, several with a tail. M = 24:
# a full tile of 16 features and a partial one.
@pytest.mark.parametrize("length", [1, 15, 16, 17, 53])
def test_causal_equals_quadratic(length, a):
    q, k, v, projection = _inputs(length=length)
    _assert_same(_kernel(q, k, v, projection, causal=True, a=a), naive(q, k, v, projection, causal=True, a=a))


@pytest.mark.parametrize(("length", "key_length"), [(1, 1), (37, 37), (5, 29), (40, 3), (33, 70)])
def test_bidirectional_and_cross_equal_quadratic(length, key_length, a):
    q, k, v, projection = _inputs(length=length, key_length=key_length)
    _assert_same(_kernel(q, k, v, projection, a=a), naive(q, k, v, projection, a=a))


@pytest.mark.parametrize("causal", [True, False])
def test_padded_keys_equal_quadratic(causal, a):
    q, k, v, projection = _inputs(length=50)
    key_padding = torch.rand(2, 50, generator=torch.Generator().manual_seed(1)) > 0.3
    key_padding = key_padding.to(DEVICE)
    _assert_same(
        _kernel(q, k, v, projection, key_padding, causal, a=a),
        naive(q, k, v, projection, key_padding, causal, a=a),
    )


@pytest.mark.parametrize(
    "plan_changes",
    [
        {"scan_programs": 1},  # one program scans every chunk: no carry between splits
        {"scan_programs": 10_000},  # one chunk per split: every state comes from the carry
        {"block_m": 32},  # M = 24 in one tile of 32 (the default, 16, leaves a partial second tile)
        {"chunk": 32},
        {"centre_values": True},  # the bf16 path's centred values, here in float32
    ],
    ids=lambda changes: ",".join(f"{key}={value}" for key, value in changes.items()),
)
@pytest.mark.parametrize("causal", [True, False])
def test_every_plan_gives_the_same_attention(plan_changes, causal):
    q, k, v, projection = _inputs(length=53)
    key_padding = (torch.arange(53) < 45).expand(2, 53).to(DEVICE)
    _assert_same(
        _kernel(q, k, v, projection, key_padding, causal, plan_changes=plan_changes),
        naive(q, k, v, projection, key_padding, causal),
    )


@pytest.mark.parametrize("causal", [True, False])
def test_split_logits(causal):
    """The bf16 path's logits: the projection as two bf16 parts (here float32 operands, which
    the interpreter can multiply), ~16 bits; gradients use the first part alone (bf16 level)."""
    q, k, v, projection = _inputs(length=40)
    (out, grads) = _kernel(q, k, v, projection, causal=causal, plan_changes={"split_logits": True})
    (expected_out, expected_grads) = naive(q, k, v, projection, causal=causal)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=5e-5)
    for grad, expected, name in zip(grads, expected_grads, "qkv"):
        error = (grad - expected).abs().max() / expected.abs().max()
        assert error < 2**-8, f"d{name}: {error:.1e} of its largest entry"


def test_same_as_the_torch_op_at_the_default_chunk(a):
    """Without a chunk size the kernels take their own default (64 here): still the same values."""
    q, k, v, projection = _inputs(length=150, nb_features=40)
    out = favor_triton.favor_attention_triton(q, k, v, projection, causal=True, feature_a=a)
    torch.testing.assert_close(out, favor_attention_torch(q, k, v, projection, causal=True, feature_a=a))


@pytest.mark.parametrize("causal", [True, False])
def test_strided_inputs_are_read_in_place(causal):
    """q, k, v as attention modules make them ((B, L, H, D) memory seen as (B, H, L, D)) and as
    slices of one fused projection: the same attention and gradients as contiguous inputs, and
    the output laid out so that "b h l d -> b l (h d)" needs no copy."""
    q, k, v, projection = _inputs(length=40)
    expected = naive(q, k, v, projection, causal=causal)
    generator = torch.Generator().manual_seed(3)
    fused = torch.randn(2, 40, 3, 2, 16, generator=generator).to(DEVICE)  # (B, L, q/k/v, H, D)
    fused[:, :, 0], fused[:, :, 1], fused[:, :, 2] = (x.detach().transpose(1, 2) for x in (q, k, v))
    fused.requires_grad_()
    views = [fused[:, :, index].transpose(1, 2) for index in range(3)]  # (B, H, L, D), strided
    assert not any(view.is_contiguous() for view in views)
    out = favor_triton.favor_attention_triton(*views, projection, causal=causal, chunk_size=16)
    assert out.transpose(1, 2).is_contiguous()
    (grad,) = torch.autograd.grad((out * upstream(out)).sum(), fused)
    grads = tuple(grad[:, :, index].transpose(1, 2) for index in range(3))
    _assert_same((out.detach(), grads), expected)


@pytest.mark.parametrize("feature_map", ["favor+", "favor++"])
def test_a_model_computes_the_same_loss_and_gradients_through_the_kernels(monkeypatch, feature_map):
    """A seq2seq model as users build it (strided q, k, v from its projections, padded encoder
    inputs, causal decoder, cross-attention with Lq != Lk, FAVOR++ buffers): the kernels in place
    of the torch op give the same loss and parameter gradients."""
    from performer.attention import module
    from performer.config import preset
    from performer.models import PerformerSeq2Seq

    config = preset(
        "tiny", vocab_size=50, d_model=32, num_heads=2, nb_features=24, dropout=0.0, feature_map=feature_map,
        num_encoder_layers=1, num_decoder_layers=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = PerformerSeq2Seq(config).to(DEVICE)
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, 50, (2, 37), generator=generator)
    attention_mask = torch.ones(2, 37, dtype=torch.bool)
    attention_mask[1, 30:] = False
    labels = torch.randint(3, 50, (2, 21), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": labels, "labels": labels}
    batch = {key: value.to(DEVICE) for key, value in batch.items()}

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    monkeypatch.setenv(favor_triton.KERNEL_ENV, "torch")
    expected_loss, expected_grads = loss_and_grads()
    calls = []

    def kernels(*args, **kwargs):
        calls.append(kwargs.get("causal", args[5] if len(args) > 5 else False))
        return favor_triton.favor_attention_triton(*args, **kwargs)

    monkeypatch.setattr(module, "favor_attention", kernels)
    loss, grads = loss_and_grads()
    assert sorted(calls) == [False, False, True]  # encoder self, cross, decoder self
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(expected_grads)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("causal", [True, False])
def test_the_backward_recomputes_the_key_states_to_the_same_gradients(monkeypatch, causal):
    """Past KEPT_STATES_BYTES the backward recomputes the forward's key states: same gradients bitwise."""
    q, k, v, projection = _inputs(length=53)
    kept = _kernel(q, k, v, projection, causal=causal)
    monkeypatch.setattr(favor_triton, "KEPT_STATES_BYTES", 0)
    recomputed = _kernel(q, k, v, projection, causal=causal)
    for a, b in zip(kept[1], recomputed[1]):
        assert torch.equal(a, b)


def test_causality_is_exact():
    """Changing the keys and values of later tokens leaves every earlier output bitwise equal."""
    q, k, v, projection = _inputs(length=70)
    changed_k, changed_v = k.detach().clone(), v.detach().clone()
    changed_k[:, :, 41:] = torch.randn_like(changed_k[:, :, 41:]) * 3
    changed_v[:, :, 41:] = torch.randn_like(changed_v[:, :, 41:]) * 3
    before = favor_triton.favor_attention_triton(q, k, v, projection, causal=True, chunk_size=16)
    after = favor_triton.favor_attention_triton(q, changed_k, changed_v, projection, causal=True, chunk_size=16)
    assert torch.equal(before[:, :, :41], after[:, :, :41])
    assert not torch.equal(before[:, :, 41:], after[:, :, 41:])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("causal", [True, False])
def test_padded_keys_are_ignored_whatever_they_hold(causal):
    """NaN and inf in padded keys and values: same outputs bitwise, zero gradient for them."""
    q, k, v, projection = _inputs(length=40)
    key_padding = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    key_padding[0, 30:] = False
    key_padding[1, :5] = False
    clean = _kernel(q, k, v, projection, key_padding, causal)
    poisoned_k, poisoned_v = k.detach().clone(), v.detach().clone()
    poisoned_k[0, :, 30:], poisoned_v[0, :, 30:] = float("nan"), float("inf")
    poisoned_k[1, :, :5], poisoned_v[1, :, :5] = float("inf"), float("nan")
    poisoned_k.requires_grad_(), poisoned_v.requires_grad_()
    out, (dq, dk, dv) = _kernel(q, poisoned_k, poisoned_v, projection, key_padding, causal)
    assert torch.equal(out, clean[0]) and torch.equal(dq, clean[1][0])
    for grad in (dk, dv):
        assert torch.isfinite(grad).all()
        assert (grad[0, :, 30:] == 0).all() and (grad[1, :, :5] == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("causal", [True, False])
def test_centred_values_give_the_same_attention(causal):
    """The bf16 path centres the values on their mean over the real keys (plan.centre_values) so
    that bf16 rounding does not scale with their common part: the outputs and gradients are the
    naive twin's, with a large common part, NaN in padded values (left out of the mean) and a
    row with no real key (zero output)."""
    q, k, v, projection = _inputs(length=45)
    offset_v = (v.detach() + 30.0).requires_grad_()
    key_padding = torch.ones(2, 45, dtype=torch.bool, device=DEVICE)
    key_padding[0] = False
    key_padding[1, 38:] = False
    poisoned = offset_v.detach().clone()
    poisoned[1, :, 38:] = float("nan")
    poisoned.requires_grad_()
    got = _kernel(q, k, poisoned, projection, key_padding, causal, plan_changes={"centre_values": True})
    assert (got[0][0] == 0).all()
    # float32 loses ~5 digits to the common part in dq and dk either way (3e-5 of the largest
    # entry centred, 4-6e-5 not): hence atol 1e-4 here.
    _assert_same(got, naive(q, k, offset_v, projection, key_padding, causal), atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_a_query_without_keys_gets_zero(causal):
    """A row whose keys are all padding (and, causal, queries before the first real key): zero
    output, finite zero gradients, never NaN."""
    q, k, v, projection = _inputs(length=20)
    key_padding = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    key_padding[0] = False
    key_padding[1, :3] = False
    out, grads = _kernel(q, k, v, projection, key_padding, causal)
    assert (out[0] == 0).all()
    if causal:
        assert (out[1, :, :3] == 0).all() and (out[1, :, 3:] != 0).any()
    for grad in grads:
        assert torch.isfinite(grad).all()
    assert (grads[0][0] == 0).all()
    _assert_same((out, grads), naive(q, k, v, projection, key_padding, causal))


def test_errors_name_the_problem():
    q, k, v, projection = _inputs(length=8, key_length=9)
    with pytest.raises(ValueError, match="as many queries as keys"):
        favor_triton.favor_attention_triton(q, k, v, projection, causal=True)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        favor_triton.favor_attention_triton(q, k, v, projection, chunk_size=0)
    wide = torch.zeros(1, 1, 4, 160, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 128"):
        favor_triton.favor_attention_triton(wide, wide, wide, torch.zeros(8, 160, device=DEVICE))
    with pytest.raises(ValueError, match=r"one device, got q on .*, projection on meta.*\.to\(q\.device\)"):
        favor_triton.favor_attention_triton(q, k, v, projection.to("meta"))


def test_plan_limits(monkeypatch):
    """Chunks are powers of two in [16, 128] (larger (C, C) tiles were never compiled; float32 stops
    at 64); more chunks than a CUDA grid axis holds is a clear error, not a failed launch."""
    q, k, v, _ = _inputs(length=40)
    assert favor_triton.make_plan(q, k, v, 24, 256).chunk == favor_triton.MAX_FLOAT32_CHUNK == 64
    low = torch.empty(1, 1, 40, 16, dtype=torch.bfloat16, device="meta")
    assert favor_triton.make_plan(low, low, low, 24, 256).chunk == favor_triton.MAX_CHUNK == 128
    # The default chunk, per dtype and head dim (what the cubins for sm_90 allow without large spills).
    for dtype, head_dim, length, chunk in [
        (torch.bfloat16, 64, 16384, 64),
        (torch.bfloat16, 64, 32768, 128),
        (torch.bfloat16, 128, 65536, 64),
        (torch.float32, 64, 65536, 64),
        (torch.float32, 128, 4096, 32),
    ]:
        long = torch.empty(1, 1, length, head_dim, dtype=dtype, device="meta")
        assert favor_triton.make_plan(long, long, long, 256, None).chunk == chunk, (dtype, head_dim, length)
    assert favor_triton.make_plan(q, k, v, 24, 5).chunk == 16
    monkeypatch.setattr(favor_triton, "MAX_CHUNKS", 2)
    with pytest.raises(ValueError, match="a CUDA grid's limit: pass chunk_size=64"):
        favor_triton.make_plan(q, k, v, 24, 16)
    monkeypatch.setenv(favor_triton.PLAN_ENV, "c16w4")  # the chunk came from the environment: say so
    with pytest.raises(ValueError, match="a CUDA grid's limit: set c64 in PERFORMER_FAVOR_PLAN"):
        favor_triton.make_plan(q, k, v, 24, 64)
    with pytest.raises(ValueError, match="a CUDA grid's limit: set c64 in the plan 'c16'"):
        favor_triton.make_plan(q, k, v, 24, 64, plan="c16")
    monkeypatch.delenv(favor_triton.PLAN_ENV)
    longer = torch.empty(1, 1, 200, 16, device="meta")
    with pytest.raises(ValueError, match="beyond the kernels' grid in float32"):
        favor_triton.make_plan(longer, longer, longer, 24, 64)


def test_a_second_derivative_is_refused():
    """The backward's kernels are opaque to autograd: differentiating it again raises, never a wrong answer."""
    q, k, v, projection = _inputs(length=20)
    out = favor_triton.favor_attention_triton(q, k, v, projection, causal=True)
    (grad,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_dispatch(monkeypatch):
    """favor_attention takes the kernels for CUDA tensors only, unless PERFORMER_FAVOR_KERNEL=torch."""
    cpu = torch.zeros(1, 1, 4, 8)
    assert not favor_triton.use_triton(cpu)
    monkeypatch.setenv(favor_triton.KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="auto, torch or triton"):
        favor_triton.use_triton(cpu)
    if DEVICE == "cuda":
        monkeypatch.setenv(favor_triton.KERNEL_ENV, "torch")
        assert not favor_triton.use_triton(cpu.cuda())
        monkeypatch.setenv(favor_triton.KERNEL_ENV, "auto")
        assert favor_triton.use_triton(cpu.cuda())
    q, k, v, projection = _inputs(length=20)
    monkeypatch.setenv(favor_triton.KERNEL_ENV, "auto")
    torch.testing.assert_close(
        favor_attention(q, k, v, projection, causal=True),
        favor_triton.favor_attention_triton(q, k, v, projection, causal=True),
    )


def test_a_plan_set_in_the_environment_reaches_the_kernels_and_keeps_their_answer(monkeypatch):
    """PERFORMER_FAVOR_PLAN (a plan timed with benchmarks/attention.py) overrides what it names,
    the caller's chunk included, and computes what make_plan's plan computes."""
    q, k, v, projection = _inputs(length=45, nb_features=40)
    expected = _kernel(q, k, v, projection, causal=True, chunk_size=16)
    monkeypatch.setenv(favor_triton.PLAN_ENV, "c32w4s2m32")
    plan = favor_triton.make_plan(q, k, v, projection.shape[0], chunk_size=16)
    assert (plan.chunk, plan.num_warps, plan.num_stages, plan.block_m) == (32, 4, 2, 32)
    _assert_same(_kernel(q, k, v, projection, causal=True, chunk_size=16), expected)
    monkeypatch.setenv(favor_triton.PLAN_ENV, "w2")
    plan = favor_triton.make_plan(q, k, v, projection.shape[0], chunk_size=16)
    assert (plan.chunk, plan.num_warps, plan.block_m) == (16, 2, 16)  # the rest as make_plan has it
    # A plan given to make_plan (benchmarks/attention.py's @plans) replaces the environment's whole.
    plan = favor_triton.make_plan(q, k, v, projection.shape[0], chunk_size=16, plan="s2")
    assert (plan.chunk, plan.num_warps, plan.num_stages) == (16, 8, 2)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("c32w4x1", "letters with numbers"),
        ("w4w8", "each at most once"),
        ("w3", "num_warps must be a power of two"),
        ("m8", "block_m is at least 16"),
        ("s0", "num_stages and chunk at least 1"),
    ],
)
def test_a_bad_plan_in_the_environment_is_refused_by_name(monkeypatch, text, problem):
    q, k, v, projection = _inputs(length=8)
    monkeypatch.setenv(favor_triton.PLAN_ENV, text)
    with pytest.raises(ValueError, match=f"bad plan '{text}' in PERFORMER_FAVOR_PLAN.*{problem}"):
        favor_triton.favor_attention_triton(q, k, v, projection, causal=True)
