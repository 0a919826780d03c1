"""The Triton kernels compile for a Hopper GPU (sm_90) and an A100 (sm_80) on this machine, GPU or
not, within each one's shared memory per block.

The interpreter the kernel tests use runs the Python of the kernels but does not compile them:
shapes that differ between branches, unsupported casts or tl.dot operand mismatches only show
when Triton lowers them. benchmarks/kernel_resources.py compiles every kernel variant a bf16
call launches (head dim 64) and reads their register use off the cubin. Hopper's tl.dot lowers
to wgmma, an A100's to mma: two different paths through the compiler.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_bf16_kernel_compiles(arch):
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "benchmarks/kernel_resources.py", "--quick", "--head-dims", "64", "--arch", str(arch)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    compiled = [line for line in done.stdout.splitlines() if line.startswith("kernel=")]
    assert len(compiled) == 11, done.stdout
    assert f"11 kernels compiled for sm_{arch}" in done.stdout
    assert f"fits in sm_{arch}'s" in done.stdout
