#!/usr/bin/env bash
# Regenerates the bench records behind leaderboard/performance.md (CPU; add --device cuda on a GPU machine).
#   benchmarks/performance.sh [OUT]   (default leaderboard/performance/bench; about 5 minutes on 2 cores)
# Every bench runs on one thread (the CPU default); OUT/tables.md gets the tables of leaderboard/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-leaderboard/performance/bench}
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT
rm -rf "$OUT" && mkdir -p "$OUT"
python benchmarks/cifar_shaped_data.py "$DATA/cifar-shaped" > /dev/null   # noise in the CIFAR-10 format
cat /usr/share/common-licenses/* > "$DATA/corpus.txt"                       # 300 KB of English text (Debian)
qatbench bench --task fashion-mnist-mlp --rounds 30 --steps 25 --out "$OUT"
qatbench bench --task cifar10-resnet20 --data-root "$DATA/cifar-shaped" --steps 4 --warmup 2 --rounds 5 --out "$OUT"
qatbench bench --task cifar10-resnet20 --data-root "$DATA/cifar-shaped" --quantizer uniform --granularity channel \
    --steps 4 --warmup 2 --rounds 5 --out "$OUT"
qatbench bench --task llama-20m --data-root "$DATA/corpus.txt" --task-arg seq_len=128 --batch-size 8 \
    --steps 4 --warmup 2 --rounds 3 --out "$OUT"
pytest benchmarks --benchmark-enable --benchmark-sort=name --benchmark-json="$OUT/pytest-bench.json" -p no:cacheprovider
python benchmarks/bench_tables.py "$OUT" > "$OUT/tables.md"
