#!/usr/bin/env bash
# Install (see scripts/setup.sh: the newest versions pyproject allows) and run the test suite; other arguments go
# to pytest. `--min` first runs it on the lowest versions pyproject allows (constraints-min.txt, in .venv-min/).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--min" ]; then
  shift
  export LLAMAPRUNE_CONSTRAINTS=constraints-min.txt LLAMAPRUNE_VENV=.venv-min
fi
bash scripts/setup.sh dev,eval
PY=.venv/bin/python
if [ -n "${LLAMAPRUNE_VENV:-}" ]; then PY="$LLAMAPRUNE_VENV/bin/python"
elif [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then PY=python; fi
exec "$PY" -m pytest "$@"
