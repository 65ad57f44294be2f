#!/usr/bin/env bash
# Everything a session with one lent GPU runs for docs/results.md, in one call of at most ~9 minutes:
#   1. throughput of the full-width recipe (ResNet-18 width 64, batch 128, bf16): step vs bare forward/backward,
#      the data pipeline, DirectPred's update, eigh up to d = 4096 (benchmarks/throughput.py, as gpu_check.sh);
#   2. two sweeps sharing the GPU (small networks leave most of it idle):
#      - sweeps/gpu/cifar10_fullwidth.yaml: full-width DirectPred vs linear vs MLP predictor (1 seed, 5 epochs);
#      - sweeps/gpu/cifar10_predictors_authors.yaml: the CPU-scale predictor comparison under the authors' protocol
#        (ResNet-18 width 16, random target init, 7 predictors x 3 seeds, 2 epochs) in fp32, 7 runs at a time;
#   3. their reports, packed with the runs' summaries and metrics (no checkpoints) into DEST/results.tgz.
# A deadline (BUDGET seconds from the start, default 470) stops the sweeps with SIGTERM (each run checkpoints), so
# the reports of whatever finished always come back; rerunning the script resumes the sweeps.
# Usage (repository root):  bash benchmarks/gpu_session.sh [DATA] [DEST]
#   DATA: the CIFAR-10 mirror archive (default ../shared/data/cifar10-jpeg.tar.gz); DEST: default $OUT or /tmp/gpu_session
# Without CUDA it runs at tiny sizes on the CPU (a check of the script, not a measurement).
set -uo pipefail
DATA=${1:-../shared/data/cifar10-jpeg.tar.gz}
DEST=${2:-${OUT:-/tmp/gpu_session}}
BUDGET=${BUDGET:-470}
PY=${PYTHON:-$(command -v python3 || command -v python)}
START=$(date +%s)
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATASET=(--set data.dataset=folder --set "data.path=$DATA")
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  THR=(--device cuda --steps 30 --eigh-dims 128,256,512,1024,2048,4096 --set backbone.width=64 --set train.precision=bf16)
  FULL=(--devices auto --jobs 3)
  SMALL=(--devices auto --jobs 7 --set train.precision=fp32)
else
  echo "gpu_session: no CUDA device; running at tiny sizes on the CPU"
  TINY=(--set backbone.width=4 --set projector.hidden_dim=32 --set train.batch_size=32 --set data.train_subset=256
        --set data.test_subset=100 --set eval.knn_k=10 --set eval.linear_epochs=2 --set train.epochs=1)
  THR=(--device cpu --steps 2 --eigh-dims 128 "${TINY[@]}")
  FULL=(--devices cpu "${TINY[@]}")
  SMALL=(--devices cpu "${TINY[@]}")
fi
"$PY" -c "import torch, directpred, subprocess; print('torch', torch.__version__, '| commit',
  subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip())"

echo "== 1. throughput (full-width recipe) =="
"$PY" benchmarks/throughput.py --config configs/cifar10/byol_directpred.yaml --warmup 3 "${DATASET[@]}" "${THR[@]}" \
  --predictors directpred_freq1,linear,mlp --out "$DEST/throughput.json" || echo "throughput failed"

echo "== 2. sweeps (deadline $BUDGET s after the start) =="
"$PY" -m directpred sweep sweeps/gpu/cifar10_fullwidth.yaml --out "$DEST/fullwidth" "${DATASET[@]}" "${FULL[@]}" \
  > "$DEST/fullwidth.log" 2>&1 &
P1=$!
"$PY" -m directpred sweep sweeps/gpu/cifar10_predictors_authors.yaml --out "$DEST/cpuscale" "${DATASET[@]}" "${SMALL[@]}" \
  > "$DEST/cpuscale.log" 2>&1 &
P2=$!
while kill -0 $P1 2>/dev/null || kill -0 $P2 2>/dev/null; do
  if (( $(date +%s) - START > BUDGET )); then
    echo "deadline: stopping the sweeps (runs checkpoint and can be resumed)"
    kill -TERM $P1 $P2 2>/dev/null
    wait $P1 $P2
    break
  fi
  sleep 5
done
wait $P1 $P2 2>/dev/null

echo "== 3. reports =="
for s in fullwidth cpuscale; do
  f=$([ $s = fullwidth ] && echo sweeps/gpu/cifar10_fullwidth.yaml || echo sweeps/gpu/cifar10_predictors_authors.yaml)
  "$PY" -m directpred sweep "$f" --out "$DEST/$s" --report "${DATASET[@]}" >/dev/null 2>&1 || true
  echo "--- $s"; tail -n 40 "$DEST/$s.log" | grep -E "finished|failed|resum|start" | tail -n 5
  cat "$DEST/$s/results.md" 2>/dev/null
done
(cd "$DEST" && tar czf results.tgz --exclude='*.pt' --exclude='tensorboard' throughput.json fullwidth cpuscale \
  fullwidth.log cpuscale.log 2>/dev/null)
echo "gpu_session: $(( $(date +%s) - START )) s; results in $DEST/results.tgz"
