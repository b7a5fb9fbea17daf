#!/usr/bin/env bash
# Install (idempotent), then run the main job on the embedded default model, SmolLM2-135M.
# Text comes from ../shared/data when that folder exists (offline), else from the Hugging Face hub.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
LP=llamaprune; [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && LP=.venv/bin/llamaprune
if [ -d ../shared/data ]; then
  export LLAMAPRUNE_DATA_DIR="${LLAMAPRUNE_DATA_DIR:-$(cd ../shared/data && pwd)}"
fi
"$LP" eval smollm2-135m --dataset wikitext2 --seq-len 128 --max-windows "${MAX_WINDOWS:-100}" \
  --out artifacts/smollm2-135m-eval.json
