#!/usr/bin/env bash
# Install (idempotent) and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,eval
PY=python; [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && PY=.venv/bin/python
exec "$PY" -m pytest "$@"
