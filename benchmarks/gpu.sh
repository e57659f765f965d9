#!/usr/bin/env bash
# The GPU acceptance script: every GPU figure the project owes, in one command (about 8 minutes on one H100).
#   benchmarks/gpu.sh [OUT]             on a CUDA machine (default OUT: gpu-acceptance)
#   benchmarks/gpu.sh --dry-run [OUT]   the same steps on the CPU at toy sizes (CI runs it: the script works)
# Timing data only (CIFAR-shaped noise, a sample text corpus): nothing here measures accuracy.
# Writes OUT/runs (run records: epoch wall-clock, steady step, peak memory), OUT/bench (bench records, the
# reference contenders beside qatbench's), OUT/pytest-cuda.txt (the CUDA-only tests), and OUT/gpu.md: the GPU
# section of leaderboard/performance.md, made from those records by benchmarks/gpu_section.py.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-gpu-acceptance}
DATA="$OUT/data"
rm -rf "$OUT" && mkdir -p "$DATA"
qatbench sample --task llama-20m --out "$DATA/text" > /dev/null             # a text corpus in the task's format

if [ "$DRY" = 1 ]; then   # toy sizes on the CPU: every command of the real run, in seconds
    qatbench sample --task cifar10-resnet20 --out "$DATA/cifar-shaped" > /dev/null   # a small CIFAR-10 layout
    DEVICE=cpu
    EPOCH=(--recipe smoke --batch-size 8)
    CIFAR_BENCH=(--batch-size 8)
    LLAMA=(--recipe smoke --task-arg hidden=32 --task-arg layers=1 --task-arg heads=2 --task-arg intermediate=64
           --task-arg seq_len=16 --batch-size 8 --micro-batch 4)
    LLAMA_BENCH=(--task-arg hidden=32 --task-arg layers=1 --task-arg heads=2 --task-arg intermediate=64
                 --task-arg seq_len=16 --batch-size 4)
    BENCH=(--steps 2 --warmup 1 --rounds 2)
    COMPILE=()            # no compiler needed for a dry run
else
    python benchmarks/cifar_shaped_data.py "$DATA/cifar-shaped" > /dev/null   # noise in the CIFAR-10 format
    DEVICE=cuda
    EPOCH=(--recipe short --epochs 1)                                          # 390 steps of batch 128
    CIFAR_BENCH=(--batch-size 128)
    LLAMA=(--recipe short --epochs 1 --micro-batch 32)                         # 200 steps of 256 x 512 tokens
    LLAMA_BENCH=(--task-arg seq_len=512 --batch-size 16)
    BENCH=(--steps 20 --warmup 10 --rounds 5)
    COMPILE=(--compile reduce-overhead)
fi
RUN=(--device "$DEVICE" --out "$OUT/runs" --no-download)
CIFAR=(--task cifar10-resnet20 --data-root "$DATA/cifar-shaped")

# a cifar10-resnet20 epoch, eager and under CUDA graphs
qatbench run --method fp parq --bits 2 "${CIFAR[@]}" "${EPOCH[@]}" "${RUN[@]}"
if [ ${#COMPILE[@]} -gt 0 ]; then
    qatbench run --method fp parq --bits 2 "${CIFAR[@]}" "${EPOCH[@]}" "${COMPILE[@]}" "${RUN[@]}"
fi
# llama-130m at the recipe's global batch, in micro-batches
qatbench run --method fp parq --bits 2 --task llama-130m --data-root "$DATA/text" "${LLAMA[@]}" "${RUN[@]}"
# the step against FP and against the reference, on both tasks
METHODS=(ste binaryrelax parq torchao-ste torchao-binaryrelax torchao-parq)
qatbench bench --methods "${METHODS[@]}" "${CIFAR[@]}" "${CIFAR_BENCH[@]}" --device "$DEVICE" "${BENCH[@]}" --out "$OUT/bench"
qatbench bench --methods "${METHODS[@]}" --task llama-20m --data-root "$DATA/text" "${LLAMA_BENCH[@]}" \
    --device "$DEVICE" "${BENCH[@]}" --out "$OUT/bench"
# the CUDA-only tests (they skip without a GPU)
python -m pytest -p no:cacheprovider -m cuda -rs tests > "$OUT/pytest-cuda.txt" 2>&1 || echo "pytest exit status $?" >> "$OUT/pytest-cuda.txt"
python benchmarks/gpu_section.py "$OUT" > "$OUT/gpu.md"
echo "GPU section: $OUT/gpu.md"
