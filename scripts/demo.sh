#!/usr/bin/env bash
# The main job: sets up ./.venv on a fresh machine, then shows every schedule side by side in the
# simulator and renders BitPipe's timeline to out/bitpipe.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
mkdir -p out
.venv/bin/python -m megatron_bitpipe simulate --schedule all --pp 4 --microbatches 16
.venv/bin/python -m megatron_bitpipe render --schedule bitpipe --pp 4 --microbatches 8 --out out/bitpipe.png
