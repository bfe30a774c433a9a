#!/usr/bin/env bash
# The CUDA path in one prepared run for a lent GPU (one H200: under 8 minutes). Writes ONE report,
# gpu_report.json + gpu_report.md (+ this script's gpu_check.log), into $OUT when set (the device
# tool's folder), else benchmarks/. What it measures: benchmarks/gpu_report.py's docstring.
#
#   here, once:   bash benchmarks/gpu_wheels.sh          (pydantic & co. for Python 3.12 into .whl/)
#   on the GPU:   bash benchmarks/gpu_check.sh           (device run: carry [".whl"], timeout_s 540)
#   here, on CPU: bash benchmarks/gpu_check.sh --cpu-dry-run   (tiny sizes, gloo: the same code paths)
#
# Time budget (seconds; the guards below enforce it; GPU_CHECK_LIMIT_S, default 470, is the whole run's):
#   setup (python, torch, wheels, import check)      ~20  hard: 25 s per install step
#   gpu_report.py parts (each guarded, own budget)   420  parity 60, collectives 10, checkpoint_rng 20,
#                                                         throughput 180, offload 90, launcher 60
#                                                         (less when setup took longer: what is left - 30)
#                 + imports and CUDA start            ~15  hard: the report is killed at the limit - 5
#   tensor / pipeline parallel (2+ GPUs only)         0    skipped on one GPU; run only with 95 s left
#   total                                            <= 470 (8 min = 480)
# Installs: shardwise itself from this tree (PYTHONPATH=src, no pip); torch: the project's pin
# (Makefile) from .whl/ when a torch-<pin>-*.whl is there, else the machine's own CUDA torch (its
# version goes into the report beside the pin); missing pure-Python deps from .whl/ (--no-index).
# Extra arguments go to gpu_report.py (--cpu-dry-run, --parts a,b, --budget-s N).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
LIMIT=${GPU_CHECK_LIMIT_S:-470}
OUTDIR=${OUT:-benchmarks}
WHEELS=${WHEELS:-.whl}
SITE=${GPU_SITE:-/tmp/shardwise_gpu_site}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
log() { echo "[gpu_check $((SECONDS - T0))s] $*" | tee -a "$LOG"; }
DRY=0
for a in "$@"; do [ "$a" = "--cpu-dry-run" ] && DRY=1; done

# -- setup 1: the interpreter (PY, else the venv when its torch sees CUDA, else the machine's python3)
if [ -z "${PY:-}" ]; then
    PY=python3
    if [ -x .venv/bin/python ] && { [ "$DRY" = 1 ] || .venv/bin/python -c \
            "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }; then
        PY=.venv/bin/python
    fi
fi
log "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

# -- setup 2: torch (the pin when its wheel is here, else what the machine has)
PIN=$(sed -n 's/.*torch==\([0-9][0-9a-z.+]*\).*/\1/p' Makefile | head -1)
HAVE=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)
mkdir -p "$SITE"
export PYTHONPATH="$PWD/src:$PWD/examples/gpt:$SITE${PYTHONPATH:+:$PYTHONPATH}"
TW=$(ls "$WHEELS"/torch-"$PIN"-*.whl 2>/dev/null | head -1 || true)
if [ "${HAVE%%+*}" = "$PIN" ]; then
    log "torch $HAVE: the project's pin"
elif [ -n "$TW" ]; then
    log "torch $HAVE here, installing the pin from $TW"
    timeout 25 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$TW" 2>&1 | tee -a "$LOG" || log "torch wheel install FAILED: using torch $HAVE"
    if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        log "the pinned torch does not see CUDA here: back to the machine's torch $HAVE"
        rm -rf "$SITE/torch" "$SITE"/torch-*
    fi
else
    log "torch $HAVE (project pin $PIN: no torch-$PIN wheel in $WHEELS/, so the machine's own build; recorded in the report)"
fi

# -- setup 3: pure-Python dependencies the machine lacks, from the wheels folder
MISSING=$("$PY" - <<'EOF'
import importlib.metadata as m
need = {"pydantic": 2, "numpy": 1, "tqdm": 4, "safetensors": 0}
out = []
for name, major in need.items():
    try:
        if int(m.version(name).split(".")[0]) < major:
            out.append(name)
    except m.PackageNotFoundError:
        out.append(name)
print(" ".join(out))
EOF
)
if [ -n "$MISSING" ]; then
    WH=$(ls "$WHEELS"/*.whl 2>/dev/null | grep -v "/torch-" || true)
    if [ -z "$WH" ]; then
        log "missing: $MISSING and no wheels in $WHEELS/ (run benchmarks/gpu_wheels.sh here and carry .whl)"
    else
        log "missing: $MISSING; installing $(echo "$WH" | wc -l) wheel(s) from $WHEELS/ into $SITE"
        # shellcheck disable=SC2086
        timeout 25 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" $WH 2>&1 | tee -a "$LOG" || log "wheel install FAILED"
    fi
fi
if ! "$PY" -c "import shardwise, torch; print('shardwise from', shardwise.__file__, '| torch', torch.__version__, \
        '| cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"; then
    log "shardwise does not import: the report cannot run"
    exit 3
fi
log "setup done"

# -- the report (its own parts, guards and budgets; hard limit here)
LEFT=$((LIMIT - (SECONDS - T0)))
BUDGET=$((LEFT - 30))
[ "$BUDGET" -gt 420 ] && BUDGET=420
[ "$BUDGET" -lt 10 ] && BUDGET=10
log "gpu_report: parts budget $BUDGET s, hard stop in $((LEFT - 5)) s"
PYTHONUNBUFFERED=1 timeout -k 5 $((LEFT - 5)) "$PY" benchmarks/gpu_report.py --out "$OUTDIR" --budget-s "$BUDGET" "$@" \
    2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
case $RC in
    0) log "gpu_report: every part passed" ;;
    124|137) log "gpu_report: stopped at the time limit; the report holds the parts that finished" ;;
    *) log "gpu_report: exit $RC (a part failed or was skipped: see the report)" ;;
esac

# -- tensor / pipeline parallel throughput (needs 2 GPUs; 0 s on one)
NGPU=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['env']['device_count'])" \
    "$OUTDIR/gpu_report.json" 2>/dev/null || echo 0)  # what the report saw (no second CUDA start)
if [ "$DRY" = 0 ] && [ "$NGPU" -ge 2 ] && [ $((LIMIT - (SECONDS - T0))) -ge 95 ]; then
    for mesh in dp2 tp2 pp2; do
        log "parallel_memory --throughput $mesh"
        timeout 30 "$PY" -c "from shardwise.cli import main; raise SystemExit(main())" run --nproc-per-node 2 \
            benchmarks/parallel_memory.py --throughput "$mesh" 2>&1 | tee -a "$LOG" || log "$mesh: FAILED"
    done
else
    log "tensor / pipeline parallel step skipped: $NGPU GPU(s) (needs 2)"
fi
log "report: $OUTDIR/gpu_report.json, $OUTDIR/gpu_report.md; log: $LOG (total $((SECONDS - T0)) s)"
exit "$RC"
