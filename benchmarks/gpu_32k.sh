#!/usr/bin/env bash
# The GPU leg of the 32,000-token-vocabulary comparison (docs/results.md, "Large vocabulary"):
# llama-60m (the GaLore/SCALE 60M LLaMA, 32k vocabulary) on enwiki, presets adamw, sage-hybrid and
# scale, one seed, bf16 autocast, each preset's default learning rates, for as many tokens as a
# fixed time budget allows. One call: it measures the training throughput first (a short adamw
# run, which also trains the tokenizer and fills the token cache), sizes the token budget so the
# three runs take about BUDGET_S seconds together, then runs the comparison.
#
#   bash benchmarks/gpu_32k.sh [DATA_DIR] [OUT_DIR] [BUDGET_S]
#
# On a machine whose python3 already holds torch, transformers and tokenizers, slimopt runs from
# src/ (nothing is installed). Everything it writes goes under OUT_DIR (default: $OUT/gpu-32k when
# $OUT is set, else runs/gpu-32k), including its log.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/enwiki}"
DEST="${2:-${OUT:+$OUT/gpu-32k}}"
DEST="${DEST:-runs/gpu-32k}"
BUDGET_S="${3:-420}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export SLIMOPT_CACHE="${SLIMOPT_CACHE:-/tmp/slimopt-gpu-cache}"  # token cache: kept out of OUT_DIR
MODEL="${MODEL:-llama-60m}"
DEVICE="${DEVICE:-cuda}"
BATCH="${BATCH:-32}"
SEQ="${SEQ:-256}"
PROBE_STEPS="${PROBE_STEPS:-40}"
mkdir -p "$DEST"
exec > >(tee -a "$DEST/log.txt") 2>&1
echo "gpu_32k: $(date -u +%FT%TZ) model $MODEL device $DEVICE batch $BATCH x $SEQ budget ${BUDGET_S}s"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
"$PY" -c "import torch, transformers, tokenizers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# 1. throughput: a short adamw run (its first steps, with compilation and warm-up, are included,
#    so the estimate errs low and the comparison ends inside the budget)
"$PY" -m slimopt train --model "$MODEL" --vocab-size 32000 --data "$DATA" --preset adamw \
    --device "$DEVICE" --batch-size "$BATCH" --seq-len "$SEQ" --max-steps "$PROBE_STEPS" \
    --eval-tokens 8192 --no-save-model --progress log --out "$DEST/probe" --overwrite --json \
    > "$DEST/probe.json"
TOKENS=$("$PY" - "$DEST/probe.json" "$BUDGET_S" "$BATCH" "$SEQ" <<'EOF'
import json, sys
final = json.load(open(sys.argv[1]))
budget, step_tokens = float(sys.argv[2]), int(sys.argv[3]) * int(sys.argv[4])
rate = final["train_tokens_per_s"]
# three runs, each with five evaluations and start-up: 0.8 of the time goes to training
tokens = int(rate * budget * 0.8 / 3) // step_tokens * step_tokens
print(max(tokens, 20 * step_tokens))
print(f"probe: {rate:,.0f} training tokens/s -> {tokens:,} tokens per run", file=sys.stderr)
EOF
)
echo "tokens per run: $TOKENS"

# 2. the comparison
"$PY" -m slimopt compare --data "$DATA" --model "$MODEL" --vocab-size 32000 \
    --presets adamw,sage-hybrid,scale --seeds 1 --tokens "$TOKENS" --device "$DEVICE" \
    --batch-size "$BATCH" --seq-len "$SEQ" --evals 5 --eval-tokens 65536 \
    --frequency-eval 1k,8k --out "$DEST/compare"
cat "$DEST/compare/results.md"
