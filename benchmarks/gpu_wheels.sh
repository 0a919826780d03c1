#!/usr/bin/env bash
# Wheels the GPU machine lacks, for benchmarks/gpu_check.sh: run where PyPI is reachable, then carry
# .whl/ (ignored by git) to the GPU machine with the working tree. That machine's image has Python
# 3.12, torch, triton, pytest, einops, safetensors, sentencepiece, tensorboard, pyarrow, xxhash
# and mpi4py; this adds the trainer's (deepspeed and its pydantic and hjson, webdataset,
# zstandard) and the attention baseline's (flash-linear-attention). About 10 MB.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]     (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VERSION=${1:-3.12}
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$VERSION" --implementation cp \
    "${platforms[@]}" -d .whl \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    webdataset==1.0.2 braceexpand==0.1.7 zstandard==0.25.0 flash-linear-attention==0.6.0 fla-core==0.6.0
# DeepSpeed is published as a source archive only: build its pure-Python wheel here (its CUDA ops
# compile on first use, and the trainer uses none: torch's AdamW).
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
ls -l .whl
