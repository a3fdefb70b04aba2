# shellcheck shell=bash
# Sourced by the GPU scripts: makes megatron-core and this checkout importable by $PYTHON.
# megatron-core comes from that Python if it has it, else from wheels in .whl/ (machines without
# a registry: see docs/gpu.md), else from PyPI; exits the script if it cannot be installed.
if ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/megatron-bitpipe-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/megatron-bitpipe-site${PYTHONPATH:+:$PYTHONPATH}
  else
    "$PYTHON" -m pip install -q "megatron-core>=0.16.1,<0.20" || exit 1
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
