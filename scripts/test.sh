#!/usr/bin/env bash
# The test command: sets up each lane's venv on a fresh machine, then runs the suite (CPU only).
#
#   bash scripts/test.sh [--lane oldest|newest] [--fast | --full] [pytest arguments]
#
# Lanes (scripts/setup_env.sh): oldest = Python 3.11, torch 2.13, megatron-core 0.16.1;
# newest = Python 3.12, the newest torch, megatron-core 0.19.2. Without --lane both run, oldest
# first, and the command fails if either fails.
#
# What runs: the newest lane runs the whole suite. To keep both lanes under CI's 40 minutes on two
# cores, the oldest lane leaves out the tests that start processes (marker multiprocess) except
# every schedule's equivalence with one process at four layouts (OLDEST_EQUIVALENCE) and the
# Megatron-LM runs; --full runs everything in both lanes. --fast leaves out every test that starts
# processes or needs a Megatron-LM checkout (markers multiprocess, megatron_lm), in the oldest
# lane unless --lane names one. Pytest arguments replace the selection (e.g. -k megatron_lm).
#
# The Megatron-LM tests run against MEGATRON_LM_PATH_OLDEST (a core_v0.16.1 checkout) and
# MEGATRON_LM_PATH_NEWEST (core_v0.19.0); MEGATRON_LM_PATH serves a lane whose release it is,
# and they skip, saying so, otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
lanes=()
pytest_args=()
selection=split
while [ $# -gt 0 ]; do
  case "$1" in
    --lane) lanes=("$2"); shift 2 ;;
    --lane=*) lanes=("${1#--lane=}"); shift ;;
    --fast) selection=fast; shift ;;
    --full) selection=full; shift ;;
    *) pytest_args+=("$1"); selection=given; shift ;;
  esac
done
# the layouts whose every-schedule equivalence the oldest lane runs by default
OLDEST_EQUIVALENCE="pp2-untied or pp4-overlap or tp2-pp2-sequence-parallel or dp2-pp2-overlap-distributed-optimizer"
# one pytest run per line: the selection of a lane
runs_for() {
  case "$selection/$1" in
    fast/*) echo '-m "not multiprocess and not megatron_lm" tests' ;;
    split/oldest)
      echo '-m "not multiprocess or megatron_lm" tests'
      echo "-m multiprocess tests/test_mcore_equivalence.py -k \"$OLDEST_EQUIVALENCE\""
      ;;
    full/*|split/newest) echo 'tests' ;;
  esac
}
if [ ${#lanes[@]} -eq 0 ]; then
  if [ "$selection" = fast ]; then lanes=(oldest); else lanes=(oldest newest); fi
fi
failed=()
for lane in "${lanes[@]}"; do
  case "$lane" in
    oldest) venv=.venv; checkout=${MEGATRON_LM_PATH_OLDEST:-${MEGATRON_LM_PATH:-}} ;;
    newest) venv=.venv-newest; checkout=${MEGATRON_LM_PATH_NEWEST:-${MEGATRON_LM_PATH:-}} ;;
    *) echo "test.sh: unknown lane '$lane' (oldest or newest)" >&2; exit 2 ;;
  esac
  bash scripts/setup_env.sh "$lane"
  echo "== lane $lane: $("$venv/bin/python" -c 'import sys, torch; from megatron.core import package_info as p; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {p.__version__}")' 2>/dev/null)"
  if [ "$selection" = given ]; then
    paths=()
    for arg in "${pytest_args[@]}"; do [ -e "${arg%%::*}" ] && paths+=("$arg"); done
    [ ${#paths[@]} -gt 0 ] || pytest_args+=(tests)
    MEGATRON_LM_PATH=$checkout "$venv/bin/python" -m pytest -q "${pytest_args[@]}" || failed+=("$lane")
    continue
  fi
  while read -r run; do
    eval "set -- $run"
    MEGATRON_LM_PATH=$checkout "$venv/bin/python" -m pytest -q "$@" || { failed+=("$lane"); break; }
  done < <(runs_for "$lane")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "test.sh: failed lanes: ${failed[*]}" >&2
  exit 1
fi
