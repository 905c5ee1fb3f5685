#!/usr/bin/env bash
# The comparison behind docs/results.md: llama-tiny on the enwiki corpus, every preset, learning
# rates swept per rule around the presets' defaults at a short budget (100k tokens) first, then
# 1M tokens per run, 2 seeds. (The defaults themselves are the winners of a wider sweep,
# --sweep lr=0.25,1,4 around the papers' values at the same 100k tokens, run by this script with
# those values as the defaults and its output directory renamed to OUT-tuning; see presets.py.)
#
#   bash benchmarks/compare_enwiki.sh [DATA_DIR] [OUT_DIR]
#
# Resumable: rerun the same command after an interruption; finished runs are reused.
# Two processes share the comparison directory, one walking the presets forward and one backward
# (a run one of them is training is locked, so the other skips it and comes back to it at the end),
# each with one torch thread: on a 2-core machine that is shared with other work this is much
# faster than one process with two threads. The last call trains nothing new and writes the final
# table and plots; then the claims report is written into docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/enwiki}"
OUT="${2:-runs/compare-enwiki}"
PRESETS=adamw,lion,sage-hybrid,sage-pure,lion-hybrid,sinkgd-hybrid,sinkgd-pure,scale,sgd-sai
BACKWARD=sgd-sai,scale,sinkgd-pure,sinkgd-hybrid,lion-hybrid,sage-pure,sage-hybrid,lion,adamw
# the baselines too, when their packages are installed (pip install "slimopt[baselines]")
if python -c "import adam_mini, apollo_torch, galore_torch, prodigyopt" 2>/dev/null; then
    PRESETS="$PRESETS,adam-mini,apollo,galore,muon,prodigy"
    BACKWARD="prodigy,muon,galore,apollo,adam-mini,$BACKWARD"
fi
COMMON=(--data "$DATA" --model llama-tiny --tokens 1M --seeds 2
        --sweep lr=0.5,1,2 --sweep-tokens 100k --sweep-extend 1
        --evals 5 --eval-tokens 32768 --threads 1 --out "$OUT")
mkdir -p "$OUT"
slimopt compare "${COMMON[@]}" --presets "$PRESETS" > "$OUT/forward.log" 2>&1 &
FORWARD=$!
sleep 20  # the first process claims the directory and measures the state bytes
slimopt compare "${COMMON[@]}" --presets "$BACKWARD" > "$OUT/backward.log" 2>&1 &
wait $! "$FORWARD"
slimopt compare "${COMMON[@]}" --presets "$PRESETS"
TUNING=()
[ -d "$OUT-tuning/sweep" ] && TUNING=(--tuning "$OUT-tuning")
python benchmarks/compare_claims.py "$OUT" --out docs "${TUNING[@]}"
