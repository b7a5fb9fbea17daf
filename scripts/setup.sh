#!/usr/bin/env bash
# Install llamaprune with the extras named in $1 (default: eval, lm-evaluation-harness); the tests pass
# "dev,eval". Safe to run again: does nothing when up to date.
# Uses the active virtual/conda environment when there is one, else creates .venv here.
# An already installed torch (a CUDA build, say) is kept; otherwise torch==2.13.0 is installed,
# which pip takes from a local wheel where one is provided (CPU machines of this project).
# The dev extra holds llama-cpp-python, which PyPI has only as source: its first install builds the llama.cpp
# library (about 5 minutes on 2 cores; pip caches the wheel) without the tools and multimodal parts, which
# neither the tests nor `llamaprune export` use; a CMAKE_ARGS of your own replaces that choice.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-eval}"
if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
  PY=python
else
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv --system-site-packages .venv
  fi
  PY=.venv/bin/python
fi
modules="llamaprune, torch"
case ",$extras," in *,eval,*) modules="$modules, lm_eval";; esac
case ",$extras," in *,dev,*) modules="$modules, pytest, llama_cpp, sentencepiece";; esac
stamp=".venv-installed-${extras//,/-}"
[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && stamp="${VIRTUAL_ENV:-$CONDA_PREFIX}/.llamaprune-installed-${extras//,/-}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && "$PY" -c "import $modules" 2>/dev/null; then
  exit 0
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF}"
"$PY" -m pip install --quiet -e ".[$extras]"
touch "$stamp"
