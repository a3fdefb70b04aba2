#!/usr/bin/env bash
# Creates a lane's venv (once) and installs what megatron-bitpipe needs into it. Re-running is
# cheap: a stamp records what was installed, and nothing is installed again while it matches.
#
#   bash scripts/setup_env.sh [oldest|newest]     (default: oldest)
#
# oldest: ./.venv, Python 3.11, torch 2.13.0 (the local CPU build when it is on disk; pip would
#         otherwise pull GBs of CUDA build through megatron-core), megatron-core 0.16.1.
# newest: ./.venv-newest, Python 3.12 (megatron-core 0.17+ needs it), the newest torch the
#         package index serves that megatron-core accepts (its CUDA build, about 5 GB: cached in
#         the venv), megatron-core 0.19.2.
# Both: the package with its training, plotting, test and Megatron-LM extras.
set -euo pipefail
cd "$(dirname "$0")/.."
lane=${1:-oldest}
case "$lane" in
  oldest)
    venv=.venv
    python=${PYTHON:-python3}
    torch_pin=torch==${TORCH_VERSION:-2.13.0}
    mcore_pin=megatron-core==0.16.1
    ;;
  newest)
    venv=.venv-newest
    python=${PYTHON312:-}
    if [ -z "$python" ]; then
      # a pyenv shim answers to python3.12 without running it: try each candidate for real
      for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
          python=$candidate
          break
        fi
      done
    fi
    if [ -z "$python" ]; then
      echo "setup_env.sh: the newest lane needs Python 3.12 (set PYTHON312=/path/to/python3.12)" >&2
      exit 2
    fi
    torch_pin=torch==${TORCH_NEWEST:-2.15.0}
    mcore_pin=megatron-core==0.19.2
    # a machine-wide pip constraint may cap torch at the releases on its disk; this lane asks
    # for the index's newest, in its own venv only
    export PIP_CONSTRAINT=/dev/null
    ;;
  *)
    echo "setup_env.sh: unknown lane '$lane' (oldest or newest)" >&2
    exit 2
    ;;
esac
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp=$venv/.megatron-bitpipe-installed
want="$torch_pin $mcore_pin $(sha1sum setup.py | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$venv/bin/python" -m pip install -q "$torch_pin"
  "$venv/bin/python" -m pip install -q "$mcore_pin"
  "$venv/bin/python" -m pip install -q -e ".[train,viz,test,megatron-lm]"
  echo "$want" > "$stamp"
fi
