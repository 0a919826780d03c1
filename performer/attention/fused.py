"""FAVOR+ / FAVOR++ attention from q, k, v in one op: feature map fused in, hand-written backward.

Axis legend: B batch, H heads, G = B*H slices, L / Lq / Lk sequence, D head dim, M random
features, E = D + 1 rounded up to a multiple of 8 (values, a column of ones, zeros), N chunks, C chunk length.

Autograd through ``favor_features`` + ``causal_linear_attention`` keeps every intermediate of the
forward alive until the backward: the features phi(q), phi(k) (each 4x the size of q at M = 4D),
the per-chunk scores and the per-chunk prefix states. These ops save only q, k, v, the output and
the normaliser (O(L D) per slice) and recompute the rest in the backward, one group of slices at a
time, so memory grows linearly in L with a small constant and the working set stays in cache.

Two identities keep the kernels to plain batched matmuls:
* numerator and normaliser are one product: with V1 = [v, 1, 0...] (E columns), phi(q) S1 holds
  sum phi(q).phi(k) v in its first D columns and sum phi(q).phi(k) in column D;
* the gradient of the normalised output only needs dN = [dout / den, -(dout . out) / den]
  against those same E columns, so the backward is the forward's transpose on (phi, V1, dN).

Both feature maps are one op: FAVOR++ differs from FAVOR+ only through the constants of
``performer.feature_maps.feature_constants`` (the projection scaled by B for the logits, and the
query and key per-feature offsets), which also carry the backward (d phi / d u uses the same
scaled projection).

Values match the composition of the naive twins (``performer.attention.naive``) to float32
rounding; the tests compare both, values and gradients. Sums are in float32 whatever the input
dtype; outputs and gradients come back in the inputs' dtypes.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from performer.attention.favor import DENOMINATOR_FLOOR
from performer.feature_maps import feature_constants

# Per-group working set of the backward, in bytes: a few features-sized tensors of one group of
# slices. Small enough to stay near the caches, large enough that batched matmuls are not tiny.
GROUP_WORKING_SET_BYTES = 48 * 2**20
GPU_GROUP_BYTES = 4 * 2**30
# Up to this much, the forward keeps its features for the backward instead of recomputing them:
# at B=1, H=8, D=64, M=256 that is sequences up to ~8k tokens.
KEPT_OPERANDS_BYTES = 192 * 2**20


def default_chunk_size(nb_features: int) -> int:
    """Chunk length for causal FAVOR+ with M random features.

    Per token, the chunk-local part costs ~2C(M + E) flops and the cross-chunk part ~4ME whatever
    C, plus (L/C) M E of prefix states to write and read: small chunks mean fewer flops but more
    state traffic and smaller matmuls. Measured on CPU (fp32, one thread, forward + backward):
    with M=256, D=64, C=64 was fastest at every length from 512 to 16384 (C=32 and C=128 5-20%
    slower, C=256 up to 45%); with M=111, D=32, C=32 and C=64 were within 10%. On an H200 (bf16
    inputs) C=64 to 256 were within 15% (benchmarks/results/attention-gpu.md).
    """
    return 64 if nb_features >= 128 else 32


def _keeps_operands(slices: int, query_length: int, key_length: int, nb_features: int, head_dim: int) -> bool:
    """Whether the forward keeps features, scaled inputs and V1 for the backward (see KEPT_OPERANDS_BYTES)."""
    per_slice = 4 * ((query_length + key_length) * (nb_features + head_dim) + key_length * _value_width(head_dim))
    return slices * per_slice <= KEPT_OPERANDS_BYTES


def _slices_per_group(length: int, nb_features: int, head_dim: int, slices: int, device: torch.device) -> int:
    # Backward holds about four (L, M) tensors (features and their gradients) plus two prefix-state
    # tensors per slice. A GPU has no cache to fit: there the groups only bound peak memory.
    per_slice = 4 * length * (4 * nb_features + 2 * (head_dim + 1))
    budget = GROUP_WORKING_SET_BYTES if device.type == "cpu" else GPU_GROUP_BYTES
    return max(1, min(slices, budget // max(per_slice, 1)))


# ----------------------------------------------------------------------------- feature map


def _scaled(x: torch.Tensor) -> torch.Tensor:
    """x (G, L, D) in any float dtype -> x D^-1/4 in float32 (the FAVOR+ input scaling)."""
    return x.float() * x.shape[-1] ** -0.25


def _features(scaled: torch.Tensor, projection: torch.Tensor, offsets: torch.Tensor, is_query: bool) -> torch.Tensor:
    """phi of already-scaled inputs, computed in place: (G, L, D), (M, D), (M,) -> (G, L, M).

    projection: the logit projection; offsets: the query or the key offsets (``feature_constants``).
    Same formula as ``performer.feature_maps.favor_features`` (see there for the stabilisers).
    """
    exponent = scaled @ projection.T  # (G, L, M)
    exponent.sub_(0.5 * (scaled * scaled).sum(dim=-1, keepdim=True))
    if is_query:
        exponent.add_(offsets)
        exponent.sub_(exponent.amax(dim=-1, keepdim=True))
    else:
        exponent.sub_(offsets)
    return exponent.exp_().mul_(projection.shape[0] ** -0.5)


def _feature_input_grad(
    features_grad: torch.Tensor, features: torch.Tensor, scaled: torch.Tensor, projection: torch.Tensor
) -> torch.Tensor:
    """d loss / d x from d loss / d phi; overwrites features_grad. (G, L, M) x2, (G, L, D), (M, D) -> (G, L, D).

    phi = exp(u W^T - |u|^2 / 2 - c) / sqrt(M) with u = x D^-1/4 and W the logit projection (B W
    for FAVOR++), so with e = dphi * phi: du = e W - (sum_m e) u, and dx = du D^-1/4. The query
    max-shift is a per-query constant that cancels in the output, so it contributes no gradient.
    """
    weighted = features_grad.mul_(features)  # (G, L, M)
    grad = weighted @ projection  # (G, L, D)
    grad.sub_(weighted.sum(dim=-1, keepdim=True) * scaled)
    return grad.mul_(scaled.shape[-1] ** -0.25)


def _value_width(head_dim: int) -> int:
    """E: D value columns, the ones column, zeros up to a multiple of 8.

    Matmuls with a 65-wide operand ran at half the rate of 64- or 72-wide ones on CPU (MKL,
    fp32); the zero columns cost less than the odd width.
    """
    return -(-(head_dim + 1) // 8) * 8


def _with_ones(v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(G, L, D) -> (G, L, E) float32: the values, a ones column (index D), zero columns; padded keys zeroed."""
    head_dim = v.shape[-1]
    values = v.new_zeros(*v.shape[:-1], _value_width(head_dim), dtype=torch.float32)
    values[..., :head_dim] = v
    values[..., head_dim] = 1.0
    return values if keep is None else torch.where(keep, values, 0.0)


def _inverse_normaliser(denominator: torch.Tensor) -> torch.Tensor:
    """1 / den, and 0 where no key is visible (den below DENOMINATOR_FLOOR): (G, L) -> (G, L, 1)."""
    has_key = denominator > DENOMINATOR_FLOOR
    return torch.where(has_key, 1.0 / torch.where(has_key, denominator, 1.0), 0.0).unsqueeze(-1)


def _normalised(numerator: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, L, E) -> output (G, L, D) and normaliser (G, L); 0 output where no key is visible."""
    denominator = numerator[..., head_dim]
    return numerator[..., :head_dim] * _inverse_normaliser(denominator), denominator


def _output_grad(grad_out: torch.Tensor, out: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """dN = [dout / den, -(dout . out) / den, zeros] (G, L, E); zero where no key was visible."""
    inverse = _inverse_normaliser(denominator)
    head_dim = grad_out.shape[-1]
    grad = grad_out.new_zeros(*grad_out.shape[:-1], _value_width(head_dim), dtype=torch.float32)
    torch.mul(grad_out, inverse, out=grad[..., :head_dim])
    grad[..., head_dim] = -(grad_out.float() * out).sum(dim=-1) * inverse.squeeze(-1)
    return grad


def _slice_masks(key_keep: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """Key-keep mask (B, Lk) -> (B*H, Lk, 1), one row per (batch, head) slice."""
    return None if key_keep is None else key_keep.repeat_interleave(heads, dim=0)[:, :, None]


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[-2:])


# ----------------------------------------------------------------------------- chunk helpers


def _chunk_major(x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """(G, L, X) -> (N, G, C, X) contiguous, the tail zero-padded; unchanged when chunk is None.

    Chunks outermost, so that every per-chunk slice the prefix scan touches is contiguous and
    every batched matmul reads its operands without a copy. Padded tail keys carry zero values
    and come after every real query, so they reach only padded queries, which are cut off.
    """
    if chunk is None:
        return x
    slices, length, width = x.shape
    pad = -length % chunk
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(slices, -1, chunk, width).transpose(0, 1).contiguous()


def _sequence_major(x: torch.Tensor, length: int, chunk: int | None) -> torch.Tensor:
    """Inverse of ``_chunk_major``: (N, G, C, X) -> (G, L, X)."""
    if chunk is None:
        return x
    return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])[:, :length]


def _exclusive_scan(first: torch.Tensor, second: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Per chunk, the sum of first^T second over the chunks strictly before it (or strictly after
    it, ``reverse``): (N, G, C, X), (N, G, C, Y) -> (N, G, X, Y).

    Each chunk's product is written straight into its neighbour's slot (chunks are outermost, so
    the slots are contiguous), then summed by a loop of in-place adds over N, each vectorised
    over G*X*Y floats: torch.cumsum along a non-last dimension is strided and was several times
    slower when this was written, and a triangular matmul would cost N times the flops.
    """
    nb_chunks = first.shape[0]
    out = first.new_empty(nb_chunks, first.shape[1], first.shape[-1], second.shape[-1])
    if reverse:
        out[-1].zero_()
        torch.matmul(first[1:].transpose(-2, -1), second[1:], out=out[:-1])
    else:
        out[0].zero_()
        torch.matmul(first[:-1].transpose(-2, -1), second[:-1], out=out[1:])
    if first.device.type != "cpu":
        # On a GPU one cumsum kernel beats N launches of a small add.
        return out.flip(0).cumsum(0).flip(0) if reverse else out.cumsum(0)
    order = range(nb_chunks - 2, -1, -1) if reverse else range(1, nb_chunks)
    step = 1 if reverse else -1
    for index in order:
        out[index].add_(out[index + step])
    return out


def _tril_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a b^T kept on and below the diagonal: (N, G, C, X), (N, G, C, X) -> (N, G, C, C)."""
    return (a @ b.transpose(-2, -1)).tril_()


# ----------------------------------------------------------------------------- causal (chunk-major)


def _causal_forward(phi_q, phi_k, values):
    """Chunk-parallel causal numerator: (N, G, C, M), (N, G, C, M), (N, G, C, E) -> (N, G, C, E)."""
    numerator = _tril_scores(phi_q, phi_k) @ values  # inside each chunk
    prior = _exclusive_scan(phi_k, values)  # (N, G, M, E): keys of earlier chunks
    return numerator.add_(phi_q @ prior)


def _causal_backward(phi_q, phi_k, values, grad_numerator):
    """Gradients of the causal numerator w.r.t. phi(q), phi(k), V1 (all (N, G, C, .))."""
    prior = _exclusive_scan(phi_k, values)  # (N, G, M, E): keys of earlier chunks
    later = _exclusive_scan(phi_q, grad_numerator, reverse=True)  # queries of later chunks

    value_scores = _tril_scores(grad_numerator, values)  # (N, G, C, C): dN_i . V1_j for j <= i
    grad_q = (value_scores @ phi_k).add_(grad_numerator @ prior.transpose(-2, -1))
    grad_k = (value_scores.transpose(-2, -1) @ phi_q).add_(values @ later.transpose(-2, -1))
    del value_scores, prior
    grad_v = (_tril_scores(phi_q, phi_k).transpose(-2, -1) @ grad_numerator).add_(phi_k @ later)
    return grad_q, grad_k, grad_v


# ----------------------------------------------------------------------------- bidirectional


def _bidirectional_forward(phi_q, phi_k, values):
    """(G, Lq, M), (G, Lk, M), (G, Lk, E) -> (G, Lq, E)."""
    return phi_q @ (phi_k.transpose(-2, -1) @ values)


def _bidirectional_backward(phi_q, phi_k, values, grad_numerator):
    state = phi_k.transpose(-2, -1) @ values  # (G, M, E)
    query_grads = phi_q.transpose(-2, -1) @ grad_numerator  # (G, M, E)
    return grad_numerator @ state.transpose(-2, -1), values @ query_grads.transpose(-2, -1), phi_k @ query_grads


# ----------------------------------------------------------------------------- the op


def _group_operands(q, k, v, keep, constants, chunk):
    """Everything both passes need of one group of slices, in chunk-major layout when chunk is set.

    q: (G, Lq, D), k, v: (G, Lk, D), keep: (G, Lk, 1) bool or None; constants: the logit
    projection (M, D), query and key offsets (M,) of ``feature_constants``.
    Returns scaled q and k (., D), their features (., M), V1 (., E) and the key mask (., 1).
    """
    projection, query_offsets, key_offsets = constants
    scaled_q, scaled_k = _chunk_major(_scaled(q), chunk), _chunk_major(_scaled(k), chunk)
    phi_q = _features(scaled_q, projection, query_offsets, is_query=True)
    phi_k = _features(scaled_k, projection, key_offsets, is_query=False)
    values = _chunk_major(_with_ones(v, keep), chunk)
    if keep is not None:
        keep = _chunk_major(keep.float(), chunk) > 0.5  # the padded tail counts as padding
        phi_k = torch.where(keep, phi_k, 0.0)
    return scaled_q, scaled_k, phi_q, phi_k, values, keep


class _FavorAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, projection, feature_a, key_keep, causal, chunk):
        batch, heads, query_length, head_dim = q.shape
        key_length, nb_features = k.shape[2], projection.shape[0]
        constants = feature_constants(projection, feature_a)
        layout_chunk = chunk if causal else None
        flat_q, flat_k, flat_v = _flatten(q), _flatten(k), _flatten(v)
        slices = flat_q.shape[0]
        group = _slices_per_group(max(query_length, key_length), nb_features, head_dim, slices, q.device)
        out = torch.empty(slices, query_length, head_dim, dtype=torch.float32, device=q.device)
        denominator = torch.empty(slices, query_length, dtype=torch.float32, device=q.device)
        # Short sequences keep the features for the backward (recomputing them costs ~15% of the
        # op); long ones recompute them, so memory stays O(L D) per slice.
        kept_operands = [] if _keeps_operands(slices, query_length, key_length, nb_features, head_dim) else None
        slice_keep = _slice_masks(key_keep, heads)
        for start in range(0, slices, group):
            stop = min(start + group, slices)
            keep = None if slice_keep is None else slice_keep[start:stop]
            operands = _group_operands(
                flat_q[start:stop], flat_k[start:stop], flat_v[start:stop], keep, constants, layout_chunk
            )
            _, _, phi_q, phi_k, values, _ = operands
            if causal:
                numerator = _causal_forward(phi_q, phi_k, values)
            else:
                numerator = _bidirectional_forward(phi_q, phi_k, values)
            out[start:stop], denominator[start:stop] = _normalised(
                _sequence_major(numerator, query_length, layout_chunk), head_dim
            )
            if kept_operands is not None:
                kept_operands.append(operands)
            del operands, phi_q, phi_k, values, numerator
        ctx.save_for_backward(q, k, v, *constants, key_keep, out, denominator)
        ctx.layout_chunk, ctx.group, ctx.heads = layout_chunk, group, heads
        # Internal intermediates (never seen outside this op), so holding them on ctx is safe.
        ctx.kept_operands = kept_operands
        return out.reshape(batch, heads, query_length, head_dim).to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, projection, query_offsets, key_offsets, key_keep, out, denominator = ctx.saved_tensors
        constants = (projection, query_offsets, key_offsets)
        chunk = ctx.layout_chunk
        flat_q, flat_k, flat_v, flat_grad = _flatten(q), _flatten(k), _flatten(v), _flatten(grad_out)
        query_length, key_length = flat_q.shape[1], flat_k.shape[1]
        grad_q, grad_k, grad_v = torch.empty_like(flat_q), torch.empty_like(flat_k), torch.empty_like(flat_v)
        kept_operands, ctx.kept_operands = ctx.kept_operands, None
        slice_keep = _slice_masks(key_keep, ctx.heads) if kept_operands is None else None
        for index, start in enumerate(range(0, flat_q.shape[0], ctx.group)):
            stop = min(start + ctx.group, flat_q.shape[0])
            if kept_operands is not None:
                scaled_q, scaled_k, phi_q, phi_k, values, keep = kept_operands[index]
                kept_operands[index] = None  # freed as soon as this group is done
            else:
                scaled_q, scaled_k, phi_q, phi_k, values, keep = _group_operands(
                    flat_q[start:stop],
                    flat_k[start:stop],
                    flat_v[start:stop],
                    None if slice_keep is None else slice_keep[start:stop],
                    constants,
                    chunk,
                )
            grad_numerator = _chunk_major(
                _output_grad(flat_grad[start:stop], out[start:stop], denominator[start:stop]), chunk
            )
            if chunk is not None:
                phi_q_grad, phi_k_grad, values_grad = _causal_backward(phi_q, phi_k, values, grad_numerator)
            else:
                phi_q_grad, phi_k_grad, values_grad = _bidirectional_backward(phi_q, phi_k, values, grad_numerator)
            del values, grad_numerator
            query_grad = _feature_input_grad(phi_q_grad, phi_q, scaled_q, projection)
            key_grad = _feature_input_grad(phi_k_grad, phi_k, scaled_k, projection)
            value_grad = values_grad[..., : flat_v.shape[-1]]
            if keep is not None:
                # Padded keys may hold anything (even NaN); their gradient is exactly zero.
                key_grad, value_grad = torch.where(keep, key_grad, 0.0), torch.where(keep, value_grad, 0.0)
            grad_q[start:stop] = _sequence_major(query_grad, query_length, chunk)
            grad_k[start:stop] = _sequence_major(key_grad, key_length, chunk)
            grad_v[start:stop] = _sequence_major(value_grad, key_length, chunk)
        return grad_q.view_as(q), grad_k.view_as(k), grad_v.view_as(v), None, None, None, None, None


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    chunk_size: int | None = None,
    feature_a: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """FAVOR+ (feature_a None) or FAVOR++ (feature_a = its parameter A) attention, feature map fused in.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D) (any float dtype, q and k not yet scaled);
    projection: (M, D); key_padding_mask: (B, Lk) bool, True = real key; causal needs Lq == Lk;
    chunk_size: causal chunk length, None = the op's default; feature_a: a float or a 0-dim
    tensor (a buffer, never a statistic of this batch), not differentiated.
    Returns (B, H, Lq, D) in v's dtype; a query that sees no key gets zeros.

    CUDA tensors go to the Triton kernels (``performer.attention.triton``; the environment
    variable PERFORMER_FAVOR_KERNEL=torch keeps them on this module's op), everything else to
    ``favor_attention_torch``.
    """
    kernels = triton_kernels_for(q, k)
    if kernels is not None:
        return kernels.favor_attention_triton(q, k, v, projection, key_padding_mask, causal, chunk_size, feature_a)
    return favor_attention_torch(q, k, v, projection, key_padding_mask, causal, chunk_size, feature_a)


def triton_kernels_for(q: torch.Tensor, k: torch.Tensor):
    """``performer.attention.triton`` where ``favor_attention`` runs these inputs on its kernels
    (CUDA, not empty, triton importable and not switched off), else None: the torch op runs."""
    if not (q.is_cuda and q.numel() and k.numel()):
        return None
    kernels = _triton_op()
    return kernels if kernels is not None and kernels.use_triton(q) else None


def check_causal_lengths(q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
    """Causal attention pairs query i with keys up to i: it needs as many queries as keys."""
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal FAVOR+ needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")


@functools.cache
def _triton_op():
    """``performer.attention.triton``, or None where triton is missing or this module runs from an
    export's bundled remote code (exports carry the torch op only: their bundle is plain torch)."""
    if __name__ != "performer.attention.fused":
        return None
    try:
        return importlib.import_module("performer.attention.triton")
    except ImportError:
        return None


def favor_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    chunk_size: int | None = None,
    feature_a: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``favor_attention`` in this module's torch ops, on any device (chunk_size None = ``default_chunk_size``)."""
    check_causal_lengths(q, k, causal)
    chunk = chunk_size or default_chunk_size(projection.shape[0])
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _FavorAttention.apply(
        q, k, v, projection, feature_a, key_padding_mask, causal, min(chunk, max(q.shape[2], 1))
    )
