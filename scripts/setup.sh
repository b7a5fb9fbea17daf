#!/usr/bin/env bash
# Install llamaprune with its dev and eval (lm-evaluation-harness) extras; safe to run again (does nothing
# when up to date).
# Uses the active virtual/conda environment when there is one, else creates .venv here.
# An already installed torch (a CUDA build, say) is kept; otherwise torch==2.13.0 is installed,
# which pip takes from a local wheel where one is provided (CPU machines of this project).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
  PY=python
else
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv --system-site-packages .venv
  fi
  PY=.venv/bin/python
fi
stamp=".venv-installed"
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && stamp="${VIRTUAL_ENV:-$CONDA_PREFIX}/.llamaprune-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && "$PY" -c "import llamaprune, torch, lm_eval" 2>/dev/null; then
  exit 0
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev,eval]"
touch "$stamp"
