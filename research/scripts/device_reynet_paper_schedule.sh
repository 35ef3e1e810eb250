#!/usr/bin/env bash
# One call on a lent GPU machine (see results/reynet_supplementary_paper_schedule/PURPOSE.md):
#   1. the ReyNet/IEGN layer benchmark on the GPU (wall-clock time of synchronised steps, batch 2 and 16);
#   2. ReyNet vs IEGN on NCI109 under the paper's schedule (lr 1e-4, x0.7 every 20 epochs, at most 99 epochs), one
#      process per outer fold on the GPU, all stopping before one wall-clock budget, then merged at a common epoch.
# Usage: bash research/scripts/device_reynet_paper_schedule.sh DATA_DIR OUT_DIR TOTAL_SECONDS
# DATA_DIR holds graphs/NCI109/NCI109.txt; TOTAL_SECONDS bounds the whole script (the command's time limit minus a
# margin). Writes env.txt, bench_gpu.txt, the merged reynet_graphs_NCI109.json, folds.tar.gz (every fold's JSON and
# log) and run.log to OUT_DIR.
set -u
DATA=$1
OUT=$2
TOTAL=${3:-540}
T0=$(date +%s)
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu: a local smoke test of this script
export OMP_NUM_THREADS=1 TQDM_DISABLE=1 PYTHONPATH="$PWD:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== layer benchmark $(date -u +%T)"
timeout 150 $PY benchmarks/bench_reynet.py --layers-only --layer-batch 2,16 --device "$DEVICE" --out "$OUT/bench_gpu.txt" \
  > /dev/null || echo "layer benchmark failed or timed out (rc $?)"

WORK=$(mktemp -d)
LEFT=$(( TOTAL - ($(date +%s) - T0) - 30 ))   # 30 s for the merge and the archive
if (( LEFT < 30 )); then LEFT=30; fi            # every fold runs at least its first epoch anyway
echo "== NCI109 paper schedule, 10 fold processes, budget ${LEFT} s each, $(date -u +%T)"
PIDS=()
for k in 0 1 2 3 4 5 6 7 8 9; do
  $PY -m research.scripts.train_reynet graphs --datasets NCI109 --lr 1e-4 --lr-gamma 0.7 --graph-epochs NCI109=99 \
    --lr-step-epochs NCI109=20 --device "$DEVICE" --folds $k --deadline +$LEFT --data-dir "$DATA" \
    --output-dir "$WORK/fold_$k" > "$WORK/fold_$k.log" 2>&1 &
  PIDS+=($!)
done
wait "${PIDS[@]}"   # not a bare wait: that would also wait for the tee of the log, which never ends
echo "== fold processes done $(date -u +%T)"
grep -h "stopping after\|Error" "$WORK"/fold_*.log | head -20
INPUTS=$(ls -d "$WORK"/fold_* | grep -v '\.log$' | paste -sd,)
$PY -m research.scripts.train_reynet merge-folds --common-epochs --inputs "$INPUTS" --output-dir "$OUT" \
  || echo "merge failed (rc $?)"
tar czf "$OUT/folds.tar.gz" -C "$WORK" .
echo "== done after $(( $(date +%s) - T0 )) s"
