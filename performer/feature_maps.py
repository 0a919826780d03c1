"""FAVOR+ and FAVOR++ random features for the softmax kernel.

Axis legend: B batch, H heads, L sequence, D head dim, M random features.

FAVOR+ (Choromanski et al., 2021): exp(q.k) = E_w[phi(q) . phi(k)] with
phi(x)_i = exp(w_i.x - |x|^2 / 2) / sqrt(M) and w_i ~ N(0, I_D).
Rows of the projection come from blocks of D orthogonal directions (QR of a Gaussian matrix) with
chi(D)-distributed norms, so each row is still marginally N(0, I_D) but the rows are exactly
orthogonal within a block: lower variance than i.i.d. rows (the paper's Theorem 2).

FAVOR++ (the optimised positive random features of "Chefs' Random Tables", Likhosherstov et al.,
NeurIPS 2022, arXiv 2205.15317, Theorems 3.1-3.3): the family

    f(w, x) = D0 exp(A |w|^2 + B w.x + C |x|^2),  w ~ N(0, I_D),

is positive, and unbiased for the softmax kernel, E_w[f(w, q) f(w, k)] = exp(q.k), when
A < 1/8 (finite variance), B = sqrt(1 - 4A), C = -1/2 and D0 = (1 - 4A)^(D/4): the Gaussian
integral E exp(2A|w|^2 + B w.(q + k)) = (1 - 4A)^(-D/2) exp(B^2 |q + k|^2 / (2 (1 - 4A))).
A = 0 is FAVOR+. The second moment is (1 - 4A)^D (1 - 8A)^(-D/2) exp(2 (1 - 4A) / (1 - 8A)
|q + k|^2 - |q|^2 - |k|^2); with rho = |q + k|^2 / D it is smallest at

    A*(rho) = (1 - 2 rho - sqrt((2 rho + 1)^2 + 8 rho)) / 16   (<= 0; 0 at rho = 0).

The paper computes rho from the current batch (the mean of |q_i + k_j|^2 over all pairs). We do
not: a statistic of the batch inside forward would let later keys change earlier outputs (the
causality guarantee), make a sequence's output depend on its padding and its neighbours in the
batch, and differ between ranks. A is a buffer of each attention, fixed between the trainer's
step boundaries like the projection: by default A*(2 / sqrt(D)), the optimum for q and k with
unit-variance entries after the D^-1/4 scaling (|q|^2 ~ |k|^2 ~ sqrt(D), q.k ~ 0, so
|q + k|^2 ~ 2 sqrt(D)): -0.131 at D = 32, -0.098 at D = 64, -0.072 at D = 128. A trainer may set
it at a step boundary from statistics it gathered and agreed on across ranks (``favorpp_rho``,
``Attention.calibrate_feature_map_``).

Stabilisation without breaking exactness. The usual implementations subtract a max taken over the
keys of the whole sequence and then add an epsilon, so the constant no longer cancels and future
keys change past outputs. We use no data-dependent key stabiliser at all. With u = x D^-1/4, the
logits use the projection scaled by B (B = 1 for FAVOR+), and with per-feature constants:

* keys:    exp(B w_i.u - |u|^2/2 - c_i + g)          with c_i = B^2 |w_i|^2 / 2 - KEY_FEATURE_HEADROOM
* queries: exp(B w_i.u - |u|^2/2 + c_i + 2A |w_i|^2 - s_q)   (c_i + 2A |w_i|^2 = |w_i|^2/2 - headroom)

with s_q the max over i of the exponent (one per query) and g = min(2 ln D0, SCALE_HEADROOM) (0
for FAVOR+). Every product phi(q)_i phi(k)_i is the paper's f(w_i, q) f(w_i, k) / M times
exp(-s_q) and the global exp(g - 2 ln D0): a per-query factor and a constant, both of which cancel
between numerator and denominator. Because B w.u - |u|^2/2 - B^2 |w|^2/2 = -|u - B w|^2/2 <= 0,
every key feature is at most exp(headroom + g) whatever the key, so nothing overflows in fp32,
and a key's features depend on that key alone: causality and padding invariance hold exactly,
not just approximately. The per-feature term 2A |w_i|^2 rides on the query side (the max shift
absorbs it). g keeps the paper's D0^2 on the key side, up to a cap, so FAVOR++ kernel estimates
keep FAVOR+'s scale: without it they would be (1 - 4A)^(-D/2) smaller (e^-16 at D = 128), close to
the normaliser's floor. Key features only underflow when B^2 |w_i|^2/2 - headroom - g exceeds
~87, i.e. from head dims of ~190 (FAVOR+) or ~160 (FAVOR++ at the default A) on. Both maps share
one limit below that: exp(-s_q) is about exp(headroom - max_i |w_i|^2 / 2), so from D ~ 128 on the
normaliser of a query that sees a single key (the first token of a causal sequence) can fall below
``favor.DENOMINATOR_FLOOR``, and that query then gets a zero output.
"""

from __future__ import annotations

import hashlib
import math

import torch

# exp(30) ~ 1e13: leaves about 1e25 of fp32 range for sums over keys and values.
KEY_FEATURE_HEADROOM = 30.0
# FAVOR++ keeps up to exp(20) ~ 5e8 of its constant D0^2 on the key side (see the module docstring).
SCALE_HEADROOM = 20.0

FEATURE_MAPS = ("favor+", "favor++")


def default_nb_features(head_dim: int) -> int:
    """The Performer paper's choice, M = round(D ln D); at least 1."""
    return max(1, round(head_dim * math.log(head_dim))) if head_dim > 1 else 1


# The fewest features the trainer gives a head when the config sets none. D ln D is 111 at head
# dim 32 and the tiny models trained with it end more than 5% above softmax at 1024 tokens; the
# number comes from benchmarks/parity.py (benchmarks/results/parity-cpu-*.md).
PRETRAINING_MIN_FEATURES = 256


def pretraining_nb_features(head_dim: int) -> int:
    """M for pretraining when none is given: max(256, round(D ln D)). The paper's D ln D from head
    dim 64 on (266 at 64); never fewer than 256 below it, where the estimate's variance, not the
    head dim, limits the loss."""
    return max(PRETRAINING_MIN_FEATURES, default_nb_features(head_dim))


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


# ----------------------------------------------------------------------------- FAVOR++ parameter


def favorpp_optimal_a(rho: float) -> float:
    """The variance-optimal A for rho = |q + k|^2 / D (q, k after the D^-1/4 scaling); <= 0."""
    if not rho >= 0.0 or math.isinf(rho):
        raise ValueError(f"rho = |q + k|^2 / D must be finite and >= 0, got {rho}")
    return (1.0 - 2.0 * rho - math.sqrt((2.0 * rho + 1.0) ** 2 + 8.0 * rho)) / 16.0


def favorpp_default_a(head_dim: int) -> float:
    """A for q and k with unit-variance entries: rho = 2 sqrt(D) / D = 2 / sqrt(D)."""
    return favorpp_optimal_a(2.0 / math.sqrt(head_dim))


def check_favorpp_a(a: float) -> float:
    """A as a float, or a clear error: finite and below 1/8 (the variance is infinite from 1/8 on)."""
    a = float(a)
    if not (math.isfinite(a) and a < 0.125):
        raise ValueError(f"the FAVOR++ parameter A must be finite and below 1/8, got {a}")
    return a


def favorpp_rho(q: torch.Tensor, k: torch.Tensor) -> float:
    """rho = mean over all pairs (i, j) of |q_i + k_j|^2 / D, q and k after the D^-1/4 scaling.

    q: (..., Lq, D), k: (..., Lk, D), unscaled, any float dtype; every leading index counts as
    more rows. O((Lq + Lk) D): mean |q|^2 + mean |k|^2 + 2 mean(q) . mean(k), divided by D. For a
    trainer's step-boundary calibration: agree on it across ranks before setting A.
    """
    head_dim = q.shape[-1]
    queries = q.detach().double().reshape(-1, head_dim) * head_dim**-0.25
    keys = k.detach().double().reshape(-1, head_dim) * head_dim**-0.25
    pair_mean = queries.square().sum(-1).mean() + keys.square().sum(-1).mean() + 2.0 * queries.mean(0) @ keys.mean(0)
    return float(pair_mean) / head_dim


# ----------------------------------------------------------------------------- features


def key_feature_offsets(projection: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M,): the per-feature key constants c_i = |w_i|^2 / 2 - KEY_FEATURE_HEADROOM."""
    return 0.5 * (projection * projection).sum(dim=-1) - KEY_FEATURE_HEADROOM


def feature_constants(
    projection: torch.Tensor, a: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The constants of the feature map, float32: (logit projection (M, D), query offsets (M,),
    key offsets (M,)).

    Features are exp(u W'^T - |u|^2/2 + query offsets - s_q) and exp(u W'^T - |u|^2/2 - key
    offsets), u = x D^-1/4. FAVOR+ (a None): W' = W and both offsets are c = |w|^2/2 - headroom.
    FAVOR++ (a = the parameter A, a float or a 0-dim tensor): W' = B W, query offsets
    |w|^2/2 - headroom, key offsets |B w|^2/2 - headroom - g (see the module docstring).
    Tensor ops only: no host sync, whatever device the projection is on.
    """
    projection = projection.float()
    offsets = key_feature_offsets(projection)
    if a is None:
        return projection, offsets, offsets
    scale_sq = 1.0 - 4.0 * torch.as_tensor(a, dtype=torch.float32, device=projection.device)
    scaled = projection * scale_sq.sqrt()
    kept_scale = (0.5 * projection.shape[-1] * scale_sq.log()).clamp(max=SCALE_HEADROOM)  # g
    return scaled, offsets, key_feature_offsets(scaled) - kept_scale


def favor_features(
    x: torch.Tensor, projection: torch.Tensor, is_query: bool, a: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Positive random features phi(x) in float32: FAVOR+ (a None) or FAVOR++ (a = its A).

    x: (..., L, D) queries or keys, any float dtype (already per-head, not yet scaled).
    projection: (M, D).
    Returns (..., L, M) float32. The D^-1/4 scaling of q and k is applied here.
    """
    head_dim = x.shape[-1]
    x = x.float() * head_dim**-0.25
    logit_projection, query_offsets, key_offsets = feature_constants(projection, a)
    logits = x @ logit_projection.T  # (..., L, M)
    half_sq_norm = 0.5 * (x * x).sum(dim=-1, keepdim=True)  # (..., L, 1)
    nb_features = projection.shape[0]
    if is_query:
        exponent = logits - half_sq_norm + query_offsets
        # One constant per query: cancels between numerator and denominator.
        exponent = exponent - exponent.amax(dim=-1, keepdim=True).detach()
    else:
        exponent = logits - half_sq_norm - key_offsets
    return torch.exp(exponent) * nb_features**-0.5
