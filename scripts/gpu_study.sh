#!/usr/bin/env bash
# The hypothesis study (issue 15) on one GPU, meant to take at most 10 minutes of wall time on one H200:
#
#   OUT=gpu-study bash scripts/gpu_study.sh                     # here, with uv
#   HG="python3 -m hybrid_gpt" OUT=$OUT bash scripts/gpu_study.sh  # where python3 holds torch (PYTHONPATH=src)
#   DRY_RUN=1 OUT=/tmp/study bash scripts/gpu_study.sh          # the same steps on a CPU at smoke sizes
#   STEPS="ablate bench-long costs verdict" ...                  # some steps only (the test's dry run skips the
#                                                                # pipeline, which tests/test_pipeline.py covers)
#
# 1. the `seed` preset's pipeline (standard and hybrid: pretraining, SFT, DPO, benchmark, report);
# 2. the seed-shape ablation (AAAA, AAMM, AANN, MMAA, AA) over 3 seeds at ablate's --quick budget
#    (1,000 steps each: the preset's 5,000 x 15 runs would not fit the 10 minutes);
# 3. the long-context decode benchmark of random-weight seed-shape models (speed does not depend on what
#    the weights learned), contexts 256 to 16,384, batch 1 and 8, into <run>/speed/ where the verdict reads it;
# 4. the cost model's table for the same shapes and contexts, with the GPU's measured bandwidth and matmul rate;
# 5. the per-context verdict.
# Everything lands under $OUT as JSON, text and the rendered pages (markdown and PNG); checkpoints stay in $RUN.
set -euo pipefail
OUT=${OUT:-gpu-study}
HG=${HG:-uv run hybrid-gpt}
if [[ ${DRY_RUN:-0} == 1 ]]; then
  PRESET=smoke DEVICE=cpu SEEDS=1,2 CONTEXTS=32,64 BLOCK=64 BATCHES=1,2 REPEATS=2
else
  PRESET=seed DEVICE=cuda SEEDS=1,2,3 CONTEXTS=256,1024,4096,16384 BLOCK=16384 BATCHES=1,8 REPEATS=5
fi
RUN=${RUN:-$(mktemp -d)/run}
mkdir -p "$OUT" "$RUN/speed"
export PYTHONUNBUFFERED=1
: > "$OUT/times.txt"

STEPS=${STEPS:-pipeline ablate bench-long costs verdict}

step() {  # step NAME COMMAND...: run it (when STEPS names it) and append its wall time to times.txt
  local name=$1 t0=$SECONDS
  shift
  [[ " $STEPS " == *" $name "* ]] || return 0
  "$@"
  echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/times.txt" >&2  # stderr: a step's stdout may be its result
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  step pipeline $HG pipeline --preset "$PRESET" --run-dir "$RUN" --device "$DEVICE"
  step ablate $HG ablate --run-dir "$RUN" --preset "$PRESET" --quick --seeds "$SEEDS" \
    --patterns AAAA,AAMM,AANN,MMAA,AA --device "$DEVICE"
  step bench-long $HG bench --shape "$PRESET" --layers AAAA,AAMM --block-size "$BLOCK" --contexts "$CONTEXTS" \
    --batch-sizes "$BATCHES" --repeats "$REPEATS" --no-naive --no-peer --device "$DEVICE" \
    --out "$RUN/speed/$PRESET.json" | tee "$OUT/bench-long.txt"
  step costs $HG costs --layers AAAA,AAMM --preset "$PRESET" --contexts "$CONTEXTS" --batch-sizes "$BATCHES" \
    --device "$DEVICE" --json > "$OUT/costs.json"
  step verdict $HG verdict --run-dir "$RUN"
} 2>&1 | tee "$OUT/log.txt"

# The results, without the checkpoints (those of the steps that ran).
mkdir -p "$OUT/run/speed" "$OUT/run/ablate-quick"
for f in results.json report.md hypothesis.json hypothesis.md speed/*.json ablate-quick/ablate.json \
         ablate-quick/ablate.md ablate-quick/*.png ./*.png; do
  for path in "$RUN"/$f; do
    if [[ -f $path ]]; then cp "$path" "$OUT/run/${path#"$RUN"/}"; fi
  done
done
echo "results under $OUT"
