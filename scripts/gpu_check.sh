#!/usr/bin/env bash
# The CUDA path on one GPU in under five minutes, one PASS/FAIL line per check (scripts/gpu_check.py).
# Uses the Python that has a CUDA torch (PYTHON, default python3). megatron-core comes from that
# Python if it has it, else from wheels in .whl/ (machines without a registry: see the README),
# else from PyPI. Nothing here needs a virtual environment of its own.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/megatron-bitpipe-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/megatron-bitpipe-site${PYTHONPATH:+:$PYTHONPATH}
  else
    "$PYTHON" -m pip install -q "megatron-core>=0.16.1,<0.20" || exit 1
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PYTHON" scripts/gpu_check.py "$@"
