#!/usr/bin/env bash
# The quick quality run plus scoring timings on one GPU in bfloat16, printing everything to stdout.
# Nothing is downloaded: the embedded model comes from $LLAMAPRUNE_CACHE (carry .cache/ with the tree:
# `LLAMAPRUNE_CACHE=$PWD/.cache/llamaprune llamaprune eval smollm2-135m --max-windows 1` fills it) and the
# text from ../shared/data or $LLAMAPRUNE_DATA_DIR. Sized for under 8 minutes on one H100/H200-class GPU.
#   bash bench/gpu.sh                      # cuda, bfloat16
#   bash bench/gpu.sh --device cpu --tiny  # the same script on CPU, tiny model (how CI tests it)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda DTYPE=bfloat16 TINY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;;
    --tiny) TINY=(--tiny); shift ;;
    *) echo "usage: bash bench/gpu.sh [--device cuda|cpu] [--dtype bfloat16|float32] [--tiny]" >&2; exit 2 ;;
  esac
done
[ -d .cache/llamaprune ] && export LLAMAPRUNE_CACHE="${LLAMAPRUNE_CACHE:-$PWD/.cache/llamaprune}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
OUT="${OUT:-$(mktemp -d)}"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" bench/quality.py --quick "${TINY[@]}" --device "$DEVICE" --dtype "$DTYPE" --out "$OUT"
if [ ${#TINY[@]} -gt 0 ]; then
  "$PY" bench/score.py --tiny --num-samples 8 --seq-len 32 --device "$DEVICE"
else
  "$PY" bench/score.py --num-samples 128 --batch-size 16 --repeats 2 --device "$DEVICE" --dtype "$DTYPE"
fi
