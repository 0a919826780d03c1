"""benchmarks/kernel_resources.py's verdict on shared memory: a kernel that asks for more than a
block may have on the target architecture is named, since its launch would fail there."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import kernel_resources  # noqa: E402


def _row(kernel, dynamic_shared, shared=1024):
    return {"kernel": kernel, "D": 128, "dtype": "bf16", "shared": shared, "dynamic_shared": dynamic_shared}


def test_the_largest_kernel_is_held_against_the_architectures_block_limit():
    rows = [_row("output_kernel", 90_000), _row("key_value_grad_kernel", 120_000)]
    assert "key_value_grad_kernel at D=128 bf16" in kernel_resources.shared_memory_verdict(rows, 90)
    assert "fits in sm_90's 232448 bytes" in kernel_resources.shared_memory_verdict(rows, 90)
    assert "fits in sm_80's" in kernel_resources.shared_memory_verdict(rows, 80)
    # 121,024 bytes with the static part: over an RTX 40xx's 101,376.
    assert "121024 bytes" in kernel_resources.shared_memory_verdict(rows, 89)
    assert "DOES NOT FIT" in kernel_resources.shared_memory_verdict(rows, 89)
    assert "not known here" in kernel_resources.shared_memory_verdict(rows, 75)
