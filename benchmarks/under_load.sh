#!/usr/bin/env bash
# Throughput on a shared machine: `posttrain demo --quick` alone, then beside one busy
# process (a pure-Python spin loop holding one core), with the thread governor on (default)
# and off (POSTTRAIN_THREADS=fixed: the start-up thread count throughout).
# usage: bash benchmarks/under_load.sh [OUT_DIR]     (about 15 minutes on 2 cores)
set -euo pipefail
out=${1:-/tmp/under-load}
mkdir -p "$out"
run() {  # label, env...
  local label=$1; shift
  rm -rf "$out/$label"
  local t0=$SECONDS
  env "$@" posttrain demo --quick --output-dir "$out/$label" >"$out/$label.log" 2>&1
  echo "$label $((SECONDS - t0)) s"
}
run alone POSTTRAIN_THREADS=auto
python3 -c "while True: pass" & spin=$!
trap 'kill $spin' EXIT
run loaded POSTTRAIN_THREADS=auto
run loaded-fixed POSTTRAIN_THREADS=fixed
