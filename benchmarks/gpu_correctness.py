"""FAVOR+ on CUDA against the CPU op, and a long bf16 step; part of gpu_check.sh.

    python benchmarks/gpu_correctness.py

1. The Triton kernels (float32 inputs) and the torch op on CUDA against the torch op on the CPU:
   values and gradients, causal / bidirectional / cross attention, padded keys, FAVOR+ and
   FAVOR++, head dims 64, 96 (masked columns) and 128, relative max error below 1e-4.
2. The Triton kernels with bf16 inputs (tensor cores, bf16 operands, float32 sums) against the
   CPU op in float32 on the same bf16-rounded inputs: relative max error below 2e-2 (bf16 keeps
   8 bits), reported for each tensor; and, for the record, the same with the logits from one
   bf16 part of the projection instead of two (what the split buys).
3. What the small cases cannot reach: bf16 at 40k causal tokens (the 128-token chunks long inputs
   get) against the float32 kernels; values with a large common part (v = 5 + noise: the
   backward's bf16 state operands must not lose the small differences); an upstream gradient
   that is a non-contiguous view (the same gradients as its contiguous copy, bit for bit).
4. A bf16 forward + backward of a causal decoder at 16384 tokens with large inputs: finite.
Exits non-zero and says which check failed.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from performer.attention.fused import favor_attention_torch  # noqa: E402
from performer.attention.triton import favor_attention_planned, favor_attention_triton, make_plan  # noqa: E402
from performer.feature_maps import favorpp_default_a, gaussian_orthogonal_projection  # noqa: E402
from performer.transformer import PerformerDecoder  # noqa: E402

FLOAT32_TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2


def _run(op, inputs, device, dtype, **kwargs):
    q, k, v, projection, keep, upstream = inputs
    leaves = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
    out = op(*leaves, projection.to(device), keep.to(device), **kwargs)
    grads = torch.autograd.grad(out, leaves, upstream.to(device, dtype))
    return [t.detach().float().cpu() for t in (out, *grads)]


def _inputs(length: int, key_length: int, head_dim: int = 64, batch: int = 2, heads: int = 4, value_offset=0.0):
    generator = torch.Generator().manual_seed(length + key_length + head_dim)
    q = torch.randn(batch, heads, length, head_dim, generator=generator)
    k = torch.randn(batch, heads, key_length, head_dim, generator=generator)
    v = torch.randn(batch, heads, key_length, head_dim, generator=generator) + value_offset
    keep = torch.rand(batch, key_length, generator=generator) > 0.1
    projection = gaussian_orthogonal_projection(256, head_dim, seed=0)
    upstream = torch.randn(batch, heads, length, head_dim, generator=generator)
    return q, k, v, projection, keep, upstream


def _bf16_representable(inputs):
    """The inputs with q, k, v and the upstream gradient rounded to bf16: a float32 reference then
    sees exactly what the bf16 kernels get, and the error measured is the kernels' own."""
    q, k, v, projection, keep, upstream = inputs
    q, k, v, upstream = (x.to(torch.bfloat16).float() for x in (q, k, v, upstream))
    return q, k, v, projection, keep, upstream


def _one_part_logits(q, k, v, projection, keep, causal, feature_a):
    plan = dataclasses.replace(make_plan(q, k, v, projection.shape[0], None), split_logits=False)
    return favor_attention_planned(q, k, v, projection, keep, causal, feature_a, plan)


def _worst(label: str, got: list, expected: list) -> float:
    worst = 0.0
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        error = ((a - b).abs().max() / b.abs().max()).item()
        worst = max(worst, error)
        print(f"{label} {name}: relative max error {error:.2e}")
    return worst


def compare_with_cpu() -> tuple[float, float]:
    """(worst float32 error of the CUDA paths, worst bf16 error of the kernels) over every case."""
    worst_float32 = worst_bf16 = 0.0
    cases = [
        ("causal", 1000, 1000, True, 64),
        ("bidirectional", 1000, 1000, False, 64),
        ("cross", 700, 1300, False, 64),
        ("causal", 1000, 1000, True, 96),
        ("causal", 1000, 1000, True, 128),
        ("cross", 700, 1300, False, 128),
    ]
    for name, length, key_length, causal, head_dim in cases:
        for feature_map, a in (("favor+", None), ("favor++", favorpp_default_a(head_dim))):
            label = f"{name} D={head_dim} {feature_map}"
            inputs = _inputs(length, key_length, head_dim)
            expected = _run(favor_attention_torch, inputs, "cpu", torch.float32, causal=causal, feature_a=a)
            kernels = _run(favor_attention_triton, inputs, "cuda", torch.float32, causal=causal, feature_a=a)
            torch_cuda = _run(favor_attention_torch, inputs, "cuda", torch.float32, causal=causal, feature_a=a)
            worst_float32 = max(worst_float32, _worst(f"{label} triton fp32", kernels, expected))
            worst_float32 = max(worst_float32, _worst(f"{label} torch-op cuda fp32", torch_cuda, expected))
            rounded = _bf16_representable(inputs)
            expected = _run(favor_attention_torch, rounded, "cpu", torch.float32, causal=causal, feature_a=a)
            low = _run(favor_attention_triton, rounded, "cuda", torch.bfloat16, causal=causal, feature_a=a)
            worst_bf16 = max(worst_bf16, _worst(f"{label} triton bf16", low, expected))
            # For the record, not checked: the same with one-part bf16 logits (what the split buys).
            _worst(
                f"{label} triton bf16, one-part logits",
                _run(_one_part_logits, rounded, "cuda", torch.bfloat16, causal=causal, feature_a=a),
                expected,
            )
    return worst_float32, worst_bf16


def long_offset_and_strided() -> tuple[float, bool]:
    """(worst bf16 error of the long and offset cases against float32 kernels, whether a strided
    upstream gives the contiguous one's gradients exactly)."""
    worst = 0.0
    for label, inputs in (
        ("causal bf16, 40960 tokens (chunks of 128)", _inputs(40960, 40960, batch=1, heads=2)),
        ("causal bf16, v = 5 + noise", _inputs(1000, 1000, value_offset=5.0)),
        ("bidirectional bf16, v = 5 + noise", _inputs(1000, 1000, value_offset=5.0)),
    ):
        causal = label.startswith("causal")
        rounded = _bf16_representable(inputs)
        expected = _run(favor_attention_triton, rounded, "cuda", torch.float32, causal=causal)
        low = _run(favor_attention_triton, rounded, "cuda", torch.bfloat16, causal=causal)
        worst = max(worst, _worst(label, low, expected))
    inputs = _inputs(1000, 1000)
    strided_upstream = inputs[-1].transpose(1, 2).contiguous().transpose(1, 2)  # same values, (B, L, H, D) memory
    contiguous = _run(favor_attention_triton, inputs, "cuda", torch.bfloat16, causal=True)
    strided = _run(favor_attention_triton, (*inputs[:-1], strided_upstream), "cuda", torch.bfloat16, causal=True)
    same = all(torch.equal(a, b) for a, b in zip(contiguous, strided))
    print(f"a non-contiguous upstream gradient gives the contiguous one's gradients bit for bit: {same}")
    return worst, same


def bf16_long_step(length: int = 16384) -> bool:
    decoder = PerformerDecoder(
        d_model=512, num_layers=2, num_heads=8, dropout=0.0, use_cross_attention=False, nb_features=256
    ).to("cuda", torch.bfloat16)
    x = (torch.randn(2, length, 512, device="cuda") * 10).to(torch.bfloat16).requires_grad_()
    out = decoder(x)
    out.float().square().mean().backward()
    finite = bool(torch.isfinite(out.float()).all() and torch.isfinite(x.grad.float()).all())
    finite &= all(torch.isfinite(p.grad.float()).all().item() for p in decoder.parameters() if p.grad is not None)
    print(f"bf16 causal decoder, 2 x {length} tokens, inputs x10: forward and gradients finite = {finite}")
    return finite


def main() -> int:
    worst_float32, worst_bf16 = compare_with_cpu()
    worst_long, strided_same = long_offset_and_strided()
    worst_bf16 = max(worst_bf16, worst_long)
    finite = bf16_long_step()
    failures = []
    if not strided_same:
        failures.append("a non-contiguous upstream gradient changed the gradients")
    if not worst_float32 < FLOAT32_TOLERANCE:
        failures.append(f"float32 on CUDA differs from the CPU op by {worst_float32:.2e} (limit {FLOAT32_TOLERANCE})")
    if not worst_bf16 < BF16_TOLERANCE:
        failures.append(f"bf16 kernels differ from float32 by {worst_bf16:.2e} (limit {BF16_TOLERANCE})")
    if not finite:
        failures.append("the long bf16 step produced a non-finite number")
    print("gpu correctness:", "ok" if not failures else "FAILED: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
