#!/bin/sh
# The long form of tests/faults/test_heartbeat_exit.py, run by hand (not in `make test`):
#   tests/faults/heartbeat_scripts/hb_stress.sh [JOBS=200] [FRESH_JOBS=20] [OUT]
# JOBS forked 2-rank jobs, each rank on its own UTS host name with the heartbeat running, then
# FRESH_JOBS jobs whose ranks are fresh interpreters under `unshare --uts` (slow: two interpreter
# start-ups a job), then FRESH_JOBS jobs under torchrun on one host (the heartbeat runs on one
# host too). Prints one JSON summary per part; exits non-zero if any rank did not exit cleanly.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
JOBS=${1:-200}
FRESH=${2:-20}
OUT=${3:-$(mktemp -d /tmp/hb-stress.XXXXXX)}
grep -m1 "model name" /proc/cpuinfo; nproc --all
export OMP_NUM_THREADS=1
rc=0
mkdir -p "$OUT"
"$PY" "$HERE/hb_jobs.py" "$JOBS" "$OUT/forked" --mode min > "$OUT/forked.log" || rc=1
tail -n 5 "$OUT/forked.log"
[ "$FRESH" -gt 0 ] || exit $rc
"$PY" "$HERE/hb_jobs.py" "$FRESH" "$OUT/fresh" --mode min --fresh > "$OUT/fresh.log" || rc=1
tail -n 5 "$OUT/fresh.log"
bad=0
i=0
while [ $i -lt "$FRESH" ]; do
  i=$((i + 1))
  d="$OUT/torchrun/job$i"; mkdir -p "$d"
  (cd "$d" && timeout 120 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
      "$HERE/hb_torchrun_rank.py" > out 2> err)
  code=$?
  if [ $code -ne 0 ] || grep -q "terminate called" "$d/err"; then
    bad=$((bad + 1)); echo "torchrun job $i: exit $code"; grep -E "terminate called|exitcode" "$d/err" | head -3
  fi
done
echo "{\"torchrun_jobs\": $FRESH, \"bad_jobs\": $bad}"
[ $bad -eq 0 ] || rc=1
exit $rc
