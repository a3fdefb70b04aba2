#!/usr/bin/env bash
# The main job: sets up ./.venv on a fresh machine, then trains a small GPT with BitPipe on 4 local
# CPU processes (gloo), printing Megatron's log line per iteration and writing the measured trace
# (out/bitpipe_trace.json, open in https://ui.perfetto.dev) and its timeline (out/bitpipe_trace.png).
# Then the same schedule family side by side in the simulator.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
mkdir -p out
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
echo "== BitPipe training: 4 CPU processes, PP=4, 16 layers, 16 microbatches per step"
.venv/bin/python -m torch.distributed.run --standalone --nproc-per-node=4 -m megatron_bitpipe.train \
  --pipeline-model-parallel-size 4 --pipeline-schedule bitpipe \
  --num-layers 16 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --vocab-size 128 \
  --micro-batch-size 2 --global-batch-size 32 --train-iters 30 --lr 3e-3 --seed 1234 \
  --trace out/bitpipe_trace.json
echo "== the schedules in the simulator (PP=4, 16 microbatches, F=1 B=2)"
.venv/bin/python -m megatron_bitpipe simulate --schedule all --pp 4 --microbatches 16
.venv/bin/python -m megatron_bitpipe render --schedule bitpipe --pp 4 --microbatches 16 --out out/bitpipe_simulated.png
echo "== wrote out/bitpipe_trace.json, out/bitpipe_trace.png (measured), out/bitpipe_simulated.png"
