#!/usr/bin/env bash
# Creates .venv (if missing), installs the dependencies and builds batchnorm_ext into it
# (editable: csrc/ changes need only this script again).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
# --no-build-isolation: compile against the torch installed above, not a fresh one.
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install --quiet --no-build-isolation -e .
.venv/bin/python -c "import batchnorm_ext, torch; print('batchnorm_ext', batchnorm_ext.__version__, 'torch', torch.__version__, 'kernels:', batchnorm_ext.cpu_capability())"
