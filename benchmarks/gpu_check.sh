#!/usr/bin/env bash
# The GPU check: one short run (a few minutes on one H100/H200) of what a CPU cannot show.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]      (default benchmarks/results)
#
# 1. the fused FAVOR+ op on CUDA equals the CPU op (values and gradients, padding included), and a
#    bf16 forward + backward at 16k tokens with large inputs stays finite (gpu_correctness.py);
# 2. attention alone, bf16, n = 1024 ... 65536: our causal / bidirectional FAVOR+ against
#    scaled_dot_product_attention (flash kernels), forward + backward, time and memory
#    (attention-gpu.{json,md,png});
# 3. a training step of the `medium` encoder-decoder (bf16 autocast, AdamW) at 4096 and 16384
#    encoder tokens, FAVOR+ against softmax attention: tokens/s and MFU against the bf16 matmul
#    rate measured in the same run (model_step-gpu.{json,md}).
# Needs only torch, einops and safetensors in the python3 it finds; installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${1:-benchmarks/results}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$RESULTS_DIR"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

"$PYTHON" benchmarks/gpu_correctness.py

"$PYTHON" benchmarks/attention.py --device cuda --dtype bf16 --name attention-gpu \
    --impls ours-causal,ours-causal@128,ours-causal@256,ours-bidirectional,sdpa-causal,sdpa --lengths 1024,4096,16384,65536 \
    --repeats 10 --budget-s 60
"$PYTHON" benchmarks/model_step.py --device cuda --dtype bf16 --preset medium --name model_step-gpu \
    --models ours,ours-softmax --lengths 4096,16384 --repeats 5 --budget-s 240

if [ "$RESULTS_DIR" != benchmarks/results ]; then
    cp benchmarks/results/attention-gpu.* benchmarks/results/model_step-gpu.* "$RESULTS_DIR"/
fi
