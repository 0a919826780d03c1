"""FAVOR+ / FAVOR++ attention on GPUs: the Triton kernels of ``triton_kernels`` behind
``favor_attention``'s signature, with the same guarantees as the CPU op.

Axis legend: B batch, H heads, G = B*H slices, L / Lq / Lk sequence, D head dim, M random
features, N chunks of C tokens, S splits of the chunks.

``performer.attention.fused.favor_attention`` dispatches here for CUDA tensors (see
``use_triton``); on the CPU it keeps its own op. The kernels run on the CPU too under Triton's
interpreter (``TRITON_INTERPRET=1`` set before triton is first imported; float32 only, slow):
that is how the tests check them without a GPU.

Forward: the queries' own max (``query_shift_kernel``), the keys' states (``states_kernel``:
per chunk for causal attention, totals for bidirectional), then the output (``output_kernel``).
Backward recomputes features and states instead of keeping them: the keys' states again (kept
from the forward when they are small, ``KEPT_STATES_BYTES``), dq (``query_grad_kernel``), the
queries' reverse states, then dk and dv (``key_value_grad_kernel``). What stays alive between
forward and backward is otherwise O(L D) per slice: q, k, v, the output, the normaliser and the
query shift. The largest temporary is one set of per-chunk states, N x M x D per slice (bf16 on
the bf16 path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from performer.attention import triton_kernels as kernels
from performer.attention.favor import DENOMINATOR_FLOOR
from performer.attention.fused import check_causal_lengths, favor_attention_torch
from performer.feature_maps import feature_constants

# The kernels hold (C, D) tiles of several operands: past 128 their float32 variants need more shared
# memory than an H100 has per block (benchmarks/results/kernel_resources.md). Wider heads use the torch op.
MAX_HEAD_DIM = 128
# Environment switch: "torch" keeps CUDA tensors on the torch op (benchmarks, debugging).
KERNEL_ENV = "PERFORMER_FAVOR_KERNEL"
# Environment switch: a plan for this GPU, e.g. "c64w4s2" (chunk 64, 4 warps, 2 stages; m: feature
# tile), as timed by benchmarks/attention.py (ours-causal@c64w4s2); letters left out keep make_plan's.
PLAN_ENV = "PERFORMER_FAVOR_PLAN"
PLAN_LETTERS = {"c": "chunk", "w": "num_warps", "s": "num_stages", "m": "block_m"}
# Programs a sequential scan over chunks is spread over when the device cannot say (interpreter).
INTERPRETER_SCAN_PROGRAMS = 8
# Up to this much, the forward's key states stay alive for the backward instead of being
# recomputed (a states kernel less): at B=1, H=8, D=64, M=256, C=64 that is up to ~16k causal
# tokens; bidirectional states (M x D per slice) always fit.
KEPT_STATES_BYTES = 64 * 2**20


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (on CPU tensors) rather than compiled.

    Decided when ``triton_kernels`` was imported (TRITON_INTERPRET=1 then makes triton.jit
    return interpreted functions), so it is read off the kernels, not the environment.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels.output_kernel, InterpretedFunction)


def use_triton(q: torch.Tensor) -> bool:
    """Whether ``favor_attention`` takes these kernels for q: CUDA, a supported head dim, not switched off."""
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"{KERNEL_ENV} must be auto, torch or triton, got {choice!r}")
    return choice != "torch" and q.is_cuda and q.shape[-1] <= MAX_HEAD_DIM


_TRITON_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclass(frozen=True)
class KernelPlan:
    """Block sizes and precision of one call; a pure function of the shapes, dtypes and device."""

    chunk: int
    """C: tokens per chunk (causal: the span of the masked C x C scores); a power of two >= 16."""
    block_m: int
    """Features per tile of the loops over M. 16 with 8 warps: the only tiling of those compiled for
    sm_90 (benchmarks/kernel_resources.py) where no kernel at head dim 64 spills registers."""
    block_d: int
    """D rounded up to a power of two, at least 16 (tl.dot's smallest tile)."""
    operand_dtype: torch.dtype
    """dtype of every tl.dot operand: bf16 (tensor cores) when q, k and v are all bf16, else float32."""
    split_logits: bool
    """Logits as x W_hi^T + x W_lo^T (W split into two operand_dtype parts); on with bf16 operands."""
    centre_values: bool
    """Values centred on their mean over the keys before any product (triton_kernels._centred_values);
    on with bf16 operands, whose rounding of states and outputs would otherwise scale with the
    values' common part. Costs one (G, Lq, D) centred output kept for the backward."""
    scan_programs: int
    """Programs a scan over the chunks is spread over (with the slices and feature tiles)."""
    num_warps: int
    num_stages: int

    @property
    def precision(self) -> str:
        # "ieee": float32 products are exact float32 (no TF32) on the float32 path.
        return "ieee" if self.operand_dtype == torch.float32 else "tf32"

    @property
    def state_dtype(self) -> torch.dtype:
        # Per-chunk states are tl.dot operands, read in operand_dtype anyway.
        return self.operand_dtype

    def compile_options(self) -> dict:
        return dict(
            C=self.chunk,
            BLOCK_M=self.block_m,
            BLOCK_D=self.block_d,
            DOT=_TRITON_DTYPES[self.operand_dtype],
            SPLIT=self.split_logits,
            CENTRE=self.centre_values,
            PRECISION=self.precision,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


def parse_plan(text: str, source: str = PLAN_ENV) -> dict[str, int]:
    """KernelPlan fields from a plan's short form: "c64w4s2" -> chunk 64, num_warps 4, num_stages 2
    ("m16": block_m); "" -> {}. Each letter at most once; warps and feature tiles powers of two."""
    return dict(_parsed_plan(text, source))


@functools.lru_cache(maxsize=64)
def _parsed_plan(text: str, source: str) -> tuple[tuple[str, int], ...]:
    # Cached: make_plan reads the environment's plan on every attention call.
    pairs = re.findall(r"([cwsm])(\d+)", text)
    letters = [letter for letter, _ in pairs]
    if "".join(f"{letter}{number}" for letter, number in pairs) != text or len(set(letters)) != len(letters):
        raise ValueError(
            f"bad plan {text!r} in {source}: write letters with numbers, each at most once: c (chunk), "
            "w (num_warps), s (num_stages), m (block_m), e.g. c64w4s2"
        )
    plan = {PLAN_LETTERS[letter]: int(number) for letter, number in pairs}
    for field in ("num_warps", "block_m"):
        value = plan.get(field)
        if value is not None and (value < 1 or value & (value - 1)):
            raise ValueError(f"bad plan {text!r} in {source}: {field} must be a power of two, got {value}")
    if plan.get("block_m", 16) < 16 or plan.get("num_stages", 1) < 1 or plan.get("chunk", 1) < 1:
        raise ValueError(f"bad plan {text!r} in {source}: block_m is at least 16, num_stages and chunk at least 1")
    return tuple(plan.items())


def _power_of_two_at_least(value: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(value, 1)))))


# C at most: the (C, C) score tiles of the causal kernels live in registers; 128 is the largest
# compiled for sm_90 and read off its cubins (benchmarks/kernel_resources.py --chunk 128). In
# float32, C=128 spills up to 17 kB per thread and at head dim 128 asks for 352 kB of shared
# memory, more than the 227 kB an H100/H200 block may have: float32 stops at 64.
MAX_CHUNK = 128
MAX_FLOAT32_CHUNK = 64
# CUDA grids have at most 65535 programs on their second axis, where the chunks are.
MAX_CHUNKS = 65535


def default_chunk(length: int, head_dim: int, low_precision: bool = True) -> int:
    """C when the caller sets none, read off the kernels' cubins for sm_90 (registers and spills
    from ``benchmarks/kernel_resources.py --chunk C``).

    bf16 (tensor cores): 64; 128 from 32k tokens on at head dims up to 64, where per-chunk states
    (N M D per slice) would otherwise outweigh q, k and v together (at C=128 the bf16 kernels
    spill at most 128 bytes at D=64, up to 1.2 kB at D=128).
    float32: 64 up to head dim 64 and 32 above it: at C=64 and D=128 ptxas gives the causal
    kernels 32 registers and 5-8 kB of spills (520-920 bytes at C=32)."""
    if low_precision:
        return 128 if length >= 32768 and head_dim <= 64 else 64
    return 64 if head_dim <= 64 else 32


def make_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    nb_features: int,
    chunk_size: int | None,
    plan: str | None = None,
) -> KernelPlan:
    """The plan for one call: ``default_chunk`` unless the caller sets chunk_size, 16 features per
    tile, 8 warps, bf16 operands for bf16 inputs. ``plan`` (short form, ``parse_plan``; None: the
    ``PERFORMER_FAVOR_PLAN`` environment variable) overrides what it names, chunk_size included."""
    length = max(q.shape[2], k.shape[2])
    low_precision = all(x.dtype == torch.bfloat16 for x in (q, k, v))
    source = PLAN_ENV if plan is None else f"the plan {plan!r}"
    chosen = parse_plan(os.environ.get(PLAN_ENV, "") if plan is None else plan, source)
    chunk_advice = f"set c{{}} in {source}" if "chunk" in chosen else "pass chunk_size={}"
    chunk_size = chosen.pop("chunk", chunk_size)
    largest_chunk = MAX_CHUNK if low_precision else MAX_FLOAT32_CHUNK
    if chunk_size:
        chunk = min(_power_of_two_at_least(chunk_size), largest_chunk)
    else:
        chunk = default_chunk(length, q.shape[-1], low_precision)
    if triton.cdiv(length, chunk) > MAX_CHUNKS:
        raise ValueError(
            f"{length} tokens in chunks of {chunk} make more than {MAX_CHUNKS} chunks, a CUDA grid's limit: "
            + chunk_advice.format(largest_chunk)
            if chunk < largest_chunk
            else f"{length} tokens is beyond the kernels' grid"
            + ("" if low_precision else " in float32 (bf16 inputs take chunks of 128: twice as many tokens)")
        )
    if q.is_cuda:
        scan_programs = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count
    else:
        scan_programs = INTERPRETER_SCAN_PROGRAMS
    defaults = KernelPlan(
        chunk=chunk,
        block_m=16,
        block_d=_power_of_two_at_least(q.shape[-1]),
        operand_dtype=torch.bfloat16 if low_precision else torch.float32,
        split_logits=low_precision,
        centre_values=low_precision,
        scan_programs=scan_programs,
        num_warps=8,
        # float32 operands: without software pipelining, so that the float32 kernels' tiles at
        # head dim 128 fit an H100's shared memory (they came within 3% of it pipelined).
        num_stages=3 if low_precision else 1,
    )
    return dataclasses.replace(defaults, **chosen)


@dataclass
class _Projection:
    """The feature map's constants as the kernels read them.

    logits: (M, D) logit projection times D^-1/4 (the kernels use q and k unscaled) in the
    operand dtype; with split logits its bf16 rounding, and ``logits_low`` the bf16 rounding of
    the remainder (otherwise the same tensor);
    query_offsets, key_offsets: (M,) float32 (``feature_constants``).
    """

    logits: torch.Tensor
    logits_low: torch.Tensor
    query_offsets: torch.Tensor
    key_offsets: torch.Tensor

    @classmethod
    def of(cls, projection: torch.Tensor, feature_a, head_dim: int, plan: KernelPlan) -> "_Projection":
        logit_projection, query_offsets, key_offsets = feature_constants(projection, feature_a)
        scaled = (logit_projection * head_dim**-0.25).contiguous()
        if plan.split_logits:
            high = scaled.to(torch.bfloat16).to(plan.operand_dtype)
            low = (scaled - high.float()).to(torch.bfloat16).to(plan.operand_dtype)
        else:
            high = low = scaled.to(plan.operand_dtype)
        return cls(high, low, query_offsets.contiguous(), key_offsets.contiguous())

    @property
    def nb_features(self) -> int:
        return self.logits.shape[0]


@dataclass
class _States:
    """What ``states_kernel`` leaves for the kernels that read it (see ``_state_rows``)."""

    local: torch.Tensor  # (G, N, M, D) causal; otherwise unused
    local_sum: torch.Tensor  # (G, N, M)
    carry: torch.Tensor  # (G, S, M, D) causal: sum over the splits before; otherwise (G, M, D) totals
    carry_sum: torch.Tensor  # (G, S, M) / (G, M)
    nb_chunks: int
    chunks_per_split: int
    nb_splits: int

    def args(self) -> tuple:
        return (self.local, self.local_sum, self.carry, self.carry_sum)

    def nbytes(self) -> int:
        tensors = {id(t): t for t in self.args()}.values()  # bidirectional: local is totals, not read
        return sum(t.numel() * t.element_size() for t in tensors)

    def sizes(self) -> tuple:
        return (self.nb_chunks, self.chunks_per_split, self.nb_splits)


def _exclusive_scan(totals: torch.Tensor) -> torch.Tensor:
    """Along dim 1 (the splits), the sum of the entries strictly before each."""
    shifted = totals[:, :-1].cumsum(1)
    return torch.cat([torch.zeros_like(totals[:, :1]), shifted], dim=1)


def _states(x, shift, y, weight, keep, centre, offsets, projection, plan, *, is_query, reverse, causal) -> _States:
    """sum phi(x)^T y and sum phi(x) w over rows: per chunk (causal, a scan; reverse = over later
    chunks) or in total. x, y: (B, H, L, D) in any layout ``_rows`` accepts; shift, weight: (G, L)
    or None; keep: (B, L) uint8 or None; centre: (G, D) float32 subtracted from y, or None."""
    batch, heads, length, head_dim = x.shape
    slices, nb_features = batch * heads, projection.nb_features
    nb_chunks = triton.cdiv(length, plan.chunk)
    feature_tiles = triton.cdiv(nb_features, plan.block_m)
    splits = max(1, min(nb_chunks, triton.cdiv(plan.scan_programs, slices * feature_tiles)))
    chunks_per_split = triton.cdiv(nb_chunks, splits)
    splits = triton.cdiv(nb_chunks, chunks_per_split)
    totals = x.new_empty((slices, splits, nb_features, head_dim), dtype=torch.float32)
    total_sums = x.new_empty((slices, splits, nb_features), dtype=torch.float32)
    if causal:
        local = x.new_empty((slices, nb_chunks, nb_features, head_dim), dtype=plan.state_dtype)
        local_sum = x.new_empty((slices, nb_chunks, nb_features), dtype=torch.float32)
    else:
        local, local_sum = totals, total_sums  # not read
    kernels.states_kernel[(slices, feature_tiles, splits)](
        *_rows(x), x if shift is None else shift, *_rows(y), x if weight is None else weight,
        x if keep is None else keep, x if centre is None else centre, projection.logits, projection.logits_low,
        offsets, local, local_sum, totals, total_sums,
        length, head_dim, nb_features, heads, nb_chunks, chunks_per_split, nb_features**-0.5, 0.5 * head_dim**-0.5,
        IS_QUERY=is_query, HAS_WEIGHT=weight is not None, HAS_KEEP=keep is not None, REVERSE=reverse,
        STORE_LOCAL=causal, **{**plan.compile_options(), "CENTRE": centre is not None},
    )  # fmt: skip
    if causal:
        # Splits are numbered in scan order (from the end when reverse): carry what came before.
        carry, carry_sum = _exclusive_scan(totals), _exclusive_scan(total_sums)
    else:
        carry, carry_sum = totals.sum(1), total_sums.sum(1)
    return _States(local, local_sum, carry, carry_sum, nb_chunks, chunks_per_split, splits)


def _value_centre(v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(G, D) float32: each slice's mean value over its real keys (0 without any); padded keys,
    whatever they hold, are left out."""
    batch, heads, _, head_dim = v.shape
    if keep is None:
        centre = v.mean(2, dtype=torch.float32)
    else:
        total = v.masked_fill(keep[:, None, :, None] == 0, 0).sum(2, dtype=torch.float32)
        centre = total / keep.sum(1, dtype=torch.float32).clamp(min=1)[:, None, None]
    return centre.reshape(batch * heads, head_dim).contiguous()


def _rows(x: torch.Tensor) -> tuple:
    """A (B, H, L, D) tensor as the kernels take it: the pointer and the batch, head and sequence
    strides (the head dim must be contiguous; any order of the other three works, so the (B, L, H, D)
    views attention modules make are read in place)."""
    return x, x.stride(0), x.stride(1), x.stride(2)


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernels can read it in place (a contiguous head dim), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_sequence_major(
    batch: int, heads: int, length: int, head_dim: int, like: torch.Tensor, dtype
) -> torch.Tensor:
    """An empty (B, H, L, D) tensor laid out as (B, L, H, D): "b h l d -> b l (h d)" is then a view."""
    return like.new_empty((batch, length, heads, head_dim), dtype=dtype).transpose(1, 2)


def _on_the_tensors_device(function):
    """Run ``function(ctx, tensor, ...)`` with ``tensor``'s GPU as the current device: Triton
    launches on the current device, so tensors on cuda:1 while cuda:0 is current would
    otherwise be read by kernels on the wrong GPU."""

    @functools.wraps(function)
    def on_device(ctx, tensor, *rest):
        with torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext():
            return function(ctx, tensor, *rest)

    return on_device


class _TritonFavorAttention(torch.autograd.Function):
    @staticmethod
    @_on_the_tensors_device
    def forward(ctx, q, k, v, projection, feature_a, key_keep, causal, plan):
        q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
        batch, heads, query_length, head_dim = q.shape
        key_length = k.shape[2]
        slices = batch * heads
        weights = _Projection.of(projection, feature_a, head_dim, plan)
        keep = None if key_keep is None else key_keep.expand(batch, key_length).to(torch.uint8).contiguous()
        options = plan.compile_options()
        query_blocks = triton.cdiv(query_length, plan.chunk)
        projection_args = (weights.logits, weights.logits_low)

        shift = q.new_empty((slices, query_length), dtype=torch.float32)
        kernels.query_shift_kernel[(slices, query_blocks)](
            *_rows(q), *projection_args, weights.query_offsets, shift,
            query_length, heads, head_dim, weights.nb_features, **options,
        )  # fmt: skip
        centre = _value_centre(v, keep) if plan.centre_values else None
        key_states = _states(
            k, None, v, None, keep, centre, weights.key_offsets, weights, plan,
            is_query=False, reverse=False, causal=causal,
        )  # fmt: skip
        out = _empty_sequence_major(batch, heads, query_length, head_dim, q, v.dtype)
        # What the backward reads as the output: the centred quotient, or the output itself.
        centred_out = (
            _empty_sequence_major(batch, heads, query_length, head_dim, q, v.dtype) if centre is not None else out
        )
        denominator = q.new_empty((slices, query_length), dtype=torch.float32)
        kernels.output_kernel[(slices, query_blocks)](
            *_rows(q), shift, *_rows(k), *_rows(v), q if keep is None else keep, q if centre is None else centre,
            *projection_args, weights.query_offsets, weights.key_offsets,
            *key_states.args(), *_rows(out), *_rows(centred_out), denominator,
            query_length, key_length, head_dim, weights.nb_features, heads, *key_states.sizes(),
            weights.nb_features**-0.5, 0.5 * head_dim**-0.5, DENOMINATOR_FLOOR,
            CAUSAL=causal, HAS_KEEP=keep is not None, **options,
        )  # fmt: skip
        ctx.save_for_backward(
            q, k, v, weights.logits, weights.logits_low, weights.query_offsets, weights.key_offsets,
            keep, centre, shift, centred_out, denominator,
        )  # fmt: skip
        ctx.plan, ctx.causal = plan, causal
        # Internal tensors nothing outside this op sees, so holding them on ctx is safe.
        ctx.key_states = key_states if key_states.nbytes() <= KEPT_STATES_BYTES else None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels are opaque to a second derivative
    @_on_the_tensors_device
    def backward(ctx, grad_out):
        q, k, v, logits, logits_low, query_offsets, key_offsets, keep, centre, shift, out, denominator = (
            ctx.saved_tensors
        )  # out: the centred output when the values were centred (the forward's centred_out)
        plan, causal = ctx.plan, ctx.causal
        weights = _Projection(logits, logits_low, query_offsets, key_offsets)
        batch, heads, query_length, head_dim = q.shape
        key_length, slices = k.shape[2], batch * heads
        grad_out = _kernel_layout(grad_out)
        options = plan.compile_options()
        projection_args = (weights.logits, weights.logits_low)
        sizes_args = (query_length, key_length, head_dim, weights.nb_features, heads)
        scale_args = (weights.nb_features**-0.5, 0.5 * head_dim**-0.5)
        keep_arg = q if keep is None else keep
        centre_arg = q if centre is None else centre

        # Gradients of the numerator's value columns and of the normaliser (fused.py's dN), in
        # one pass over dout and out: no float32 copy of either.
        value_grad = q.new_empty((batch, heads, query_length, head_dim), dtype=plan.state_dtype)
        normaliser_grad = q.new_empty((slices, query_length), dtype=torch.float32)
        kernels.output_grad_kernel[(slices, triton.cdiv(query_length, plan.chunk))](
            *_rows(grad_out), *_rows(out), denominator, *_rows(value_grad), normaliser_grad,
            query_length, heads, head_dim, DENOMINATOR_FLOOR,
            C=plan.chunk, BLOCK_D=plan.block_d, num_warps=plan.num_warps, num_stages=plan.num_stages,
        )  # fmt: skip

        dq = dk = dv = None
        key_states, ctx.key_states = ctx.key_states, None
        if ctx.needs_input_grad[0]:
            if key_states is None:
                key_states = _states(
                    k, None, v, None, keep, centre, weights.key_offsets, weights, plan, is_query=False,
                    reverse=False, causal=causal,
                )  # fmt: skip
            dq = torch.empty_like(q)
            kernels.query_grad_kernel[(slices, triton.cdiv(query_length, plan.chunk))](
                *_rows(q), shift, *_rows(k), *_rows(v), keep_arg, centre_arg, *_rows(value_grad), normaliser_grad,
                *projection_args, weights.query_offsets, weights.key_offsets,
                *key_states.args(), *_rows(dq), *sizes_args, *key_states.sizes(), *scale_args,
                CAUSAL=causal, HAS_KEEP=keep is not None, **options,
            )  # fmt: skip
            del key_states
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            query_states = _states(
                q, shift, value_grad, normaliser_grad, None, None, weights.query_offsets, weights, plan,
                is_query=True, reverse=True, causal=causal,
            )  # fmt: skip
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            kernels.key_value_grad_kernel[(slices, triton.cdiv(key_length, plan.chunk))](
                *_rows(q), shift, *_rows(k), *_rows(v), keep_arg, centre_arg, *_rows(value_grad), normaliser_grad,
                *projection_args, weights.query_offsets, weights.key_offsets,
                *query_states.args(), *_rows(dk), *_rows(dv), *sizes_args, *query_states.sizes(), *scale_args,
                CAUSAL=causal, HAS_KEEP=keep is not None, **options,
            )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None


def favor_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    chunk_size: int | None = None,
    feature_a: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``performer.attention.fused.favor_attention`` in Triton kernels: same arguments, shapes and guarantees.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D), CUDA tensors (CPU ones under TRITON_INTERPRET=1);
    projection: (M, D); key_padding_mask: (B, Lk) bool, True = real key; causal needs Lq == Lk;
    chunk_size: tokens per chunk, rounded up to a power of two in [16, 128] ([16, 64] in float32; None:
    ``default_chunk``);
    feature_a: FAVOR++'s A (a float or 0-dim tensor) or None for FAVOR+.
    bf16 q, k, v run on tensor cores (bf16 operands, float32 sums); any other dtype in float32.
    Returns (B, H, Lq, D) in v's dtype; a query that sees no key gets zeros.
    """
    check_causal_lengths(q, k, causal)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the Triton FAVOR+ kernels take head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if not (q.is_cuda or interpreting()):
        raise ValueError(
            "favor_attention_triton needs CUDA tensors; on the CPU use performer.attention.fused.favor_attention "
            "(or set TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's interpreter)"
        )
    tensors = {"q": q, "k": k, "v": v, "projection": projection, "key_padding_mask": key_padding_mask}
    devices = {name: x.device for name, x in tensors.items() if x is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(
            "favor_attention_triton needs every tensor on one device, got "
            + ", ".join(f"{name} on {device}" for name, device in devices.items())
            + ": move them with .to(q.device)"
        )
    if 0 in (q.shape[0], q.shape[1], q.shape[2], k.shape[2]):
        return favor_attention_torch(  # empty inputs: the torch op's answer
            q, k, v, projection, key_padding_mask, causal, chunk_size, feature_a
        )
    plan = make_plan(q, k, v, projection.shape[0], chunk_size)
    return favor_attention_planned(q, k, v, projection, key_padding_mask, causal, feature_a, plan)


def favor_attention_planned(q, k, v, projection, key_padding_mask, causal, feature_a, plan: KernelPlan) -> torch.Tensor:
    """``favor_attention_triton`` with the block sizes and precision given (tests try other plans)."""
    return _TritonFavorAttention.apply(q, k, v, projection, feature_a, key_padding_mask, causal, plan)
