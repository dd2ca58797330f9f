#!/usr/bin/env bash
# Sets everything up, then benchmarks batchnorm_ext against torch.nn.BatchNorm2d.
# Extra arguments go to the benchmark (see: .venv/bin/python benchmarks/bench.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/bench.py "$@"
