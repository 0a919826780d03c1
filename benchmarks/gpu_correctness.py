"""FAVOR+ on CUDA against the CPU op, and a long bf16 step; part of gpu_check.sh.

    python benchmarks/gpu_correctness.py

1. The Triton kernels (float32 inputs) and the torch op on CUDA against the torch op on the CPU:
   values and gradients, causal / bidirectional / cross attention, padded keys, FAVOR+ and
   FAVOR++, relative max error below 1e-4.
2. The Triton kernels with bf16 inputs (tensor cores, bf16 operands, float32 sums) against the
   CPU op in float32 on the same bf16-rounded inputs: relative max error below 2e-2 (bf16 keeps
   8 bits), reported for each tensor; and, for the record, the same with the logits from one
   bf16 part of the projection instead of two (what the split buys).
3. A bf16 forward + backward of a causal decoder at 16384 tokens with large inputs: finite.
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


def _inputs(length: int, key_length: int, head_dim: int = 64, scale: float = 1.0):
    generator = torch.Generator().manual_seed(length + key_length)
    q = torch.randn(2, 4, length, head_dim, generator=generator) * scale
    k, v = (torch.randn(2, 4, key_length, head_dim, generator=generator) * scale for _ in range(2))
    keep = torch.rand(2, key_length, generator=generator) > 0.1
    projection = gaussian_orthogonal_projection(256, head_dim, seed=0)
    upstream = torch.randn(2, 4, length, head_dim, generator=generator)
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
    cases = [("causal", 1000, 1000, True), ("bidirectional", 1000, 1000, False), ("cross", 700, 1300, False)]
    for name, length, key_length, causal in cases:
        for feature_map, a in (("favor+", None), ("favor++", favorpp_default_a(64))):
            label = f"{name} {feature_map}"
            inputs = _inputs(length, key_length)
            expected = _run(favor_attention_torch, inputs, "cpu", torch.float32, causal=causal, feature_a=a)
            kernels = _run(favor_attention_triton, inputs, "cuda", torch.float32, causal=causal, feature_a=a)
            torch_cuda = _run(favor_attention_torch, inputs, "cuda", torch.float32, causal=causal, feature_a=a)
            worst_float32 = max(worst_float32, _worst(f"{label} triton fp32", kernels, expected))
            worst_float32 = max(worst_float32, _worst(f"{label} torch-op cuda fp32", torch_cuda, expected))
            rounded = [x.to(torch.bfloat16).float() for x in inputs[:3]] + list(inputs[3:])
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
    finite = bf16_long_step()
    failures = []
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
