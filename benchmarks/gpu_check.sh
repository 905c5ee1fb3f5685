#!/usr/bin/env bash
# Every GPU claim measured in one short run (under 8 minutes on one H200): the Triton tests
# compiled on CUDA (not interpreted), one optimizer step of every preset captured in a CUDA graph
# with a tensor lr, each preset's step in GB/s beside torch's fused AdamW and a copy of the same
# bytes on llama-60m, and the pure-bf16 llama-7b step's torch.cuda.max_memory_allocated.
# benchmarks/gpu_check.py does the work; its docstring says what each part measures.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#
# --dry-run (or GPU_CHECK_DRY_RUN=1) parses and imports everything, stops at the first CUDA check
# and exits 0: what CI runs on a CPU. On a machine whose python3 already holds torch, triton,
# transformers and pytest, slimopt runs from src/ (nothing is installed). Everything it writes
# goes under OUT_DIR (default: $OUT/gpu-check when $OUT is set, else runs/gpu-check): the JSON
# lines (gpu_check.jsonl), the summary (gpu_check.md), the Triton tests' report and its log.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY=(--dry-run)
    shift
elif [[ "${GPU_CHECK_DRY_RUN:-0}" == "1" ]]; then
    DRY=(--dry-run)
fi
DEST="${1:-${OUT:+$OUT/gpu-check}}"
DEST="${DEST:-runs/gpu-check}"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-450}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the Triton tests run compiled
mkdir -p "$DEST"
exec > >(tee -a "$DEST/log.txt") 2>&1
echo "gpu_check: $(date -u +%FT%TZ) out $DEST budget ${BUDGET_S}s ${DRY[*]:-}"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv || true
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
"$PY" benchmarks/gpu_check.py --out "$DEST" --budget-s "$BUDGET_S" ${DRY[@]+"${DRY[@]}"}
