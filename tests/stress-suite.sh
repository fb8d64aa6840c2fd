#!/usr/bin/env bash
# The default suite N times (default 10) with `stress-ng --cpu 2` beside it: issue 12's check that no test's
# verdict depends on the machine's load. One line per run in OUT/summary.txt, each run's output in OUT/run-K.log.
#   tests/stress-suite.sh [RUNS] [OUT]      (needs Debian's stress-ng, and what the suite needs)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
runs=${1:-10}
out=${2:-stress-runs}
mkdir -p "$out"
: >"$out/summary.txt"
failed=0
for i in $(seq 1 "$runs"); do
  stress-ng --cpu 2 --timeout 900s >/dev/null 2>&1 &
  stress=$!
  start=$(date +%s)
  .venv/bin/python -m pytest -q >"$out/run-$i.log" 2>&1
  rc=$?
  kill "$stress" 2>/dev/null
  wait "$stress" 2>/dev/null
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  echo "run $i: exit $rc in $(($(date +%s) - start)) s: $(tail -n 1 "$out/run-$i.log")" | tee -a "$out/summary.txt"
done
echo "$((runs - failed)) of $runs green" | tee -a "$out/summary.txt"
[ "$failed" -eq 0 ]
