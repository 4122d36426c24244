#!/usr/bin/env bash
# The README's SmolLM2-135M-Instruct figures, in order, on this machine (CPU). Each step's wall time goes to
# docs/results/smollm2/times.txt. Usage: bash scripts/smollm2_figures.sh   (about 1.5-2 hours on 2 cores)
set -euo pipefail
OUT=docs/results/smollm2
RUN=runs/smollm2
mkdir -p "$OUT"
: > "$OUT/times.txt"
step() {  # step NAME COMMAND...: run it, keep its output in $OUT/NAME.txt, and log its wall time
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "== $name: $*" | tee -a "$OUT/times.txt"
  "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
  echo "   $(( $(date +%s) - t0 )) s" | tee -a "$OUT/times.txt"
}
step import uv run hybrid-gpt import smollm2 --out $RUN/base --overwrite
step chat uv run hybrid-gpt chat $RUN/base -p "Who is Hamlet?" --temperature 0
step prepare uv run hybrid-gpt prepare --tokenizer $RUN/base --out $RUN/data
step bench uv run hybrid-gpt bench $RUN/base --contexts 512,2048,8192 --batch-sizes 1,8 \
  --dtypes float32,bfloat16 --repeats 3 --warmup 0 --no-naive --new-tokens 16 --out $OUT/bench.json
step eval uv run hybrid-gpt eval $RUN/base --data $RUN/data --context 2048 --json
step importance uv run hybrid-gpt importance $RUN/base --data $RUN/data --context 1024 --max-tokens 4096 \
  --out $OUT/importance
step prepare-chat uv run hybrid-gpt prepare-chat --run-dir $RUN
bash scripts/smollm2_finetune.sh
echo done | tee -a "$OUT/times.txt"
