#!/usr/bin/env bash
# The 32,000-token-vocabulary comparison behind docs/results.md's "Large vocabulary" section: the
# regime of the SAGE paper's claim. llama-tiny widths, a 32k BPE vocabulary trained on enwiki,
# seven presets, learning rates swept per rule (x0.5, x1, x2 of the defaults, one more step when
# the best is on the grid's edge) at 200k tokens, then 2M tokens per run, 2 seeds, the validation
# loss split by the target token's training frequency (ranks 1k and 8k) and the share of embedding
# rows touched per step.
#
#   bash benchmarks/compare_32k.sh [DATA_DIR] [OUT_DIR] [SEEDS] [THIRD_SEED_PRESETS]
#
# Resumable: rerun the same command after an interruption; finished runs are reused. Two processes
# share the directory, one torch thread each, as in compare_enwiki.sh. Then THIRD_SEED_PRESETS
# (default sage-hybrid,lion-hybrid: the pair the committed rules sent to a third seed after two;
# "" for none) get one seed more. The last call trains nothing new and writes the table and plots,
# counting the added seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/enwiki}"
OUT="${2:-runs/compare-32k}"
SEEDS="${3:-2}"
THIRD="${4-sage-hybrid,lion-hybrid}"
PRESETS=adamw,lion,sage-hybrid,lion-hybrid,sinkgd-hybrid,scale,sinkgd-pure
BACKWARD=sinkgd-pure,scale,sinkgd-hybrid,lion-hybrid,sage-hybrid,lion,adamw
COMMON=(--data "$DATA" --model llama-tiny --vocab-size 32000 --tokens 2M --seeds "$SEEDS"
        --sweep lr=0.5,1,2 --sweep-tokens 200k --sweep-extend 1
        --evals 5 --eval-tokens 32768 --frequency-eval 1k,8k --threads 1 --out "$OUT")
mkdir -p "$OUT"
slimopt compare "${COMMON[@]}" --presets "$PRESETS" >> "$OUT/forward.log" 2>&1 &
FORWARD=$!
sleep 20  # the first process claims the directory and measures the state bytes
slimopt compare "${COMMON[@]}" --presets "$BACKWARD" >> "$OUT/backward.log" 2>&1 &
wait $! "$FORWARD"
if [ -n "$THIRD" ]; then
  slimopt compare "${COMMON[@]}" --seeds "$((SEEDS + 1))" --presets "$THIRD" >> "$OUT/third.log" 2>&1
fi
slimopt compare "${COMMON[@]}" --presets "$PRESETS"
