"""The fused FAVOR+ op on CUDA against the same op on CPU, and a long bf16 step; part of gpu_check.sh.

    python benchmarks/gpu_correctness.py

Exits non-zero (and says which) if a CUDA value or gradient differs from the CPU one beyond
float32 rounding, or if a bf16 forward + backward at 16384 tokens with large inputs produces a
non-finite number.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from performer.attention.fused import favor_attention  # noqa: E402
from performer.feature_maps import gaussian_orthogonal_projection  # noqa: E402
from performer.transformer import PerformerDecoder  # noqa: E402


def compare_devices(causal: bool, length: int = 1000) -> float:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, length, 64, generator=generator) for _ in range(3))
    keep = torch.rand(2, length, generator=generator) > 0.1
    projection = gaussian_orthogonal_projection(256, 64, seed=0)
    upstream = torch.randn(2, 4, length, 64, generator=generator)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [x.to(device).requires_grad_() for x in (q, k, v)]
        out = favor_attention(*leaves, projection.to(device), keep.to(device), causal)
        grads = torch.autograd.grad(out, leaves, upstream.to(device))
        results.append([t.detach().cpu() for t in (out, *grads)])
    worst = 0.0
    for name, cpu, cuda in zip(("out", "dq", "dk", "dv"), *results):
        error = ((cuda - cpu).abs().max() / cpu.abs().max()).item()
        worst = max(worst, error)
        print(f"{'causal' if causal else 'bidirectional'} {name}: relative max error CUDA vs CPU {error:.2e}")
    return worst


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
    worst = max(compare_devices(causal=True), compare_devices(causal=False))
    finite = bf16_long_step()
    ok = worst < 1e-4 and finite
    print("gpu correctness:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
