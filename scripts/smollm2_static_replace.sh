#!/usr/bin/env bash
# The staticness map and the replacement study of SmolLM2-135M-Instruct on this machine (CPU), resumable across
# sessions: a fresh checkout continues from the state.json files committed under docs/results/smollm2/{static,
# replace} (finished fits and arms are never redone; the map's captures, 12 GB, are taken again in ~5 min).
# Usage: bash scripts/smollm2_static_replace.sh            # the map's width-144 MLPs, then the study
#        WIDTHS=144,576,2304 bash scripts/smollm2_static_replace.sh   # also the wider MLPs (hours on 2 cores)
#        STEPS=static bash scripts/smollm2_static_replace.sh          # only the map
# Each step's wall time is appended to docs/results/smollm2/<step>/times.txt.
set -euo pipefail
RUN=runs/smollm2
OUT=docs/results/smollm2
STEPS=${STEPS:-static,replace}
[ -f $RUN/base/config.json ] || uv run hybrid-gpt import smollm2
[ -f $RUN/data/meta.json ] || uv run hybrid-gpt prepare --tokenizer $RUN/base
export PYTHONUNBUFFERED=1
for step in static replace; do
  case ",$STEPS," in *",$step,"*) ;; *) continue ;; esac
  mkdir -p $OUT/$step
  if [ ! -f $RUN/$step/state.json ] && [ -f $OUT/$step/state.json ]; then  # continue the committed state
    mkdir -p $RUN/$step && cp $OUT/$step/state.json $RUN/$step/
  fi
  flags=()
  [ -f $RUN/$step/state.json ] && flags+=(--resume)
  if [ $step = static ]; then flags+=(--widths "${WIDTHS:-144}"); else flags+=(--map $RUN/static); fi
  t0=$(date +%s)
  echo "== $(date -u +%F' '%T) hybrid-gpt $step $RUN/base --out $RUN/$step ${flags[*]}" | tee -a $OUT/$step/times.txt
  uv run hybrid-gpt $step $RUN/base --out $RUN/$step "${flags[@]}" --no-progress
  echo "   $(( $(date +%s) - t0 )) s" | tee -a $OUT/$step/times.txt
  cp $RUN/$step/$step.json $RUN/$step/$step.md $RUN/$step/state.json $RUN/$step/$step-*.png $OUT/$step/
done
