#!/usr/bin/env bash
# Two pipeline ranks on one GPU under NCCL (issue 15, part 4): one PASS/FAIL/SKIP line per run.
#
# 1. Prints the NCCL version torch ships (torch.cuda.nccl.version()).
# 2. NCCL >= 2.30 is needed (NCCL_MULTI_RANK_GPU_ENABLE). When torch's is older, builds NCCL from
#    the source tree at NCCL_SRC (default .nccl-src; `--help` says how to provide it) for this
#    GPU's architecture into NCCL_CACHE, or reuses that build, and preloads its libnccl.so.2 in
#    place of torch's. No source, no nvcc, a failed build or a preload torch ignores: SKIP.
# 3. Runs scripts/gpu_multirank_check.py: bitpipe, chimera, v-zb and interleaved-1f1b at PP=2 with
#    both ranks on GPU 0, with CUDA_DEVICE_MAX_CONNECTIONS=1 and unset, NCCL_BUFFSIZE below the
#    message size; losses against PP=1; every launch under `timeout` (a hang is a FAIL).
#
# Python and megatron-core as in scripts/gpu_check.sh (PYTHON, default python3; .whl/ wheels).
# --dry-run prints the NCCL decision and every launch without a GPU; --build-only stops after
# step 2 (the build can take minutes: a separate call on a warm machine). The other options go to
# the Python script. Exit status 1 when a run fails, 0 otherwise (SKIP included).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
NCCL_SRC=${NCCL_SRC:-.nccl-src}
NCCL_CACHE=${NCCL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/megatron-bitpipe/nccl}
NCCL_BUILD_TIMEOUT=${NCCL_BUILD_TIMEOUT:-1200}
NCCL_MINIMUM=2.30
WHAT="2 ranks on one GPU under NCCL"

usage() {
  cat <<EOF
usage: scripts/gpu_multirank_check.sh [--dry-run] [--build-only] [--cpu] [--logs DIR]
                                      [--schedules LIST] [--connections 1,default] [--timeout S]

Needs NCCL >= $NCCL_MINIMUM. Where torch ships an older one, the NCCL source (tag v2.30.3-1 or
later of github.com/NVIDIA/nccl) must be at NCCL_SRC (now: $NCCL_SRC); the GPU machine needs no
network, only nvcc. Put it there from a clone or mirror:
  mkdir -p .nccl-src && git -C MIRROR archive v2.30.3-1 | tar -x -C .nccl-src
  or: git clone --depth 1 --branch v2.30.3-1 https://github.com/NVIDIA/nccl .nccl-src
The source of v2.30.3-1 is 8 MB (1.5 MB as tar.gz). The build (make src.build for this GPU's
architecture, or NCCL_GENCODE) goes to NCCL_CACHE/VERSION-smARCH (now: $NCCL_CACHE) and is
reused from there; NCCL_BUILD_TIMEOUT (now: $NCCL_BUILD_TIMEOUT s) bounds it.

Environment: PYTHON, NCCL_SRC, NCCL_CACHE, NCCL_GENCODE, NCCL_BUILD_TIMEOUT, CUDA_HOME, and for
--dry-run TORCH_NCCL (the NCCL version to assume torch ships, or none). torch 2.15.0's CUDA build
from the package index ships NCCL 2.30.7: no build needed there.
EOF
}

dry_run=0
build_only=0
cpu=0
for argument in "$@"; do
  case $argument in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --build-only) build_only=1 ;;
    --cpu) cpu=1 ;;
  esac
done
forwarded=()
for argument in "$@"; do
  [ "$argument" = --build-only ] || forwarded+=("$argument")
done

# shellcheck source=scripts/megatron_core_env.sh
source scripts/megatron_core_env.sh

probe() {
  "$PYTHON" - <<'EOF'
import torch

try:
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
except (AttributeError, RuntimeError):
    nccl = "none"
arch = "%d%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "none"
print(torch.__version__, nccl, arch)
EOF
}

at_least() {
  [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1)" = "$2" ]
}

skip() {
  echo "SKIP $WHAT: $1"
  exit 0
}

read -r torch_version torch_nccl arch <<<"$(probe)"
if [ "$dry_run" = 1 ] && [ -n "${TORCH_NCCL:-}" ]; then
  torch_nccl=$TORCH_NCCL  # a dry run as if torch shipped this NCCL (a version, or none)
fi
if [ -z "${torch_version:-}" ]; then
  echo "FAIL $WHAT: $PYTHON cannot import torch"
  exit 1
fi
echo "gpu_multirank_check: torch $torch_version ships NCCL $torch_nccl"
if [ "$torch_nccl" = none ]; then
  torch_has="torch has no NCCL"
else
  torch_has="torch's NCCL $torch_nccl is older than $NCCL_MINIMUM"
fi

run_checks() {
  if [ "$build_only" = 1 ]; then
    exit 0
  fi
  exec "$PYTHON" scripts/gpu_multirank_check.py "${forwarded[@]}"
}

if [ "$cpu" = 1 ]; then
  run_checks
fi
if [ "$arch" = none ]; then
  if [ "$dry_run" = 0 ]; then
    skip "no CUDA device here"
  fi
  arch=90
  echo "gpu_multirank_check: dry run without a GPU: architecture sm_$arch assumed"
fi
if [ "$torch_nccl" != none ] && at_least "$torch_nccl" "$NCCL_MINIMUM"; then
  echo "gpu_multirank_check: torch's NCCL $torch_nccl is >= $NCCL_MINIMUM: no build needed"
  run_checks
fi

version_file=$NCCL_SRC/makefiles/version.mk
if [ ! -f "$version_file" ]; then
  usage >&2
  skip "$torch_has and there is no NCCL source at $NCCL_SRC (see the usage above)"
fi
source_version=$(awk '$1 ~ /^NCCL_(MAJOR|MINOR|PATCH)$/ { print $3 }' "$version_file" | paste -sd .)
if ! at_least "$source_version" "$NCCL_MINIMUM"; then
  skip "$torch_has and the source at $NCCL_SRC is NCCL $source_version, older too"
fi
gencode=${NCCL_GENCODE:-"-gencode=arch=compute_$arch,code=sm_$arch"}
build=$NCCL_CACHE/$source_version-sm$arch
library=$build/lib/libnccl.so.2
if [ -z "${CUDA_HOME:-}" ]; then
  for candidate in /usr/local/cuda $(compgen -G "/usr/local/cuda-*" | sort -rV); do
    if [ -x "$candidate/bin/nvcc" ]; then
      CUDA_HOME=$candidate
      break
    fi
  done
fi
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
make_command=(make -C "$NCCL_SRC" -j"$(nproc)" src.build BUILDDIR="$build.partial"
  NVCC_GENCODE="$gencode" CUDA_HOME="$CUDA_HOME")

if [ "$dry_run" = 1 ]; then
  if [ -e "$library" ]; then
    echo "gpu_multirank_check: would reuse $library (NCCL $source_version)"
  else
    echo "gpu_multirank_check: would build NCCL $source_version: timeout $NCCL_BUILD_TIMEOUT ${make_command[*]}"
  fi
  echo "gpu_multirank_check: would preload LD_PRELOAD=$library"
  run_checks
fi

if [ -e "$library" ]; then
  echo "gpu_multirank_check: reusing $library (NCCL $source_version)"
else
  if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    skip "$torch_has and there is no nvcc (CUDA_HOME=$CUDA_HOME) to build $NCCL_SRC"
  fi
  mkdir -p "$NCCL_CACHE"
  rm -rf "$build.partial"
  echo "gpu_multirank_check: building NCCL $source_version for sm_$arch into $build (log: $build.log)"
  started=$SECONDS
  if ! timeout "$NCCL_BUILD_TIMEOUT" "${make_command[@]}" >"$build.log" 2>&1 || [ ! -e "$build.partial/lib/libnccl.so.2" ]; then
    echo "gpu_multirank_check: the build's last lines:"
    tail -n 20 "$build.log"
    skip "building NCCL $source_version from $NCCL_SRC failed or passed $NCCL_BUILD_TIMEOUT s (log: $build.log)"
  fi
  rm -rf "$build"
  mv "$build.partial" "$build"
  echo "gpu_multirank_check: built in $((SECONDS - started)) s"
fi

export LD_PRELOAD=$library${LD_PRELOAD:+:$LD_PRELOAD}
read -r _ preloaded_nccl _ <<<"$(probe)"
if [ "$preloaded_nccl" = none ] || ! at_least "$preloaded_nccl" "$NCCL_MINIMUM"; then
  skip "preloading $library left torch on NCCL $preloaded_nccl (torch may link NCCL statically)"
fi
echo "gpu_multirank_check: torch now runs NCCL $preloaded_nccl from $library"
run_checks
