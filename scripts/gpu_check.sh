#!/usr/bin/env bash
# The CUDA path on one GPU in under five minutes, one PASS/FAIL line per check (scripts/gpu_check.py).
# Uses the Python that has a CUDA torch (PYTHON, default python3). megatron-core comes from that
# Python if it has it, else from wheels in .whl/ (machines without a registry: see docs/gpu.md),
# else from PyPI. Nothing here needs a virtual environment of its own.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
# shellcheck source=scripts/megatron_core_env.sh
source scripts/megatron_core_env.sh
exec "$PYTHON" scripts/gpu_check.py "$@"
