#!/usr/bin/env bash
# Run the fault matrix (tests/integration/test_faults.py) N times in a row (default 5), stopping at
# the first failure; prints each fault's time to converge. Usage: tests/run_fault_matrix.sh [N]
set -uo pipefail
cd "$(dirname "$0")/.."
make -s .venv/.installed-stamp
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
runs="${1:-5}"
log="$(mktemp)"
for run in $(seq 1 "$runs"); do
  echo "== fault matrix run $run of $runs"
  .venv/bin/python -m pytest tests/integration/test_faults.py -q -s -p no:cacheprovider >"$log" 2>&1
  rc=$?
  grep -E "^fault |passed|failed" "$log"
  if [ "$rc" -ne 0 ]; then
    tail -60 "$log"
    echo "run $run failed (log: $log)"
    exit 1
  fi
done
echo "fault matrix: $runs runs in a row passed"
