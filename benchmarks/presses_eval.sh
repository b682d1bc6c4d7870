#!/usr/bin/env bash
# The runs behind docs/presses.md: needle and perplexity for every press, both models, 2k and 4k contexts.
# Each command takes a few minutes on one CPU thread; results land in $OUT/<model>-<task>-<context>[$SUFFIX]/.
# Usage: benchmarks/presses_eval.sh [model ...]      (default: smollm2-135m gemma3-270m)
#   env: CONTEXTS="2048 4096", PRESSES=..., RATIOS=0.25,0.5,0.75, TASKS="needle ppl", SUFFIX="", TACHY=tachy
set -euo pipefail
cd "$(dirname "$0")/.."
TACHY=${TACHY:-tachy}
PRESSES=${PRESSES:-streaming_llm,snapkv,h2o,vatp,pyramidkv,razor,headkv,ems,kivi4,kivi2,gear4,gear2,int4kv,snapkv+kivi4,razor+kivi4,headkv+kivi4,snapkv+int4kv,razor+int4kv,headkv+int4kv}
RATIOS=${RATIOS:-0.25,0.5,0.75}
OUT=${OUT:-docs/results/presses}
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(smollm2-135m gemma3-270m)
for model in "${models[@]}"; do
  for context in ${CONTEXTS:-2048 4096}; do
    for task in ${TASKS:-needle ppl}; do
      if [ "$task" = needle ]; then
        extra=(--depths 0,0.25,0.5,0.75,1)
      else
        extra=(--windows 2 --tokens 256)
      fi
      OMP_NUM_THREADS=1 $TACHY eval "$task" --model "$model" --context "$context" "${extra[@]}" \
        --press "$PRESSES" --ratio "$RATIOS" --out "$OUT/$model-$task-$context${SUFFIX:-}"
    done
  done
done
