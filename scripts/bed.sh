#!/usr/bin/env bash
# The 8-rank CPU bed, for a 16-core machine (8 gloo ranks x 2 threads): every schedule at PP=8 on a
# 16-layer model (hidden 512, 8 heads, seq 256), N=16 and N=32 microbatches, three runs each
# (megatron-bitpipe bench --repeat 3), then each OUT/nN/bench.md: measured step, simulated_ms
# (the simulator fed with the costs fitted to these runs, OUT/nN/costs.json) and its error_pct.
#
#   bash scripts/bed.sh [--out DIR] [--cluster FILE] [--force]
#
# --out: results folder (default bed), one bench folder per N: DIR/n16, DIR/n32.
# --cluster: also a cluster config's prediction (bench's simulated_cluster_ms column), e.g.
#   configs/clusters/local-cpu.yaml, or a cluster naming another run's costs.json as measured_costs.
# --force: run on fewer than 16 cores, where 8 ranks time the oversubscription, not the schedules.
# Uses .venv/bin/megatron-bitpipe when present, else megatron-bitpipe on PATH ($MEGATRON_BITPIPE
# overrides both).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

CORES_NEEDED=16
SCHEDULES=megatron-1f1b,1f1b,interleaved-1f1b,megatron-interleaved,zb-h1,v-half,v-zb,bitpipe,bitpipe-zb
OUT=bed
CLUSTER=()
FORCE=0

while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --out|--cluster)
            if [ $# -lt 2 ]; then echo "bed.sh: $1 needs a value" >&2; exit 2; fi
            if [ "$1" = --out ]; then OUT=$2; else CLUSTER=(--cluster "$2"); fi
            shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bed.sh: unknown argument $1 (give --out DIR, --cluster FILE, --force)" >&2; exit 2 ;;
    esac
    shift
done

cores=$(nproc)
if [ "$cores" -lt "$CORES_NEEDED" ] && [ "$FORCE" -eq 0 ]; then
    echo "bed.sh: this machine has $cores cores, the 8-rank bed needs $CORES_NEEDED (8 ranks x 2 threads); give --force to run it anyway" >&2
    exit 2
fi

if [ -n "${MEGATRON_BITPIPE:-}" ]; then
    BIN=$MEGATRON_BITPIPE
elif [ -x .venv/bin/megatron-bitpipe ]; then
    BIN=.venv/bin/megatron-bitpipe
elif command -v megatron-bitpipe >/dev/null 2>&1; then
    BIN=megatron-bitpipe
else
    echo "bed.sh: no megatron-bitpipe (.venv/bin/ or on PATH): install the package first (README, Quick start)" >&2
    exit 2
fi

status=0
done_n=()
for N in 16 32; do
    echo "bed.sh: N=$N -> $OUT/n$N" >&2
    # --repeat and --cluster are bench's; the rest goes to the trainer, the virtual size to the
    # schedules that take one (interleaved-1f1b, megatron-interleaved)
    if ! "$BIN" bench --nproc-per-node 8 --pipeline-schedule "$SCHEDULES" --out "$OUT/n$N" \
        --repeat 3 ${CLUSTER[@]+"${CLUSTER[@]}"} \
        --pipeline-model-parallel-size 8 --virtual-pipeline-model-parallel-size 2 \
        --num-layers 16 --hidden-size 512 --num-attention-heads 8 --seq-length 256 \
        --max-position-embeddings 256 --vocab-size 256 --micro-batch-size 1 \
        --global-batch-size "$N" --train-iters 6; then
        echo "bed.sh: bench N=$N failed" >&2
        status=1
    else
        done_n+=("$N")
    fi
done

for N in ${done_n[@]+"${done_n[@]}"}; do
    printf '\n== %s (N=%s)\n' "$OUT/n$N/bench.md" "$N"
    cat "$OUT/n$N/bench.md"
done
exit "$status"
