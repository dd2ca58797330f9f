#!/usr/bin/env bash
# Creates .venv (if missing), installs the dependencies and builds batchnorm_ext into it
# (editable: csrc/ changes need only this script again).  Says what it does as it goes:
# on a fresh machine the install and the build take a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
start=$SECONDS
say() { echo "[setup $((SECONDS - start))s] $*"; }
if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv"
  "$PYTHON" -m venv .venv
fi
say "installing the dependencies of requirements.txt (torch 2.13.0 CPU, test and benchmark packages)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
# --no-build-isolation: compile against the torch installed above, not a fresh one.
jobs=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}
say "compiling batchnorm_ext: the operators and one kernel build per instruction set, $jobs at a time (MAX_JOBS)"
MAX_JOBS=$jobs .venv/bin/python -m pip install --quiet --no-build-isolation -e .
.venv/bin/python -c "import batchnorm_ext, torch; print('batchnorm_ext', batchnorm_ext.__version__, 'torch', torch.__version__, 'kernels:', batchnorm_ext.cpu_capability())"
say "done"
