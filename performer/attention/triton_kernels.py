"""Triton kernels of FAVOR+ / FAVOR++ attention: the feature map inside, states in float32.

Axis legend: B batch, H heads, G = B*H slices (slice g = b H + h), L / Lq / Lk sequence, D head
dim (BLOCK_D: D rounded up to a power of two, at least 16), M random features (taken BLOCK_M at a
time), C chunk (block) length, N chunks, S splits of the chunks (programs that scan one part of
the sequence each).

The launches, the plan of block sizes and the autograd wiring are in ``performer.attention.triton``;
the maths is that of ``performer.attention.fused`` (read its docstring first). In short, with the
logit projection W already multiplied by D^-1/4 (so the inputs are used unscaled and exact):

* key features   phi_k = exp(k W^T - |k|^2 D^-1/2 / 2 - key_offsets) / sqrt(M), zero on padded keys;
* query features phi_q = exp(q W^T + query_offsets - shift_q) / sqrt(M), shift_q the query's own
  max over M (``query_shift_kernel``): a per-query constant that cancels in the output;
* states: H = sum phi_k^T v (M, D) and z = sum phi_k (M,) over keys; the output is
  (phi_q H) / (phi_q z), plus, when causal, the chunk's own keys through the masked C x C scores.

Every kernel computes the features it needs from q and k tile by tile (BLOCK_M features at a
time) and nothing of size L x M ever reaches memory. States are sums over chunks (``states_kernel``):
causal attention keeps, per chunk, the sum over the chunks before it (its "local" prefix within
the program's split of the sequence; the splits' totals are carried across by a short scan in
torch), bidirectional attention only the total. The backward runs the same kernel on the queries
(reverse scan, weighted by the output gradient) for the suffix states the key gradients need.

Precision: with bf16 inputs (DOT = bf16) every product of features, values and states runs on tensor
cores with bf16 operands and float32 accumulation, like the P V product of flash attention; the
logits, where exp() turns an absolute error into a relative one, use the projection split into
two bf16 parts (SPLIT: hi + lo, ~16 bits): the inputs themselves are exact in bf16. Otherwise
everything is float32 ("ieee" products, the CPU op's precision). Sums, states and normalisers
are float32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _operand(x, DOT: tl.constexpr):
    """A tl.dot operand in the plan's operand dtype DOT (bf16 on the bf16 path, else float32)."""
    return x.to(DOT)


@triton.jit
def _row_offsets(stride_b, stride_h, stride_l, slice_index, heads, rows, columns):
    """(scalar int64 base, (C, BLOCK_D) int32 offsets) of rows of slice ``slice_index`` (= b H + h)
    in a (B, H, L, width) tensor with strides (stride_b, stride_h, stride_l, 1): any layout with
    contiguous head dims, (B, L, H, D) views included. The first row's offset goes into the int64
    base, so the int32 part stays below C stride_l whatever the length."""
    first = tl.min(rows, axis=0)
    base = (slice_index // heads).to(tl.int64) * stride_b + (slice_index % heads).to(tl.int64) * stride_h
    base += first.to(tl.int64) * stride_l
    return base, (rows - first)[:, None] * stride_l + columns[None, :]


@triton.jit
def _load_rows(ptr, stride_b, stride_h, stride_l, slice_index, heads, rows, length, width, columns, DOT: tl.constexpr):
    """(C, BLOCK_D) tile of a (B, H, L, width) tensor (strides as ``_row_offsets``), zeros outside."""
    base, offsets = _row_offsets(stride_b, stride_h, stride_l, slice_index, heads, rows, columns)
    mask = (rows[:, None] >= 0) & (rows[:, None] < length) & (columns[None, :] < width)
    tile = tl.load(ptr + base + offsets, mask=mask, other=0.0)
    return _operand(tile, DOT)


@triton.jit
def _store_rows(ptr, stride_b, stride_h, stride_l, slice_index, heads, rows, length, width, columns, value):
    """Store the (C, BLOCK_D) tile ``value`` into rows of a (B, H, L, width) tensor, inside it only."""
    base, offsets = _row_offsets(stride_b, stride_h, stride_l, slice_index, heads, rows, columns)
    mask = (rows[:, None] >= 0) & (rows[:, None] < length) & (columns[None, :] < width)
    tl.store(ptr + base + offsets, value, mask=mask)


@triton.jit
def _load_row_values(ptr, slice_index, rows, length):
    """(C,) float32 entries of a (G, L) tensor, zeros outside."""
    mask = (rows >= 0) & (rows < length)
    return tl.load(ptr + slice_index.to(tl.int64) * length + rows, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _valid_keys(keep_ptr, slice_index, heads, rows, length, HAS_KEEP: tl.constexpr):
    """(C,) bool: the row is a key of the sequence and not padding (keep: (B, Lk) uint8, 1 = real)."""
    valid = (rows >= 0) & (rows < length)
    if HAS_KEEP:
        batch = (slice_index // heads).to(tl.int64)
        valid = valid & (tl.load(keep_ptr + batch * length + rows, mask=valid, other=0) != 0)
    return valid


@triton.jit
def _centre_row(centre_ptr, slice_index, D, columns):
    """(BLOCK_D,) float32 centre of slice ``slice_index`` from the (G, D) centres, zeros past D."""
    return tl.load(centre_ptr + slice_index.to(tl.int64) * D + columns, mask=columns < D, other=0.0)


@triton.jit
def _centred_values(
    v_ptr, stride_b, stride_h, stride_l, slice_index, heads, rows, length, D, columns, valid, centre_ptr,
    CENTRE: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """(C, BLOCK_D) v - centre in the operand dtype, zero for rows that are not valid keys.

    centre (G, D) float32 is one vector per slice, near the keys' mean: attention weights sum to
    one, so every output moves by the same vector and every gradient is unchanged, while the
    values, the states made of them and the backward's dout . (v_j - out_i) cancellations lose
    their common part before any bf16 rounding (with v = 5 + noise, bf16 feature gradients are
    off by ~8% uncentred, ~1% centred)."""
    v = _load_rows(v_ptr, stride_b, stride_h, stride_l, slice_index, heads, rows, length, D, columns, tl.float32)
    if CENTRE:
        v = v - _centre_row(centre_ptr, slice_index, D, columns)[None, :]
    return _operand(tl.where(valid[:, None], v, 0.0), DOT)


@triton.jit
def _half_square_norm(x, sq_scale):
    """(C,) |x|^2 D^-1/2 / 2 in float32 (sq_scale = D^-1/2 / 2)."""
    wide = x.to(tl.float32)
    return tl.sum(wide * wide, axis=1) * sq_scale


@triton.jit
def _feature_rows(ptr, features, columns, M, D):
    """(BLOCK_M, BLOCK_D) rows ``features`` of the (M, D) matrix at ptr (a projection, a state), zeros outside it."""
    mask = (features[:, None] < M) & (columns[None, :] < D)
    return tl.load(ptr + features[:, None] * D + columns[None, :], mask=mask, other=0.0)


@triton.jit
def _logits(
    x,
    w_hi_ptr,
    w_lo_ptr,
    features,
    columns,
    M,
    D,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(C, BLOCK_M) float32 x W^T for the features ``features`` (the projection (M, D) at w_hi (+ w_lo))."""
    weights = _feature_rows(w_hi_ptr, features, columns, M, D).to(x.dtype)
    logits = tl.dot(x, tl.trans(weights), input_precision=PRECISION)
    if SPLIT:
        low_part = _feature_rows(w_lo_ptr, features, columns, M, D).to(x.dtype)
        logits += tl.dot(x, tl.trans(low_part), input_precision=PRECISION)
    return logits


@triton.jit
def _features(
    x,
    row_constant,
    valid,
    w_hi_ptr,
    w_lo_ptr,
    offsets_ptr,
    features,
    columns,
    M,
    D,
    feature_scale,
    IS_QUERY: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(C, BLOCK_M) float32 features of the rows of x; zero on invalid rows and features >= M.

    row_constant (C,): each query's shift, or each key's |x|^2 D^-1/2 / 2. Queries:
    exp(x W^T + offsets - shift); keys: exp(x W^T - |x|^2 D^-1/2 / 2 - offsets); both times
    feature_scale = M^-1/2. ``where`` rather than a product, so that whatever a padded row
    holds (inf, NaN) cannot leak.
    """
    logits = _logits(x, w_hi_ptr, w_lo_ptr, features, columns, M, D, SPLIT, PRECISION)
    offsets = tl.load(offsets_ptr + features, mask=features < M, other=0.0)
    if IS_QUERY:
        exponent = logits + offsets[None, :] - row_constant[:, None]
    else:
        exponent = logits - row_constant[:, None] - offsets[None, :]
    keep = valid[:, None] & (features[None, :] < M)
    return tl.where(keep, tl.exp(exponent) * feature_scale, 0.0)


@triton.jit
def _state_rows(
    slice_index, chunk, nb_chunks, chunks_per_split, nb_splits, CAUSAL: tl.constexpr, REVERSE: tl.constexpr
):
    """Which states a chunk reads: its row of local (G*N rows) and of carry (G*S rows), int64.

    Causal: the chunk's prefix within its split plus the carry of the splits before it (after it,
    REVERSE). Bidirectional: only the carry, which then holds the total (one split).
    """
    if CAUSAL:
        if REVERSE:
            split = (nb_chunks - 1 - chunk) // chunks_per_split
        else:
            split = chunk // chunks_per_split
        local_row = slice_index.to(tl.int64) * nb_chunks + chunk
        carry_row = slice_index.to(tl.int64) * nb_splits + split
    else:
        local_row = slice_index.to(tl.int64)
        carry_row = slice_index.to(tl.int64)
    return local_row, carry_row


@triton.jit
def _state_matrix(local_ptr, carry_ptr, local_row, carry_row, features, columns, M, D, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_D) float32 state (sum of phi^T y) a chunk reads; zeros outside (M, D)."""
    tile = _feature_rows(carry_ptr + carry_row * M * D, features, columns, M, D)
    if CAUSAL:
        tile += _feature_rows(local_ptr + local_row * M * D, features, columns, M, D).to(tl.float32)
    return tile


@triton.jit
def _state_vector(local_ptr, carry_ptr, local_row, carry_row, features, M, CAUSAL: tl.constexpr):
    """(BLOCK_M,) float32 feature sum (sum of phi w) a chunk reads; zeros from M on."""
    mask = features < M
    tile = tl.load(carry_ptr + carry_row * M + features, mask=mask, other=0.0)
    if CAUSAL:
        tile += tl.load(local_ptr + local_row * M + features, mask=mask, other=0.0)
    return tile


# ----------------------------------------------------------------------------- kernels


@triton.jit
def query_shift_kernel(
    q_ptr,
    q_stride_b,
    q_stride_h,
    q_stride_l,
    w_hi_ptr,
    w_lo_ptr,
    offsets_ptr,
    shift_ptr,
    length,
    heads,
    D,
    M,
    C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """shift (G, Lq) = max over the M features of q W^T + query_offsets. Grid (G, cdiv(Lq, C))."""
    slice_index = tl.program_id(0)
    rows = tl.program_id(1) * C + tl.arange(0, C)
    columns = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, q_stride_b, q_stride_h, q_stride_l, slice_index, heads, rows, length, D, columns, DOT)
    shift = tl.full((C,), float("-inf"), tl.float32)
    for feature_start in range(0, M, BLOCK_M):
        features = feature_start + tl.arange(0, BLOCK_M)
        logits = _logits(q, w_hi_ptr, w_lo_ptr, features, columns, M, D, SPLIT, PRECISION)
        offsets = tl.load(offsets_ptr + features, mask=features < M, other=0.0)
        exponent = tl.where(features[None, :] < M, logits + offsets[None, :], float("-inf"))
        shift = tl.maximum(shift, tl.max(exponent, axis=1))
    tl.store(shift_ptr + slice_index.to(tl.int64) * length + rows, shift, mask=rows < length)


@triton.jit
def states_kernel(
    x_ptr,
    x_stride_b,
    x_stride_h,
    x_stride_l,
    shift_ptr,
    y_ptr,
    y_stride_b,
    y_stride_h,
    y_stride_l,
    weight_ptr,
    keep_ptr,
    centre_ptr,
    w_hi_ptr,
    w_lo_ptr,
    offsets_ptr,
    local_ptr,
    local_sum_ptr,
    total_ptr,
    total_sum_ptr,
    length,
    D,
    M,
    heads,
    nb_chunks,
    chunks_per_split,
    feature_scale,
    sq_scale,
    C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_QUERY: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    REVERSE: tl.constexpr,
    STORE_LOCAL: tl.constexpr,
    CENTRE: tl.constexpr,
    DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Sums over rows of phi(x)^T y (M, D) and phi(x) w (M,), one split of the chunks per program.

    Grid (G, cdiv(M, BLOCK_M), S). Forward: x = k, y = v, w = 1 (key states H, z). Backward:
    x = q (with its shift), y = dout / den, w = -(dout . out) / den, REVERSE (the queries' suffix
    states). STORE_LOCAL (causal): before each chunk, the sum over the split's chunks before it
    (after it, REVERSE) goes to local (G, N, M, D) / local_sum (G, N, M). Always: the split's
    total to total (G, S, M, D) / total_sum (G, S, M). CENTRE: y - centre (the keys' values,
    ``_centred_values``).
    """
    slice_index = tl.program_id(0)
    features = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    columns = tl.arange(0, BLOCK_D)
    state_mask = (features[:, None] < M) & (columns[None, :] < D)
    state_index = features[:, None] * D + columns[None, :]
    state = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    state_sum = tl.zeros((BLOCK_M,), tl.float32)
    for step in range(split * chunks_per_split, (split + 1) * chunks_per_split):
        if REVERSE:
            chunk = nb_chunks - 1 - step
        else:
            chunk = step
        if STORE_LOCAL:
            # Steps past the last chunk (the last split's tail) store nothing: no feature is below 0.
            stored_features = tl.where((chunk >= 0) & (chunk < nb_chunks), M, 0)
            local_base = (slice_index.to(tl.int64) * nb_chunks + chunk) * M
            tl.store(
                local_ptr + local_base * D + state_index, state, mask=state_mask & (features[:, None] < stored_features)
            )
            tl.store(local_sum_ptr + local_base + features, state_sum, mask=features < stored_features)
        rows = chunk * C + tl.arange(0, C)
        if IS_QUERY:
            valid = (rows >= 0) & (rows < length)
        else:
            valid = _valid_keys(keep_ptr, slice_index, heads, rows, length, HAS_KEEP)
        x = _load_rows(x_ptr, x_stride_b, x_stride_h, x_stride_l, slice_index, heads, rows, length, D, columns, DOT)
        if IS_QUERY:
            row_constant = _load_row_values(shift_ptr, slice_index, rows, length)
        else:
            row_constant = _half_square_norm(x, sq_scale)
        phi = _features(
            x, row_constant, valid, w_hi_ptr, w_lo_ptr, offsets_ptr,
            features, columns, M, D, feature_scale, IS_QUERY, SPLIT, PRECISION,
        )  # fmt: skip
        y = _centred_values(
            y_ptr, y_stride_b, y_stride_h, y_stride_l, slice_index, heads, rows, length, D, columns, valid,
            centre_ptr, CENTRE, DOT,
        )  # fmt: skip
        state += tl.dot(tl.trans(_operand(phi, DOT)), y, input_precision=PRECISION)
        if HAS_WEIGHT:
            weight = _load_row_values(weight_ptr, slice_index, rows, length)
            state_sum += tl.sum(phi * weight[:, None], axis=0)
        else:
            state_sum += tl.sum(phi, axis=0)
    total_base = (slice_index.to(tl.int64) * tl.num_programs(2) + split) * M
    tl.store(total_ptr + total_base * D + state_index, state, mask=state_mask)
    tl.store(total_sum_ptr + total_base + features, state_sum, mask=features < M)


@triton.jit
def output_kernel(
    q_ptr,
    q_stride_b,
    q_stride_h,
    q_stride_l,
    shift_ptr,
    k_ptr,
    k_stride_b,
    k_stride_h,
    k_stride_l,
    v_ptr,
    v_stride_b,
    v_stride_h,
    v_stride_l,
    keep_ptr,
    centre_ptr,
    w_hi_ptr,
    w_lo_ptr,
    query_offsets_ptr,
    key_offsets_ptr,
    local_ptr,
    local_sum_ptr,
    carry_ptr,
    carry_sum_ptr,
    out_ptr,
    out_stride_b,
    out_stride_h,
    out_stride_l,
    centred_out_ptr,
    centred_out_stride_b,
    centred_out_stride_h,
    centred_out_stride_l,
    denominator_ptr,
    query_length,
    key_length,
    D,
    M,
    heads,
    nb_chunks,
    chunks_per_split,
    nb_splits,
    feature_scale,
    sq_scale,
    denominator_floor,
    C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    CENTRE: tl.constexpr,
    DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out (G, Lq, D) = (phi_q H + scores v) / (phi_q z + sum scores), 0 where nothing is visible.

    Grid (G, cdiv(Lq, C)). Causal: H, z are the chunk's prefix states and scores the chunk's
    own masked phi_q phi_k^T (C, C); bidirectional: H, z are the totals and there are no scores.
    Also stores the normaliser (G, Lq) for the backward. CENTRE: H and v are of v - centre, out
    is centre + the quotient, and the quotient alone goes to centred_out (in the input dtype, for
    the backward's dout . out, which would otherwise carry bf16's error of |centre|).
    """
    slice_index = tl.program_id(0)
    chunk = tl.program_id(1)
    local_row, carry_row = _state_rows(slice_index, chunk, nb_chunks, chunks_per_split, nb_splits, CAUSAL, False)
    rows = chunk * C + tl.arange(0, C)
    columns = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, q_stride_b, q_stride_h, q_stride_l, slice_index, heads, rows, query_length, D, columns, DOT)
    shift = _load_row_values(shift_ptr, slice_index, rows, query_length)
    query_valid = rows < query_length
    numerator = tl.zeros((C, BLOCK_D), tl.float32)
    denominator = tl.zeros((C,), tl.float32)
    if CAUSAL:
        key_valid = _valid_keys(keep_ptr, slice_index, heads, rows, key_length, HAS_KEEP)
        k = _load_rows(k_ptr, k_stride_b, k_stride_h, k_stride_l, slice_index, heads, rows, key_length, D, columns, DOT)
        v = _centred_values(
            v_ptr, v_stride_b, v_stride_h, v_stride_l, slice_index, heads, rows, key_length, D, columns, key_valid,
            centre_ptr, CENTRE, DOT,
        )  # fmt: skip
        key_half_sq_norm = _half_square_norm(k, sq_scale)
        scores = tl.zeros((C, C), tl.float32)
    for feature_start in range(0, M, BLOCK_M):
        features = feature_start + tl.arange(0, BLOCK_M)
        phi_q = _features(
            q, shift, query_valid, w_hi_ptr, w_lo_ptr, query_offsets_ptr,
            features, columns, M, D, feature_scale, True, SPLIT, PRECISION,
        )  # fmt: skip
        state = _state_matrix(local_ptr, carry_ptr, local_row, carry_row, features, columns, M, D, CAUSAL)
        state_sum = _state_vector(local_sum_ptr, carry_sum_ptr, local_row, carry_row, features, M, CAUSAL)
        numerator += tl.dot(_operand(phi_q, DOT), _operand(state, DOT), input_precision=PRECISION)
        denominator += tl.sum(phi_q * state_sum[None, :], axis=1)
        if CAUSAL:
            phi_k = _features(
                k, key_half_sq_norm, key_valid, w_hi_ptr, w_lo_ptr, key_offsets_ptr,
                features, columns, M, D, feature_scale, False, SPLIT, PRECISION,
            )  # fmt: skip
            scores += tl.dot(_operand(phi_q, DOT), tl.trans(_operand(phi_k, DOT)), input_precision=PRECISION)
    if CAUSAL:
        scores = tl.where(rows[:, None] >= rows[None, :], scores, 0.0)
        numerator += tl.dot(_operand(scores, DOT), v, input_precision=PRECISION)
        denominator += tl.sum(scores, axis=1)
    has_key = denominator > denominator_floor
    inverse = tl.where(has_key, 1.0 / tl.where(has_key, denominator, 1.0), 0.0)
    quotient = numerator * inverse[:, None]
    if CENTRE:
        _store_rows(
            centred_out_ptr, centred_out_stride_b, centred_out_stride_h, centred_out_stride_l, slice_index, heads,
            rows, query_length, D, columns, quotient,
        )  # fmt: skip
        centre = _centre_row(centre_ptr, slice_index, D, columns)
        quotient = tl.where(has_key[:, None], quotient + centre[None, :], 0.0)
    _store_rows(
        out_ptr, out_stride_b, out_stride_h, out_stride_l, slice_index, heads, rows, query_length, D, columns,
        quotient,
    )  # fmt: skip
    tl.store(denominator_ptr + slice_index.to(tl.int64) * query_length + rows, denominator, mask=query_valid)


@triton.jit
def output_grad_kernel(
    grad_ptr,
    grad_stride_b,
    grad_stride_h,
    grad_stride_l,
    out_ptr,
    out_stride_b,
    out_stride_h,
    out_stride_l,
    denominator_ptr,
    value_grad_ptr,
    value_grad_stride_b,
    value_grad_stride_h,
    value_grad_stride_l,
    normaliser_grad_ptr,
    length,
    heads,
    D,
    denominator_floor,
    C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """What the backward kernels read of the output gradient, zero where no key was visible:
    value_grad (G, Lq, D) = dout / den and normaliser_grad (G, Lq) = -(dout . out) / den.
    Grid (G, cdiv(Lq, C)); float32 arithmetic whatever the dtypes stored.
    """
    slice_index = tl.program_id(0)
    rows = tl.program_id(1) * C + tl.arange(0, C)
    columns = tl.arange(0, BLOCK_D)
    grad = _load_rows(
        grad_ptr, grad_stride_b, grad_stride_h, grad_stride_l, slice_index, heads, rows, length, D, columns, tl.float32
    )
    out = _load_rows(
        out_ptr, out_stride_b, out_stride_h, out_stride_l, slice_index, heads, rows, length, D, columns, tl.float32
    )
    denominator = _load_row_values(denominator_ptr, slice_index, rows, length)
    has_key = denominator > denominator_floor
    inverse = tl.where(has_key, 1.0 / tl.where(has_key, denominator, 1.0), 0.0)
    _store_rows(
        value_grad_ptr, value_grad_stride_b, value_grad_stride_h, value_grad_stride_l, slice_index, heads, rows,
        length, D, columns, grad * inverse[:, None],
    )  # fmt: skip
    normaliser_grad = -tl.sum(grad * out, axis=1) * inverse
    tl.store(normaliser_grad_ptr + slice_index.to(tl.int64) * length + rows, normaliser_grad, mask=rows < length)


@triton.jit
def query_grad_kernel(
    q_ptr,
    q_stride_b,
    q_stride_h,
    q_stride_l,
    shift_ptr,
    k_ptr,
    k_stride_b,
    k_stride_h,
    k_stride_l,
    v_ptr,
    v_stride_b,
    v_stride_h,
    v_stride_l,
    keep_ptr,
    centre_ptr,
    value_grad_ptr,
    value_grad_stride_b,
    value_grad_stride_h,
    value_grad_stride_l,
    normaliser_grad_ptr,
    w_hi_ptr,
    w_lo_ptr,
    query_offsets_ptr,
    key_offsets_ptr,
    local_ptr,
    local_sum_ptr,
    carry_ptr,
    carry_sum_ptr,
    dq_ptr,
    dq_stride_b,
    dq_stride_h,
    dq_stride_l,
    query_length,
    key_length,
    D,
    M,
    heads,
    nb_chunks,
    chunks_per_split,
    nb_splits,
    feature_scale,
    sq_scale,
    C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    CENTRE: tl.constexpr,
    DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq (G, Lq, D) from the output-side gradients dN_v = dout / den (value_grad) and
    dN_1 = -(dout . out) / den (normaliser_grad). Grid (G, cdiv(Lq, C)).

    d phi_q = dN_v H^T + dN_1 z (+ causal: the chunk's masked (dN_v v^T + dN_1) phi_k), and
    dq = (d phi_q * phi_q) W. The query's own shift and the |q|^2 term of its features are
    per-query constants that cancel in the output, so they carry no gradient. CENTRE: v, H and
    out are centred (``_centred_values``), which leaves d phi_q unchanged.
    """
    slice_index = tl.program_id(0)
    chunk = tl.program_id(1)
    local_row, carry_row = _state_rows(slice_index, chunk, nb_chunks, chunks_per_split, nb_splits, CAUSAL, False)
    rows = chunk * C + tl.arange(0, C)
    columns = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, q_stride_b, q_stride_h, q_stride_l, slice_index, heads, rows, query_length, D, columns, DOT)
    shift = _load_row_values(shift_ptr, slice_index, rows, query_length)
    query_valid = rows < query_length
    value_grad = _load_rows(
        value_grad_ptr,
        value_grad_stride_b,
        value_grad_stride_h,
        value_grad_stride_l,
        slice_index,
        heads,
        rows,
        query_length,
        D,
        columns,
        DOT,
    )
    normaliser_grad = _load_row_values(normaliser_grad_ptr, slice_index, rows, query_length)
    input_grad = tl.zeros((C, BLOCK_D), tl.float32)
    if CAUSAL:
        key_valid = _valid_keys(keep_ptr, slice_index, heads, rows, key_length, HAS_KEEP)
        k = _load_rows(k_ptr, k_stride_b, k_stride_h, k_stride_l, slice_index, heads, rows, key_length, D, columns, DOT)
        v = _centred_values(
            v_ptr, v_stride_b, v_stride_h, v_stride_l, slice_index, heads, rows, key_length, D, columns, key_valid,
            centre_ptr, CENTRE, DOT,
        )  # fmt: skip
        key_half_sq_norm = _half_square_norm(k, sq_scale)
        # (C queries, C keys): dN_v_i . v_j + dN_1_i for j <= i.
        pair_grad = tl.dot(_operand(value_grad, DOT), tl.trans(v), input_precision=PRECISION)
        pair_grad = tl.where(rows[:, None] >= rows[None, :], pair_grad + normaliser_grad[:, None], 0.0)
    for feature_start in range(0, M, BLOCK_M):
        features = feature_start + tl.arange(0, BLOCK_M)
        phi_q = _features(
            q, shift, query_valid, w_hi_ptr, w_lo_ptr, query_offsets_ptr,
            features, columns, M, D, feature_scale, True, SPLIT, PRECISION,
        )  # fmt: skip
        state = _state_matrix(local_ptr, carry_ptr, local_row, carry_row, features, columns, M, D, CAUSAL)
        state_sum = _state_vector(local_sum_ptr, carry_sum_ptr, local_row, carry_row, features, M, CAUSAL)
        feature_grad = tl.dot(_operand(value_grad, DOT), tl.trans(_operand(state, DOT)), input_precision=PRECISION)
        feature_grad += normaliser_grad[:, None] * state_sum[None, :]
        if CAUSAL:
            phi_k = _features(
                k, key_half_sq_norm, key_valid, w_hi_ptr, w_lo_ptr, key_offsets_ptr,
                features, columns, M, D, feature_scale, False, SPLIT, PRECISION,
            )  # fmt: skip
            feature_grad += tl.dot(_operand(pair_grad, DOT), _operand(phi_k, DOT), input_precision=PRECISION)
        weights = _feature_rows(w_hi_ptr, features, columns, M, D)
        input_grad += tl.dot(_operand(feature_grad * phi_q, DOT), _operand(weights, DOT), input_precision=PRECISION)
    _store_rows(
        dq_ptr, dq_stride_b, dq_stride_h, dq_stride_l, slice_index, heads, rows, query_length, D, columns, input_grad
    )


@triton.jit
def key_value_grad_kernel(
    q_ptr,
    q_stride_b,
    q_stride_h,
    q_stride_l,
    shift_ptr,
    k_ptr,
    k_stride_b,
    k_stride_h,
    k_stride_l,
    v_ptr,
    v_stride_b,
    v_stride_h,
    v_stride_l,
    keep_ptr,
    centre_ptr,
    value_grad_ptr,
    value_grad_stride_b,
    value_grad_stride_h,
    value_grad_stride_l,
    normaliser_grad_ptr,
    w_hi_ptr,
    w_lo_ptr,
    query_offsets_ptr,
    key_offsets_ptr,
    local_ptr,
    local_sum_ptr,
    carry_ptr,
    carry_sum_ptr,
    dk_ptr,
    dk_stride_b,
    dk_stride_h,
    dk_stride_l,
    dv_ptr,
    dv_stride_b,
    dv_stride_h,
    dv_stride_l,
    query_length,
    key_length,
    D,
    M,
    heads,
    nb_chunks,
    chunks_per_split,
    nb_splits,
    feature_scale,
    sq_scale,
    C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    CENTRE: tl.constexpr,
    DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk, dv (G, Lk, D). Grid (G, cdiv(Lk, C)). The states here are the queries' (R, r): sums of
    phi_q^T dN_v and phi_q dN_1 over the later chunks (causal, a reverse scan) or all queries.

    d phi_k = v R^T + r (+ causal: the chunk's masked (v dN_v^T + dN_1) phi_q), dv = phi_k R
    (+ causal: the chunk's masked scores^T dN_v), and dk = (d phi_k * phi_k) W - sum_m(d phi_k *
    phi_k) k D^-1/2 (the |k|^2 term of the key features). Padded keys get exactly zero. CENTRE:
    v and out are centred (``_centred_values``), which leaves d phi_k and dv unchanged.
    """
    slice_index = tl.program_id(0)
    chunk = tl.program_id(1)
    local_row, carry_row = _state_rows(slice_index, chunk, nb_chunks, chunks_per_split, nb_splits, CAUSAL, True)
    rows = chunk * C + tl.arange(0, C)
    columns = tl.arange(0, BLOCK_D)
    key_valid = _valid_keys(keep_ptr, slice_index, heads, rows, key_length, HAS_KEEP)
    k = _load_rows(k_ptr, k_stride_b, k_stride_h, k_stride_l, slice_index, heads, rows, key_length, D, columns, DOT)
    v = _centred_values(
        v_ptr, v_stride_b, v_stride_h, v_stride_l, slice_index, heads, rows, key_length, D, columns, key_valid,
        centre_ptr, CENTRE, DOT,
    )  # fmt: skip
    key_half_sq_norm = _half_square_norm(k, sq_scale)
    input_grad = tl.zeros((C, BLOCK_D), tl.float32)
    weighted_sum = tl.zeros((C,), tl.float32)
    dv = tl.zeros((C, BLOCK_D), tl.float32)
    if CAUSAL:
        q = _load_rows(
            q_ptr, q_stride_b, q_stride_h, q_stride_l, slice_index, heads, rows, query_length, D, columns, DOT
        )
        shift = _load_row_values(shift_ptr, slice_index, rows, query_length)
        query_valid = rows < query_length
        value_grad = _load_rows(
            value_grad_ptr,
            value_grad_stride_b,
            value_grad_stride_h,
            value_grad_stride_l,
            slice_index,
            heads,
            rows,
            query_length,
            D,
            columns,
            DOT,
        )
        normaliser_grad = _load_row_values(normaliser_grad_ptr, slice_index, rows, query_length)
        # (C keys, C queries): v_j . dN_v_i + dN_1_i for i >= j.
        pair_grad = tl.dot(v, tl.trans(_operand(value_grad, DOT)), input_precision=PRECISION)
        later = rows[None, :] >= rows[:, None]
        pair_grad = tl.where(later, pair_grad + normaliser_grad[None, :], 0.0)
        transposed_scores = tl.zeros((C, C), tl.float32)
    for feature_start in range(0, M, BLOCK_M):
        features = feature_start + tl.arange(0, BLOCK_M)
        phi_k = _features(
            k, key_half_sq_norm, key_valid, w_hi_ptr, w_lo_ptr, key_offsets_ptr,
            features, columns, M, D, feature_scale, False, SPLIT, PRECISION,
        )  # fmt: skip
        state = _state_matrix(local_ptr, carry_ptr, local_row, carry_row, features, columns, M, D, CAUSAL)
        state_sum = _state_vector(local_sum_ptr, carry_sum_ptr, local_row, carry_row, features, M, CAUSAL)
        feature_grad = tl.dot(v, tl.trans(_operand(state, DOT)), input_precision=PRECISION)
        feature_grad += state_sum[None, :]
        dv += tl.dot(_operand(phi_k, DOT), _operand(state, DOT), input_precision=PRECISION)
        if CAUSAL:
            phi_q = _features(
                q, shift, query_valid, w_hi_ptr, w_lo_ptr, query_offsets_ptr,
                features, columns, M, D, feature_scale, True, SPLIT, PRECISION,
            )  # fmt: skip
            feature_grad += tl.dot(_operand(pair_grad, DOT), _operand(phi_q, DOT), input_precision=PRECISION)
            transposed_scores += tl.dot(_operand(phi_k, DOT), tl.trans(_operand(phi_q, DOT)), input_precision=PRECISION)
        weighted = feature_grad * phi_k
        weights = _feature_rows(w_hi_ptr, features, columns, M, D)
        input_grad += tl.dot(_operand(weighted, DOT), _operand(weights, DOT), input_precision=PRECISION)
        weighted_sum += tl.sum(weighted, axis=1)
    if CAUSAL:
        transposed_scores = tl.where(later, transposed_scores, 0.0)
        dv += tl.dot(_operand(transposed_scores, DOT), _operand(value_grad, DOT), input_precision=PRECISION)
    input_grad -= weighted_sum[:, None] * k.to(tl.float32) * (2.0 * sq_scale)
    _store_rows(
        dk_ptr, dk_stride_b, dk_stride_h, dk_stride_l, slice_index, heads, rows, key_length, D, columns,
        tl.where(key_valid[:, None], input_grad, 0.0),
    )  # fmt: skip
    _store_rows(
        dv_ptr, dv_stride_b, dv_stride_h, dv_stride_l, slice_index, heads, rows, key_length, D, columns,
        tl.where(key_valid[:, None], dv, 0.0),
    )  # fmt: skip
