#!/usr/bin/env bash
# The demo precompute, one attribution graph and one comparison on a GPU, checked against the CPU
# (benchmarks/gpu_smoke.py says what must agree). Usage: bash benchmarks/gpu_smoke.sh [DEVICE] [CONTEXTS]
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
exec .venv/bin/python -m benchmarks.gpu_smoke --device "${1:-cuda}" --contexts "${2:-64}"
