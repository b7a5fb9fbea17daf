#!/usr/bin/env bash
# Install llamaprune with the extras named in $1 (default: eval, lm-evaluation-harness); the tests pass
# "dev,eval". Safe to run again: it does nothing when the install is less than a day old and up to date.
#
# Versions: a new user gets the newest releases pyproject.toml allows, so this installs with
# `pip install --upgrade --upgrade-strategy eager`: packages already there (the system's, an older run's) are
# brought to the newest allowed as well. $LLAMAPRUNE_CONSTRAINTS names a pip constraints file that pins them
# instead: constraints-min.txt (the lowest allowed) or constraints-tested.txt (the newest the suite last
# passed with).
#
# Installs into $LLAMAPRUNE_VENV when it is set, else into the active virtual/conda environment, else into .venv;
# a venv it creates has access to the system's packages. An already installed torch (a CUDA build, say) is kept; otherwise torch==2.13.0 is
# installed, which pip takes from a local wheel where one is provided (CPU machines of this project), unless
# the constraints pin another torch.
# The dev extra holds llama-cpp-python, which PyPI has only as source: its first install builds the llama.cpp
# library (about 5 minutes on 2 cores; pip caches the wheel) without the tools and multimodal parts, which
# neither the tests nor `llamaprune export` use; a CMAKE_ARGS of your own replaces that choice.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-eval}"
constraints="${LLAMAPRUNE_CONSTRAINTS:-}"
venv="${LLAMAPRUNE_VENV:-.venv}"
if [ -z "${LLAMAPRUNE_VENV:-}" ] && [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
  PY=python
  stamp="${VIRTUAL_ENV:-$CONDA_PREFIX}/.llamaprune-installed-${extras//,/-}"
else
  if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
  fi
  PY="$venv/bin/python"
  stamp="$venv/.llamaprune-installed-${extras//,/-}"
fi
modules="llamaprune, torch"
case ",$extras," in *,eval,*) modules="$modules, lm_eval";; esac
case ",$extras," in *,dev,*) modules="$modules, pytest, llama_cpp, sentencepiece";; esac
fresh() {  # the stamp is newer than what decides the versions, and less than a day old
  [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ -z "$(find "$stamp" -mmin +1440)" ] \
    && { [ -z "$constraints" ] || [ "$stamp" -nt "$constraints" ]; } \
    && [ "$(cat "$stamp")" = "$constraints" ]
}
if fresh && "$PY" -c "import $modules" 2>/dev/null; then
  exit 0
fi
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
[ -n "$constraints" ] && cat "$constraints" > "$pins"
if ! grep -qiE '^torch *==' "$pins"; then
  if installed="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
    echo "torch==$installed" >> "$pins"  # keep the torch that is there: no eager upgrade to another build
  else
    "$PY" -m pip install --quiet -c "$pins" "torch==2.13.0"
    echo "torch==2.13.0" >> "$pins"
  fi
fi
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF}"
"$PY" -m pip install --quiet --upgrade --upgrade-strategy eager -c "$pins" -e ".[$extras]"
printf '%s' "$constraints" > "$stamp"
