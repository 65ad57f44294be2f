#!/usr/bin/env bash
# The ImageNet recipes' training step on one GPU (ResNet-50 at 224, bf16 autocast on CUDA), so that docs/imagenet.md's
# "what one needs" rests on a measured step and not on published supervised figures alone: benchmarks/throughput.py
# on each configs/imagenet/ config's own predictor (DirectPred, the two-layer MLP, the SGD linear predictor) at the
# per-GPU batch the config gives (60 epochs: 32 a GPU, asymmetric loss, SGD; 300 epochs: 128 a GPU, symmetric
# loss, LARS), on random 224-px images in memory (--synthetic: the step and its bare forward/backward, not the data
# path, which benchmarks/stream_throughput.py measures), and DirectPred's update at d = 256.
# About 3 minutes on one H100/H200. Without CUDA it runs at batch 4 and 1 timed step on the CPU (a check of the
# script, not a measurement: about 3 minutes on 2 cores).
# Usage (repository root):  bash benchmarks/gpu_imagenet_step.sh [OUT]   (default $OUT or /tmp/gpu_imagenet_step)
set -uo pipefail
DEST=${1:-${OUT:-/tmp/gpu_imagenet_step}}
mkdir -p "$DEST"
source "$(dirname "$0")/gpu_env.sh"
if "$PY" -c "import gc, sys, torch; gc.freeze(); sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEV=cuda; STEPS=20; WARMUP=5; BATCH=()
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  echo "gpu_imagenet_step: no CUDA device; a check of the script at batch 4 on the CPU"
  DEV=cpu; STEPS=1; WARMUP=1; BATCH=(--set train.batch_size=4)
fi
echo "source digest: $("$PY" benchmarks/source_digest.py)"
# data.path only passes validation: --synthetic trains on random images in memory
for recipe in 60ep 300ep; do
  for pred in directpred:directpred_freq1 mlp:mlp linear:linear; do
    cfg=configs/imagenet/byol_${pred%%:*}_$recipe.yaml
    echo "== $cfg =="
    "$PY" benchmarks/throughput.py --config "$cfg" --device $DEV --synthetic --steps $STEPS --warmup $WARMUP \
      --set data.path=. "${BATCH[@]}" --predictors "${pred##*:}" --eigh-dims "$([[ $pred == directpred* ]] && echo 256)" \
      --out "$DEST/imagenet_${pred%%:*}_$recipe.json" || fail "$cfg"
  done
done
"$PY" - "$DEST" <<'PY'
import json, pathlib, sys
print("\n== gpu_imagenet_step summary (images/s of the step; bare: forward + backward of both views) ==")
for f in sorted(pathlib.Path(sys.argv[1]).glob("imagenet_*.json")):
    t = json.loads(f.read_text())
    for name, r in t["steps"].items():
        extra = f", DirectPred's update {1e3 * r['predictor_update_s']:.2f} ms" if "predictor_update_s" in r else ""
        print(f"{f.stem[9:]:18s} batch {t['batch_size']:4d} {t['precision']:9s} step {r['step_images_per_s']:8.1f}"
              f"  bare {r['bare_images_per_s']:8.1f}{extra}  ({t['device']})")
PY
