#!/usr/bin/env bash
# The CUDA path in one short script, for a session that is lent a GPU (see DEVELOPERS.md):
#  1. the bundled example on NCCL through the launcher (stage 2, a few steps);
#  2. bf16 throughput and MFU of a ~1B GPT: plain PyTorch vs shardwise stages 0-3;
#  3. tokens/s of the example GPT at tensor parallel 2 and pipeline 2 vs data parallel 2 (2+ GPUs).
# Usage: bash benchmarks/gpu_check.sh   (assumes `make setup` ran, or a venv with torch + shardwise)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())"
echo "== 1. example, ZeRO-2 over NCCL, 1 rank"
$PY -c "from shardwise.cli import main; raise SystemExit(main())" run --nproc-per-node 1 \
    examples/gpt/train.py --config examples/gpt/ds_zero2.json --steps 20 --log-every 10 --metrics-csv ''
echo "== 1b. example, ZeRO-3 (zero.Init) over NCCL, 1 rank"
$PY -c "from shardwise.cli import main; raise SystemExit(main())" run --nproc-per-node 1 \
    examples/gpt/train.py --config examples/gpt/ds_zero3.json --steps 20 --log-every 10 --metrics-csv ''
echo "== 2. ~1B GPT, bf16, plain vs shardwise"
$PY -c "from shardwise.cli import main; raise SystemExit(main())" run --nproc-per-node 1 \
    benchmarks/gpu_bench.py "$@"
echo "== 3. example GPT (~110M, bf16) tokens/s at dp 2 vs tp 2 vs pp 2 (same global batch)"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 2 ]; then
    echo "skipped: $NGPU GPU(s) here; tensor and pipeline parallelism need 2"
else
    for mesh in dp2 tp2 pp2; do
        $PY -c "from shardwise.cli import main; raise SystemExit(main())" run --nproc-per-node 2 \
            benchmarks/parallel_memory.py --throughput "$mesh" || echo "$mesh: FAILED (exit $?)"
    done
fi
