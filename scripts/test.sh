#!/usr/bin/env bash
# The test command: sets up ./.venv on a fresh machine, then runs the whole suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q tests "$@"
