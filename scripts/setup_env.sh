#!/usr/bin/env bash
# Creates ./.venv (once) and installs what megatron-bitpipe needs: torch first (the local CPU build
# when it is on disk; pip would otherwise pull GBs of CUDA build through megatron-core), then the
# package with its training, plotting, test and Megatron-LM (what megatron/training imports)
# extras. Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.megatron-bitpipe-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
  .venv/bin/python -m pip install -q -e ".[train,viz,test,megatron-lm]"
  touch "$stamp"
fi
