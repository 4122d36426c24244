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
# 5. the per-context verdict;
# 6. (only when STEPS names it: `STEPS=retrofit`) the hypothesis on SmolLM2-135M-Instruct (issue 16): import,
#    tokenise the plays and the chat data, and `retrofit` at the full study's budgets (ks 0-20, 20 passkey trials
#    at 1k-8k, speed at 512-8,192 in float32 and bfloat16). It does not fit the 10 minutes above; RETROFIT_FLAGS
#    adds flags (e.g. "--ks 0,8,16 --no-checkpoints"). Its pages land in $OUT/retrofit/.
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
  if [[ " $STEPS " == *" retrofit "* ]]; then
    step smollm2 $HG import smollm2 --out "$RUN/smollm2/base" --overwrite
    step smollm2-data $HG prepare --tokenizer "$RUN/smollm2/base" --out "$RUN/smollm2/data"
    step smollm2-chat $HG prepare-chat --run-dir "$RUN/smollm2"
    # shellcheck disable=SC2086  # RETROFIT_FLAGS is a list of flags
    step retrofit $HG retrofit "$RUN/smollm2/base" --device "$DEVICE" --out "$RUN/smollm2/retrofit" ${RETROFIT_FLAGS:-}
  fi
} 2>&1 | tee "$OUT/log.txt"

# The results, without the checkpoints (those of the steps that ran).
mkdir -p "$OUT/run/speed" "$OUT/run/ablate-quick"
for f in results.json report.md hypothesis.json hypothesis.md speed/*.json ablate-quick/ablate.json \
         ablate-quick/ablate.md ablate-quick/*.png ./*.png; do
  for path in "$RUN"/$f; do
    if [[ -f $path ]]; then cp "$path" "$OUT/run/${path#"$RUN"/}"; fi
  done
done
if [[ -d $RUN/smollm2/retrofit ]]; then
  mkdir -p "$OUT/retrofit"
  cp "$RUN"/smollm2/retrofit/retrofit.* "$RUN"/smollm2/retrofit/*.png "$OUT/retrofit/"
fi
echo "results under $OUT"
