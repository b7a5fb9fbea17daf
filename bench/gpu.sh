#!/usr/bin/env bash
# The quick quality run plus scoring timings on one GPU in bfloat16, then bench/scale.py's run of every phase on a
# LLaMA-3-8B-shaped random checkpoint, printing everything to stdout.
# Nothing is downloaded: the embedded model comes from $LLAMAPRUNE_CACHE (carry .cache/ with the tree:
# `LLAMAPRUNE_CACHE=$PWD/.cache/llamaprune llamaprune eval smollm2-135m --max-windows 1` fills it) and the
# text from ../shared/data or $LLAMAPRUNE_DATA_DIR. Budget: one device command (at most 10 minutes) on one
# H100/H200-class GPU: the quality part was sized for under 8 minutes alone, and the scale part is estimated at
# 3-5 minutes (mostly writing and reading 16 GB checkpoints; docs/SCALE.md); neither has been timed on a GPU yet,
# so `--part quality` / `--part scale` runs one half alone where the whole does not fit.
#   bash bench/gpu.sh                      # cuda, bfloat16
#   bash bench/gpu.sh --part scale         # only the 8B-shaped run of every phase
#   bash bench/gpu.sh --device cpu --tiny  # the same script on CPU, tiny models (how CI tests it)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda DTYPE=bfloat16 TINY=() PART=all
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;;
    --tiny) TINY=(--tiny); shift ;;
    --part) PART=$2; shift 2 ;;
    *) echo "usage: bash bench/gpu.sh [--device cuda|cpu] [--dtype bfloat16|float32] [--tiny] [--part all|quality|scale]" >&2
       exit 2 ;;
  esac
done
case "$PART" in all|quality|scale) ;; *) echo "--part: all, quality or scale, not '$PART'" >&2; exit 2 ;; esac
[ -d .cache/llamaprune ] && export LLAMAPRUNE_CACHE="${LLAMAPRUNE_CACHE:-$PWD/.cache/llamaprune}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"; [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python  # the tests name theirs
OUT="${OUT:-$(mktemp -d)}"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [ "$PART" != scale ]; then
  "$PY" bench/quality.py --quick "${TINY[@]}" --device "$DEVICE" --dtype "$DTYPE" --out "$OUT"
  if [ ${#TINY[@]} -gt 0 ]; then
    "$PY" bench/score.py --tiny --num-samples 8 --seq-len 32 --device "$DEVICE"
  else
    "$PY" bench/score.py --num-samples 128 --batch-size 16 --repeats 2 --device "$DEVICE" --dtype "$DTYPE"
  fi
fi
if [ "$PART" != quality ]; then
  # bench/scale.py picks bfloat16 on cuda and float32 on cpu itself; its checkpoints go under $OUT, removed at the end.
  SHAPE=8b; [ ${#TINY[@]} -gt 0 ] && SHAPE=tiny
  "$PY" bench/scale.py --shape "$SHAPE" --device "$DEVICE" --dir "$OUT"
fi
