#!/usr/bin/env bash
# The GPU check: what a CPU cannot show, in one command on one H100/H200.
#
#   bash benchmarks/gpu_wheels.sh                  # once, on a machine with PyPI: wheels into .whl/
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]     # on the GPU machine (PHASES picks the phases)
#
# Phases (PHASES="tests correctness attention model trainer" by default, about 7 minutes; "parity"
# is a second run of its own, about 5 minutes):
#   tests        the Triton kernels' tests compiled for this GPU (tests/model/test_triton_attention.py,
#                float32 against the naive twins; in CI they run in Triton's interpreter);
#   correctness  the kernels and the torch op on CUDA against the CPU op (float32), the bf16
#                kernels against float32, a long bf16 step (gpu_correctness.py);
#   attention    forward + backward time and memory, 1k to 128k tokens: our Triton kernels
#                (causal, bidirectional, and causal with one-part bf16 logits: what the split
#                costs), the torch op they replace, flash SDPA (causal and not)
#                and flash-linear-attention's chunk_linear_attn on our features; B1 H8 D64 M256
#                (attention-gpu) and B4 H16 D128 M256 (attention-gpu-wide);
#   model        a `medium` training step at 4k / 16k / 64k tokens: FAVOR+ (Triton), FAVOR+ (torch
#                op), softmax; tokens/s, MFU, memory (model_step-gpu);
#   trainer      deepspeed --num_gpus 1 with configs/medium.yaml, bf16, ZeRO-2 on NCCL: tokens/s,
#                MFU, checkpoint, resume, export, bucket sizes (trainer-gpu; needs --data's
#                prepared corpus: runs/data, carried or made by `performer data prepare`);
#   tune         (not in the default run, about 3-4 minutes) the causal and bidirectional kernels
#                under other plans at B1 H8 D64 M256 bf16, 1k / 16k / 64k tokens: chunk 32 / 64 /
#                128, 4 or 8 warps, 2 to 4 pipeline stages (attention-tune-gpu: the fastest plan
#                per length against make_plan's; the defaults' explicit twins, c64w8s3 below 32k
#                tokens and c128w8s3 from 32k on, give the noise; 450 s at most);
#   parity       learning parity with 3 seeds, softmax against FAVOR++ (the trainer's feature map)
#                at M = 111 (round(D ln D) at head dim 32), 256 and 512, tiny LM and seq2seq at 1024
#                tokens (parity-seeds-gpu): the seeds' spread around the one-seed CPU run that chose
#                the default M (parity-cpu-*; the target: within 5% of softmax).
# Results go to benchmarks/results/*-gpu*; with RESULTS_DIR the files this run wrote are also
# packed into RESULTS_DIR/gpu-results.tar.gz beside the log (gpu_check.log) after every phase, so
# that a run stopped from outside still returns what its finished phases measured (and never the
# committed results of an earlier run). Each phase has PHASE_TIMEOUT_S seconds (default 300): a
# hung one does not take the rest.
# Packages the GPU machine lacks (deepspeed, webdataset, flash-linear-attention...) are installed
# from .whl/ when it is there (gpu_wheels.sh); nothing is fetched.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${1:-}
PHASES=${PHASES:-"tests correctness attention model trainer"}
PYTHON=${PYTHON:-python3}
DATA=${DATA:-runs/data}
PHASE_TIMEOUT_S=${PHASE_TIMEOUT_S:-300}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG=${RESULTS_DIR:+$RESULTS_DIR/gpu_check.log}
LOG=${LOG:-benchmarks/results/gpu_check.log}
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1

STAMP=$(mktemp)  # results files newer than this one are this run's
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .whl/*.whl ||
        echo "WARNING: installing .whl/ failed: the trainer phase (deepspeed) and fla-causal may fail"
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu-site"
else
    echo "WARNING: no .whl/ (run benchmarks/gpu_wheels.sh and carry .whl): deepspeed, webdataset and fla come only from the machine"
fi
if [[ " $PHASES " == *" trainer "* || " $PHASES " == *" parity "* ]] && [ ! -f "$DATA/train/manifest.json" ]; then
    echo "WARNING: no prepared corpus at $DATA (carry runs/data, or set DATA): the trainer and parity phases will fail"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

pack() {  # this run's results so far into RESULTS_DIR/gpu-results.tar.gz
    [ -n "$RESULTS_DIR" ] || return 0
    local files
    mapfile -t files < <(find benchmarks/results -name '*-gpu*' -newer "$STAMP" -type f | sort)
    [ ${#files[@]} -gt 0 ] && tar czf "$RESULTS_DIR/gpu-results.tar.gz" "${files[@]}"
    return 0
}

failed=()
phase() {  # phase NAME COMMAND...: run it (at most PHASE_TIMEOUT_S), time it, pack, remember a failure and go on
    local name=$1 started=$SECONDS
    shift
    echo "=== $name"
    timeout --kill-after=10 "$PHASE_TIMEOUT_S" "$@" || failed+=("$name")
    echo "=== $name: $((SECONDS - started)) s"
    pack
}

for name in $PHASES; do
    case $name in
    tests) phase tests "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/model/test_triton_attention.py ;;
    correctness) phase correctness "$PYTHON" benchmarks/gpu_correctness.py ;;
    attention)
        phase attention "$PYTHON" benchmarks/attention.py --device cuda --dtype bf16 --name attention-gpu \
            --impls ours-causal,ours-bidirectional,ours-torch-causal,ours-causal-bf16-logits,sdpa-causal,sdpa,fla-causal \
            --lengths 1024,4096,16384,65536,131072 --repeats 10 --budget-s 60
        phase attention-wide "$PYTHON" benchmarks/attention.py --device cuda --dtype bf16 --name attention-gpu-wide \
            --batch 4 --heads 16 --head-dim 128 --impls ours-causal,ours-bidirectional,sdpa-causal,sdpa,fla-causal \
            --lengths 4096,16384,65536 --repeats 5 --budget-s 60
        ;;
    model)
        phase model "$PYTHON" benchmarks/model_step.py --device cuda --dtype bf16 --preset medium --name model_step-gpu \
            --models ours,ours-torch,ours-softmax --lengths 4096,16384,65536 --repeats 5 --budget-s 120
        ;;
    trainer) phase trainer "$PYTHON" benchmarks/gpu_trainer.py --data "$DATA" --steps 40 --name trainer-gpu ;;
    tune)
        PHASE_TIMEOUT_S=$((PHASE_TIMEOUT_S + 150)) phase tune "$PYTHON" benchmarks/attention.py --device cuda --dtype bf16 --name attention-tune-gpu \
            --impls ours-causal,ours-causal@c32w8s3,ours-causal@c64w8s3,ours-causal@c128w8s3,ours-causal@c64w8s2,ours-causal@c64w8s4,ours-causal@c64w4s3,ours-bidirectional,ours-bidirectional@c64w8s3,ours-bidirectional@c128w8s3,ours-bidirectional@c64w4s3 \
            --lengths 1024,16384,65536 --repeats 10 --budget-s 20
        ;;
    parity)
        phase parity "$PYTHON" benchmarks/parity.py --data "$DATA" --lengths 1024 --seeds 0,1,2 \
            --variants softmax,favor++@111,favor++@256,favor++@512 --name parity-seeds-gpu
        ;;
    *) echo "unknown phase $name (tests correctness attention model trainer tune parity)"; failed+=("$name") ;;
    esac
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu check: FAILED phases: ${failed[*]}"
    exit 1
fi
echo "gpu check: every phase passed ($PHASES)"
