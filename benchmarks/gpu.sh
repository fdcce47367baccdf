#!/usr/bin/env bash
# Issue 6's GPU checks in one go, for a session with a card: pointbert against the plain twin in fp32
# eager at batch 32 (with the ops alone), then at a large batch in fp32 and in bf16, the bf16 fast
# paths with torch.compile, and bf16 at batch 32 with CUDA graphs (compile mode reduce-overhead).
# Figures as JSON in $OUT (default benchmarks/results), named after the card.
#   bash benchmarks/gpu.sh [large batch, default 128]
set -euo pipefail
out=${OUT:-benchmarks/results}
big=${1:-128}
mkdir -p "$out"
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ', '').replace(' ', '-'))")
run() { echo "== $*"; python benchmarks/run.py --device cuda "$@"; }
run --sections ops,steps --batch 32 --repeats 5 --out "$out/gpu-$card-fp32-b32.json"
run --sections steps --batch "$big" --repeats 5 --out "$out/gpu-$card-fp32-b$big.json"
run --sections steps --batch "$big" --repeats 5 --precision bf16 --out "$out/gpu-$card-bf16-b$big.json"
run --sections fastpaths --steps finetune,inference --batch "$big" --repeats 5 --precision bf16 --compile \
    --out "$out/gpu-$card-bf16-b$big-fastpaths.json"
run --sections steps --steps finetune,inference --batch 32 --repeats 5 --precision bf16 --compile \
    --compile-mode reduce-overhead --out "$out/gpu-$card-bf16-b32-cudagraphs.json"
