#!/usr/bin/env bash
# Sets everything up, then runs the test suite.  Extra arguments go to pytest.
# (BATCHNORM_EXT_SET_UP=1 skips the set-up, when scripts/setup.sh has just run: CI does so.)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${BATCHNORM_EXT_SET_UP:-}" = 1 ] || bash scripts/setup.sh
.venv/bin/python -m pytest tests -q "$@"
