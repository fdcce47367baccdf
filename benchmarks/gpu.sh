#!/usr/bin/env bash
# Issue 6's GPU checks, in parts of about 1-4 minutes each on an H100/H200 (start-up and torch.compile
# included); one call runs the parts named, in turn, so a 10-minute device command fits two or three:
#   bash benchmarks/gpu.sh PART[,PART...] [large batch, default 256]
# PART, most wanted first:
#   check       the GPU tests and every stage end to end on the card (about a minute)
#   bf16-big    the four steps at the large batch, bf16 autocast
#   fp32-big    the four steps at the large batch, fp32
#   loader      the training loader's samples/s on the host: 8192-point clouds, batch 256, 0/4/8/16 workers
#   fp32-b32    pointbert against the plain twin, fp32 eager, batch 32, with the ops alone
#   fastpaths   bf16 fast paths on and off and torch.compile, fine-tuning and inference, large batch
#   cudagraphs  bf16 fine-tuning and inference at batch 32 with torch.compile mode reduce-overhead (CUDA graphs)
#   all         (default) every part in turn: more than one 10-minute command may allow
# 3 warm-up steps and 5 timed ones per case. Figures as JSON in $OUT (default benchmarks/results), named after
# the card and the part; run.py rewrites the file after each case, so a part cut short by a time limit still
# leaves what it measured. Python: $PYTHON, else python3, else python.
set -euo pipefail
parts=(check bf16-big fp32-big loader fp32-b32 fastpaths cudagraphs)  # most wanted first
[[ ${1:-all} == all ]] && chosen=("${parts[@]}") || IFS=, read -ra chosen <<<"$1"
big=${2:-256}
for part in "${chosen[@]}"; do
    if [[ " ${parts[*]} " != *" $part "* ]]; then
        echo "usage: bash benchmarks/gpu.sh [PART[,PART...]: ${parts[*]} or all (default)] [large batch, default 256]" >&2
        exit 2
    fi
done
PY=${PYTHON:-$(command -v python3 || command -v python)}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
card=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ', '').replace(' ', '-'))")
run() {  # NAME ARGS...: one run.py call, its JSON in $out/gpu-$card-NAME.json
    local name=$1
    shift
    echo "== $name: $*"
    "$PY" benchmarks/run.py --device cuda --warmup 3 --repeats 5 "$@" --out "$out/gpu-$card-$name.json"
}
run_part() {
    case $1 in
        check)  # the gpu-marked tests (the Triton FPS kernel against the loop), then every stage and the
                # inference commands end to end on the card (their default device); both run, either may fail
            local rc=0
            "$PY" -m pytest -q -p no:cacheprovider -m gpu tests || rc=1
            "$PY" -m pytest -q -p no:cacheprovider tests/test_stages.py tests/test_inference.py || rc=1
            return $rc ;;
        loader) PYTHONPATH=. "$PY" benchmarks/bench_data.py --large --workers 0 4 8 16 --epochs 2 | tee "$out/gpu-$card-loader.txt" ;;
        fp32-b32) run fp32-b32 --sections ops,steps --batch 32 ;;
        fp32-big) run "fp32-b$big" --sections steps --batch "$big" ;;
        bf16-big) run "bf16-b$big" --sections steps --batch "$big" --precision bf16 ;;
        fastpaths) run "bf16-b$big-fastpaths" --sections fastpaths --steps finetune,inference --batch "$big" \
            --precision bf16 --compile ;;
        cudagraphs) run bf16-b32-cudagraphs --sections steps --steps finetune,inference --batch 32 --precision bf16 \
            --compile --compile-mode reduce-overhead ;;
    esac
}
for part in "${chosen[@]}"; do run_part "$part"; done
