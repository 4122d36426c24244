#!/usr/bin/env bash
# The from-scratch testbed at context 1,024 (preset `depth`: the cpu shape, 4,096 tokens per step), on this
# machine's CPU, resumable across sessions (ablate skips finished runs and resumes an interrupted one).
#
#   bash scripts/depth_testbed.sh                 # step 1, then step 2 if step 1 validates the testbed
#   STEP=validate bash scripts/depth_testbed.sh   # step 1 only
#   PRESET=smoke SEEDS=1,2 STEPS_PER_RUN=4 RUN=/tmp/r OUT=/tmp/o bash scripts/depth_testbed.sh   # a dry run (tests)
#
# 1. validate: AAAA against its half-depth AA, on the 5 seeds fixed here before any run (SEEDS; never topped up).
#    The testbed can see depth when AA - AAAA lies wholly above the tolerance (1% of AAAA's bits per byte);
#    ablate.md's "differences against the training budget" table shows that gap at every evaluation.
# 2. compare (only when step 1 validated it): standard AAAA, hybrid AAMM, the parameter-matched AAMM:matched
#    and AANN on the same seeds and budget, quality and decode speed from the same trained weights at 1,024.
# Results are copied to docs/results/cpu/depth/<step>/; each step's wall time is appended to its times.txt.
set -euo pipefail
RUN=${RUN:-runs/depth}
OUT=${OUT:-docs/results/cpu/depth}
SEEDS=${SEEDS:-1,2,3,4,5}
STEPS_PER_RUN=${STEPS_PER_RUN:-800}
STEP=${STEP:-validate,compare}
PRESET=${PRESET:-depth}
HG=${HG:-uv run hybrid-gpt}
export PYTHONUNBUFFERED=1

run_step() {  # run_step NAME PATTERNS: every step trains into the same $RUN/ablate, so that AAAA's runs are shared
  local name=$1 patterns=$2 t0
  mkdir -p "$OUT/$name"
  t0=$(date +%s)
  echo "== $(date -u +%F' '%T) hybrid-gpt ablate --preset $PRESET --run-dir $RUN --patterns $patterns" \
       "--seeds $SEEDS --steps $STEPS_PER_RUN --out $RUN/ablate" | tee -a "$OUT/$name/times.txt"
  $HG ablate --preset "$PRESET" --run-dir "$RUN" --patterns "$patterns" --seeds "$SEEDS" \
    --steps "$STEPS_PER_RUN" --out "$RUN/ablate"
  echo "   $(( $(date +%s) - t0 )) s" | tee -a "$OUT/$name/times.txt"
  cp "$RUN/ablate"/ablate.json "$RUN/ablate"/ablate.md "$RUN/ablate"/ablate-*.png "$OUT/$name/"
}

case ",$STEP," in *,validate,*) run_step validate AAAA,AA ;; esac
case ",$STEP," in *,compare,*)
  # validated: the AA - AAAA power line (final evaluations, paired by seed) lies wholly above its tolerance
  clear=$(python3 -c "import json; p=[p for p in json.load(open('$OUT/validate/ablate.json'))['power']
if (p['other'], p['base']) == ('AA', 'AAAA')]; ci=p[0]['difference']['ci95'] if p else None
print(int(bool(ci) and ci[0] > p[0]['tolerance']))")
  if [ "$clear" = 1 ]; then
    run_step compare AAAA,AAMM,AAMM:matched,AANN
  else
    echo "the testbed cannot see depth at this budget (AA - AAAA is not clear of the tolerance; see"
    echo "$OUT/validate/ablate.md): the comparison is not run on it"
  fi ;;
esac
