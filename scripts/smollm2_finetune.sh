#!/usr/bin/env bash
# SFT then DPO from the imported SmolLM2 on the play dialogue, rendered in its own ChatML template: a short
# demonstration that the training stages run on it (20 + 6 steps), not a tuned run. Validation uses the first
# 64 SFT examples / 32 DPO pairs of the held-out plays, so that the final evaluations take minutes on a CPU.
# Needs `hybrid-gpt import smollm2` and `hybrid-gpt prepare-chat --run-dir runs/smollm2` first.
set -euo pipefail
OUT=docs/results/smollm2
RUN=runs/smollm2
step() {  # as in smollm2_figures.sh
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "== $name: $*" | tee -a "$OUT/times.txt"
  "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
  echo "   $(( $(date +%s) - t0 )) s" | tee -a "$OUT/times.txt"
}
head -64 $RUN/chat/sft_val.jsonl > $RUN/sft_val64.jsonl
head -32 $RUN/chat/dpo_val.jsonl > $RUN/dpo_val32.jsonl
step sft uv run hybrid-gpt sft --run-dir $RUN --init $RUN/base --out $RUN/sft --max-steps 20 --batch-size 4 \
  --lr 1e-5 --warmup-steps 2 --eval-interval 10 --sft-data $RUN/chat/sft_train.jsonl \
  --sft-val-data $RUN/sft_val64.jsonl --no-progress
step chat-sft uv run hybrid-gpt chat $RUN/sft -p "Who is Hamlet?" --temperature 0 --max-new-tokens 60
step dpo uv run hybrid-gpt dpo --run-dir $RUN --init $RUN/sft --out $RUN/dpo --max-steps 6 --batch-size 2 \
  --lr 1e-6 --warmup-steps 1 --eval-interval 6 --dpo-data $RUN/chat/dpo_train.jsonl \
  --dpo-val-data $RUN/dpo_val32.jsonl --no-progress
step chat-dpo uv run hybrid-gpt chat $RUN/dpo -p "Who is Hamlet?" --temperature 0 --max-new-tokens 60
