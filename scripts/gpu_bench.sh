#!/usr/bin/env bash
# Every GPU measurement of the speed issue in one go: a few minutes on one H200.
#
#   OUT=gpu-results bash scripts/gpu_bench.sh            # here, with uv
#   HG="python3 -m hybrid_gpt" bash scripts/gpu_bench.sh # where python3 already holds torch (PYTHONPATH=src)
#   PRESET=smoke DEVICE=cpu STEPS=5 bash scripts/gpu_bench.sh  # a dry run of the script on a CPU
#
# Trains the `seed` preset's two models briefly (speed does not depend on how well trained they are),
# then benchmarks them side by side in float32 and bfloat16 (prefill, cached and naive decode at
# batch 1, 8 and 32, the transformers peer in both precisions and CTranslate2 on CUDA in float32 and
# int8, the fraction of the measured memory-bandwidth limit, and each precision's bits per byte) and
# the training step, then once more with every model's static decode step compiled (torch.compile
# with CUDA graphs, mode reduce-overhead), checked token for token against eager. Everything lands as
# JSON and text under $OUT.
set -euo pipefail
OUT=${OUT:-gpu-results}
HG=${HG:-uv run hybrid-gpt}
STEPS=${STEPS:-300}
PRESET=${PRESET:-seed}
DEVICE=${DEVICE:-cuda}
RUN=${RUN:-$(mktemp -d)/run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  $HG prepare --preset "$PRESET" --run-dir "$RUN"
  for mt in standard hybrid; do
    $HG pretrain --preset "$PRESET" --run-dir "$RUN" --model-type "$mt" --max-steps "$STEPS" --eval-interval "$STEPS" \
      --no-progress
  done
  $HG eval "$RUN/pretrain-standard" --json > "$OUT/eval-standard.json"
  $HG eval "$RUN/pretrain-hybrid" --json > "$OUT/eval-hybrid.json"
  $HG bench "$RUN/pretrain-standard" "$RUN/pretrain-hybrid" --device "$DEVICE" --dtypes float32,bfloat16 \
    --batch-sizes 1,8,32 --repeats 5 --train --train-batch "${TRAIN_BATCH:-64}" --out "$OUT/bench.json" | tee "$OUT/bench.txt"
  # The static decode step compiled (one CUDA graph replayed per token) beside eager and both peers, in both
  # precisions. Separate, so that a compiler failure cannot cost the figures above.
  if ! $HG bench "$RUN/pretrain-standard" "$RUN/pretrain-hybrid" --device "$DEVICE" --dtypes float32,bfloat16 \
      --batch-sizes 1,8,32 --repeats 3 --no-naive --compile --out "$OUT/bench-compile.json" > "$OUT/bench-compile.txt"; then
    echo "compiled bench failed: see $OUT/bench-compile.txt"
  fi
  cat "$OUT/bench-compile.txt"
} 2>&1 | tee "$OUT/log.txt"
