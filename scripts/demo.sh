#!/usr/bin/env bash
# Install (idempotent), then run the main job on the embedded default model, SmolLM2-135M:
# score (all criteria, one pass) -> plan (20% of parameters, global taylor2) -> apply with least-squares error
# compensation (o_proj/down_proj refitted layer by layer on calibration text, the groups each layer loses chosen
# by OBS among the plan's lowest-scored 1.25x, each refit 0.3 of the way to the dense model's hidden states) ->
# evaluate.
# Text comes from ../shared/data when that folder exists (offline), else from the Hugging Face hub.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
LP=llamaprune; [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && LP=.venv/bin/llamaprune
CALIB=wikitext2
if [ -d ../shared/data ]; then
  export LLAMAPRUNE_DATA_DIR="${LLAMAPRUNE_DATA_DIR:-$(cd ../shared/data && pwd)}"
  CALIB="$LLAMAPRUNE_DATA_DIR/wikitext-2-tokens/valid.txt"
fi
RUN=artifacts/smollm2-135m
"$LP" score smollm2-135m --out "$RUN" --dataset "$CALIB" --num-samples "${NUM_SAMPLES:-64}" --seq-len 128 --overwrite
"$LP" plan "$RUN" --ratio 0.2 --criterion taylor2 --name demo-taylor2-0.20
"$LP" apply "$RUN/plans/demo-taylor2-0.20.json" --model smollm2-135m --out "$RUN/model" --overwrite \
  --compensate lstsq --calibration "$CALIB" --calibration-samples "${CALIBRATION_SAMPLES:-256}" \
  --select obs --obs-pool 1.25 --target residual --residual-share 0.3 \
  --eval wikitext2 --seq-len 128 --max-windows "${MAX_WINDOWS:-100}"
