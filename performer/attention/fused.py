"""FAVOR+ attention from q, k, v in one op: feature map fused in, hand-written backward.

Axis legend: B batch, H heads, G = B*H slices, L / Lq / Lk sequence, D head dim, M random
features, E = D + 1 (values with a column of ones appended), N chunks, C chunk length.

Autograd through ``favor_features`` + ``causal_linear_attention`` keeps every intermediate of the
forward alive until the backward: the features phi(q), phi(k) (each 4x the size of q at M = 4D),
the per-chunk scores and the per-chunk prefix states. These ops save only q, k, v, the output and
the normaliser (O(L D) per slice) and recompute the rest in the backward, one group of slices at a
time, so memory grows linearly in L with a small constant and the working set stays in cache.

Two identities keep the kernels to plain batched matmuls:
* numerator and normaliser are one product: with V1 = [v, 1] (E columns), phi(q) S1 holds
  sum phi(q).phi(k) v in its first D columns and sum phi(q).phi(k) in the last one;
* the gradient of the normalised output only needs dN = [dout / den, -(dout . out) / den]
  against those same E columns, so the backward is the forward's transpose on (phi, V1, dN).

Values match the composition of the naive twins (``performer.attention.favor``) to float32
rounding; the tests compare both, values and gradients. Sums are in float32 whatever the input
dtype; outputs and gradients come back in the inputs' dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from performer.attention.favor import DENOMINATOR_FLOOR
from performer.feature_maps import KEY_FEATURE_HEADROOM

# Per-group working set of the backward, in bytes: a few features-sized tensors of one group of
# slices. Small enough to stay near the caches, large enough that batched matmuls are not tiny.
GROUP_WORKING_SET_BYTES = 48 * 2**20


def default_chunk_size(length: int, nb_features: int, head_dim: int) -> int:
    """Chunk length for causal FAVOR+ at (L, M, D).

    Per token, the chunk-local part costs ~2C(M + E) flops and the cross-chunk part ~4ME whatever
    C, plus (L/C) M E of prefix states to write and read. Small chunks mean fewer flops but more
    state traffic and smaller matmuls; measured on CPU (benchmarks/attention.py) 64 is best from
    a few thousand tokens on when M >= 128, and short sequences prefer one chunk per 32 tokens.
    """
    if length <= 256:
        return 32
    return 64 if nb_features >= 128 else 32


def _slices_per_group(length: int, nb_features: int, head_dim: int, slices: int) -> int:
    # Backward holds about four (L, M) tensors (features and their gradients) plus two prefix-state
    # tensors per slice.
    per_slice = 4 * length * (4 * nb_features + 2 * (head_dim + 1))
    return max(1, min(slices, GROUP_WORKING_SET_BYTES // max(per_slice, 1)))


# ----------------------------------------------------------------------------- feature map


def _scaled(x: torch.Tensor) -> torch.Tensor:
    """x (G, L, D) in any float dtype -> x D^-1/4 in float32 (the FAVOR+ input scaling)."""
    return x.float() * x.shape[-1] ** -0.25


def _features(scaled: torch.Tensor, projection: torch.Tensor, offsets: torch.Tensor, is_query: bool) -> torch.Tensor:
    """phi of already-scaled inputs, computed in place: (G, L, D), (M, D), (M,) -> (G, L, M).

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

    phi = exp(u w^T - |u|^2 / 2 - c) / sqrt(M) with u = x D^-1/4, so with e = dphi * phi:
    du = e W - (sum_m e) u, and dx = du D^-1/4. The query max-shift is a per-query constant that
    cancels in the output, so it contributes no gradient.
    """
    weighted = features_grad.mul_(features)  # (G, L, M)
    grad = weighted @ projection  # (G, L, D)
    grad.sub_(weighted.sum(dim=-1, keepdim=True) * scaled)
    return grad.mul_(scaled.shape[-1] ** -0.25)


def _with_ones(v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(G, L, D) -> (G, L, E) float32 values with a ones column; padded keys zeroed."""
    ones = torch.ones(*v.shape[:-1], 1, dtype=torch.float32, device=v.device)
    values = torch.cat([v.float(), ones], dim=-1)
    return values if keep is None else torch.where(keep, values, 0.0)


def _normalised(numerator: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, L, E) -> output (G, L, D) and normaliser (G, L); 0 output where no key is visible."""
    denominator = numerator[..., -1]
    has_key = denominator > DENOMINATOR_FLOOR
    inverse = torch.where(has_key, 1.0 / torch.where(has_key, denominator, 1.0), 0.0)
    return numerator[..., :-1] * inverse.unsqueeze(-1), denominator


def _output_grad(grad_out: torch.Tensor, out: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """dN = [dout / den, -(dout . out) / den] (G, L, E); zero where no key was visible."""
    has_key = denominator > DENOMINATOR_FLOOR
    inverse = torch.where(has_key, 1.0 / torch.where(has_key, denominator, 1.0), 0.0).unsqueeze(-1)
    grad_out = grad_out.float()
    return torch.cat([grad_out * inverse, -(grad_out * out).sum(dim=-1, keepdim=True) * inverse], dim=-1)


def _group_masks(key_keep: torch.Tensor | None, heads: int, start: int, stop: int) -> torch.Tensor | None:
    """Key-keep mask (B, Lk) -> (stop - start, Lk, 1) for slices start..stop of the (B*H) axis."""
    if key_keep is None:
        return None
    return key_keep.repeat_interleave(heads, dim=0)[start:stop, :, None]


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[-2:])


def _offsets(projection: torch.Tensor) -> torch.Tensor:
    """Per-feature key constant c_i = |w_i|^2 / 2 - headroom (see performer.feature_maps)."""
    return 0.5 * (projection * projection).sum(dim=-1) - KEY_FEATURE_HEADROOM


# ----------------------------------------------------------------------------- chunk helpers


def _chunked(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(G, L, X) -> (G, N, C, X), zero-padding the tail (zero features and values add nothing)."""
    length = x.shape[1]
    pad = -length % chunk
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(x.shape[0], -1, chunk, x.shape[-1])


def _unchunked(x: torch.Tensor, length: int) -> torch.Tensor:
    """(G, N, C, X) -> (G, L, X)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])[:, :length]


def _scan_(per_chunk: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """In place: per-chunk states (G, N, M, E) -> their inclusive prefix (or suffix) sums over chunks.

    A loop of in-place adds over N: torch.cumsum along a non-last dimension runs about 5x slower
    (11 ms against 2 ms for N=256, M=256, E=65 on CPU) and needs a second buffer, and a triangular
    matmul would cost N times the flops. The loop body is one vectorised add over M*E floats.
    """
    nb_chunks = per_chunk.shape[1]
    if reverse:
        for index in range(nb_chunks - 2, -1, -1):
            per_chunk[:, index].add_(per_chunk[:, index + 1])
    else:
        for index in range(1, nb_chunks):
            per_chunk[:, index].add_(per_chunk[:, index - 1])
    return per_chunk


def _tril_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a b^T kept on and below the diagonal: (G, N, C, X), (G, N, C, X) -> (G, N, C, C)."""
    return (a @ b.transpose(-2, -1)).tril_()


# ----------------------------------------------------------------------------- causal


def _causal_forward(phi_q, phi_k, values, chunk):
    """Chunk-parallel causal numerator: (G, L, M), (G, L, M), (G, L, E) -> (G, L, E)."""
    length = phi_q.shape[1]
    q_chunks, k_chunks, v_chunks = (_chunked(x, chunk) for x in (phi_q, phi_k, values))
    numerator = _tril_scores(q_chunks, k_chunks) @ v_chunks  # (G, N, C, E)
    # Keys of chunks 0..n summed; chunk n + 1 attends to them all.
    states_through = _scan_(k_chunks.transpose(-2, -1) @ v_chunks)  # (G, N, M, E)
    numerator[:, 1:] += q_chunks[:, 1:] @ states_through[:, :-1]
    return _unchunked(numerator, length)


def _causal_backward(phi_q, phi_k, values, grad_numerator, chunk):
    """Gradients of the causal numerator w.r.t. phi(q), phi(k), V1.

    (G, L, M) x2, (G, L, E) x2 -> (G, L, M), (G, L, M), (G, L, E).
    """
    length = phi_q.shape[1]
    q_chunks, k_chunks, v_chunks, dn_chunks = (_chunked(x, chunk) for x in (phi_q, phi_k, values, grad_numerator))
    # Keys of chunks 0..n, and queries' gradients of chunks n..N-1, summed.
    states_through = _scan_(k_chunks.transpose(-2, -1) @ v_chunks)  # (G, N, M, E)
    grads_from = _scan_(q_chunks.transpose(-2, -1) @ dn_chunks, reverse=True)  # (G, N, M, E)

    value_scores = _tril_scores(dn_chunks, v_chunks)  # (G, N, C, C): dN_i . V1_j for j <= i
    grad_q = value_scores @ k_chunks  # (G, N, C, M)
    grad_q[:, 1:] += dn_chunks[:, 1:] @ states_through[:, :-1].transpose(-2, -1)
    grad_k = value_scores.transpose(-2, -1) @ q_chunks
    del value_scores
    grad_k[:, :-1] += v_chunks[:, :-1] @ grads_from[:, 1:].transpose(-2, -1)
    grad_v = _tril_scores(q_chunks, k_chunks).transpose(-2, -1) @ dn_chunks  # (G, N, C, E)
    grad_v[:, :-1] += k_chunks[:, :-1] @ grads_from[:, 1:]
    return _unchunked(grad_q, length), _unchunked(grad_k, length), _unchunked(grad_v, length)


# ----------------------------------------------------------------------------- bidirectional


def _bidirectional_forward(phi_q, phi_k, values):
    """(G, Lq, M), (G, Lk, M), (G, Lk, E) -> (G, Lq, E)."""
    return phi_q @ (phi_k.transpose(-2, -1) @ values)


def _bidirectional_backward(phi_q, phi_k, values, grad_numerator):
    state = phi_k.transpose(-2, -1) @ values  # (G, M, E)
    query_grads = phi_q.transpose(-2, -1) @ grad_numerator  # (G, M, E)
    return grad_numerator @ state.transpose(-2, -1), values @ query_grads.transpose(-2, -1), phi_k @ query_grads


# ----------------------------------------------------------------------------- the op


class _FavorAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, projection, key_keep, causal, chunk):
        batch, heads, query_length, head_dim = q.shape
        key_length, nb_features = k.shape[2], projection.shape[0]
        projection = projection.float()
        offsets = _offsets(projection)
        flat_q, flat_k, flat_v = _flatten(q), _flatten(k), _flatten(v)
        slices = flat_q.shape[0]
        group = _slices_per_group(max(query_length, key_length), nb_features, head_dim, slices)
        out = torch.empty(slices, query_length, head_dim, dtype=torch.float32, device=q.device)
        denominator = torch.empty(slices, query_length, dtype=torch.float32, device=q.device)
        for start in range(0, slices, group):
            stop = min(start + group, slices)
            keep = _group_masks(key_keep, heads, start, stop)
            phi_q = _features(_scaled(flat_q[start:stop]), projection, offsets, is_query=True)
            phi_k = _features(_scaled(flat_k[start:stop]), projection, offsets, is_query=False)
            if keep is not None:
                phi_k = torch.where(keep, phi_k, 0.0)
            values = _with_ones(flat_v[start:stop], keep)
            if causal:
                numerator = _causal_forward(phi_q, phi_k, values, chunk)
            else:
                numerator = _bidirectional_forward(phi_q, phi_k, values)
            out[start:stop], denominator[start:stop] = _normalised(numerator)
        ctx.save_for_backward(q, k, v, projection, key_keep, out, denominator)
        ctx.causal, ctx.chunk, ctx.group, ctx.heads = causal, chunk, group, heads
        return out.reshape(batch, heads, query_length, head_dim).to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, projection, key_keep, out, denominator = ctx.saved_tensors
        offsets = _offsets(projection)
        flat_q, flat_k, flat_v = _flatten(q), _flatten(k), _flatten(v)
        flat_grad = _flatten(grad_out)
        grad_q, grad_k, grad_v = torch.empty_like(flat_q), torch.empty_like(flat_k), torch.empty_like(flat_v)
        for start in range(0, flat_q.shape[0], ctx.group):
            stop = min(start + ctx.group, flat_q.shape[0])
            keep = _group_masks(key_keep, ctx.heads, start, stop)
            scaled_q, scaled_k = _scaled(flat_q[start:stop]), _scaled(flat_k[start:stop])
            phi_q = _features(scaled_q, projection, offsets, is_query=True)
            phi_k = _features(scaled_k, projection, offsets, is_query=False)
            if keep is not None:
                phi_k = torch.where(keep, phi_k, 0.0)
            values = _with_ones(flat_v[start:stop], keep)
            grad_numerator = _output_grad(flat_grad[start:stop], out[start:stop], denominator[start:stop])
            if ctx.causal:
                phi_q_grad, phi_k_grad, values_grad = _causal_backward(phi_q, phi_k, values, grad_numerator, ctx.chunk)
            else:
                phi_q_grad, phi_k_grad, values_grad = _bidirectional_backward(phi_q, phi_k, values, grad_numerator)
            grad_q[start:stop] = _feature_input_grad(phi_q_grad, phi_q, scaled_q, projection)
            key_grad = _feature_input_grad(phi_k_grad, phi_k, scaled_k, projection)
            value_grad = values_grad[..., :-1]
            if keep is not None:
                # Padded keys may hold anything (even NaN); their gradient is exactly zero.
                key_grad, value_grad = torch.where(keep, key_grad, 0.0), torch.where(keep, value_grad, 0.0)
            grad_k[start:stop], grad_v[start:stop] = key_grad, value_grad
        return grad_q.view_as(q), grad_k.view_as(k), grad_v.view_as(v), None, None, None, None


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """FAVOR+ attention with the feature map fused in.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D) (any float dtype, q and k not yet scaled);
    projection: (M, D); key_padding_mask: (B, Lk) bool, True = real key; causal needs Lq == Lk;
    chunk_size: causal chunk length, None = ``default_chunk_size``.
    Returns (B, H, Lq, D) in v's dtype; a query that sees no key gets zeros.
    """
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal FAVOR+ needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    chunk = chunk_size or default_chunk_size(q.shape[2], projection.shape[0], q.shape[-1])
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _FavorAttention.apply(q, k, v, projection, key_padding_mask, causal, min(chunk, max(q.shape[2], 1)))
