#!/usr/bin/env bash
# The runs behind docs/presses.md: needle and perplexity for every press, both models, 2k and 4k contexts.
# Each command takes a few minutes on one CPU thread; results land in docs/results/presses/<run>/.
# Usage: benchmarks/presses_eval.sh [model ...]   (default: smollm2-135m gemma3-270m)
set -euo pipefail
cd "$(dirname "$0")/.."
TACHY=${TACHY:-tachy}
PRESSES=${PRESSES:-streaming_llm,snapkv,h2o,vatp,pyramidkv,kivi4,kivi2,snapkv+kivi4,snapkv+kivi2}
RATIOS=${RATIOS:-0.25,0.5,0.75}
OUT=${OUT:-docs/results/presses}
for model in "${@:-smollm2-135m gemma3-270m}"; do
  for context in 2048 4096; do
    OMP_NUM_THREADS=1 $TACHY eval needle --model "$model" --context "$context" --depths 0,0.25,0.5,0.75,1 \
      --press "$PRESSES" --ratio "$RATIOS" --out "$OUT/$model-needle-$context"
    OMP_NUM_THREADS=1 $TACHY eval ppl --model "$model" --context "$context" --windows 2 --tokens 256 \
      --press "$PRESSES" --ratio "$RATIOS" --out "$OUT/$model-ppl-$context"
  done
done
