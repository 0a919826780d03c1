"""FAVOR+ random features for the softmax kernel (Choromanski et al., 2021).

Axis legend: B batch, H heads, L sequence, D head dim, M random features.

exp(q.k) = E_w[phi(q) . phi(k)] with phi(x)_i = exp(w_i.x - |x|^2 / 2) / sqrt(M) and w_i ~ N(0, I_D).
Rows of the projection come from blocks of D orthogonal directions (QR of a Gaussian matrix) with
chi(D)-distributed norms, so each row is still marginally N(0, I_D) but the rows are exactly
orthogonal within a block: lower variance than i.i.d. rows (the paper's Theorem 2).

Stabilisation without breaking exactness. The usual implementations subtract a max taken over the
keys of the whole sequence and then add an epsilon, so the constant no longer cancels and future
keys change past outputs. We use no data-dependent key stabiliser at all:

* keys:    exp(w_i.k - |k|^2/2 - c_i)     with c_i = |w_i|^2/2 - KEY_FEATURE_HEADROOM
* queries: exp(w_i.q - |q|^2/2 + c_i - s_q) with s_q the max over i of the exponent (one per query)

The per-feature constants c_i cancel inside every product phi(q)_i phi(k)_i, and s_q is one factor
per query that cancels between numerator and denominator. Because
w.k - |k|^2/2 - |w|^2/2 = -|k - w|^2/2 <= 0, every key feature is at most exp(headroom) whatever the
key, so nothing overflows in fp32, and a key's features depend on that key alone: causality and
padding invariance hold exactly, not just approximately. Key features only underflow when
|w_i|^2/2 - headroom exceeds ~87, i.e. for head dims above ~200.
"""

from __future__ import annotations

import hashlib
import math

import torch

# exp(30) ~ 1e13: leaves about 1e25 of fp32 range for sums over keys and values.
KEY_FEATURE_HEADROOM = 30.0


def default_nb_features(head_dim: int) -> int:
    """The Performer paper's choice, M = round(D ln D); at least 1."""
    return max(1, round(head_dim * math.log(head_dim))) if head_dim > 1 else 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers given (stable across processes)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def gaussian_orthogonal_projection(
    nb_features: int,
    head_dim: int,
    seed: int,
    orthogonal: bool = True,
) -> torch.Tensor:
    """(M, D) float32 projection drawn from an explicit generator seeded with ``seed``.

    Drawn on the CPU in float64 so that the same seed gives bitwise-equal projections in every
    process, whatever device the model lives on.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if not orthogonal:
        return torch.randn(nb_features, head_dim, generator=generator, dtype=torch.float64).float()
    blocks = []
    for _ in range(math.ceil(nb_features / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        # Sign fix makes the QR factor unique, hence Haar-distributed.
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        blocks.append(q.T)
    directions = torch.cat(blocks, dim=0)[:nb_features]  # (M, D), unit rows
    norms = torch.randn(nb_features, head_dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (directions * norms.unsqueeze(1)).float()


def key_feature_offsets(projection: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M,): the per-feature key constants c_i = |w_i|^2 / 2 - KEY_FEATURE_HEADROOM."""
    return 0.5 * (projection * projection).sum(dim=-1) - KEY_FEATURE_HEADROOM


def favor_features(x: torch.Tensor, projection: torch.Tensor, is_query: bool) -> torch.Tensor:
    """Positive random features phi(x) in float32.

    x: (..., L, D) queries or keys, any float dtype (already per-head, not yet scaled).
    projection: (M, D).
    Returns (..., L, M) float32. The D^-1/4 scaling of q and k is applied here.
    """
    head_dim = x.shape[-1]
    x = x.float() * head_dim**-0.25
    projection = projection.float()
    logits = x @ projection.T  # (..., L, M)
    half_sq_norm = 0.5 * (x * x).sum(dim=-1, keepdim=True)  # (..., L, 1)
    feature_offsets = key_feature_offsets(projection)  # (M,)
    nb_features = projection.shape[0]
    if is_query:
        exponent = logits - half_sq_norm + feature_offsets
        # One constant per query: cancels between numerator and denominator.
        exponent = exponent - exponent.amax(dim=-1, keepdim=True).detach()
    else:
        exponent = logits - half_sq_norm - feature_offsets
    return torch.exp(exponent) * nb_features**-0.5
