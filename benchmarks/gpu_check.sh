#!/usr/bin/env bash
# GPU check, prepared to finish in under 8 minutes on one H100/H200:
#   1. images/s of the full-width CIFAR recipe (ResNet-18 width 64, batch 128) in bf16, against its bare
#      forward/backward, for DirectPred at freq 1 and 5 (with its update's share at d = 128, the projector's
#      output), the data pipeline on the GPU, and eigh alone up to d = 4096;
#   2. DirectPred's overhead at d = 256;
#   3. a 2-epoch BYOL + DirectPred run on CIFAR-10 with its kNN figure;
#   4. the full-width comparison DirectPred vs linear vs MLP predictor (sweeps/gpu/cifar10_fullwidth.yaml) through
#      `directpred sweep`, with its results table;
#   0. first, the streamed data path's batched nvJPEG decode against Pillow (tests/data/test_stream.py, seconds;
#      on the CPU only its libjpeg-turbo half runs). A failure is reported and the other steps still run.
# Usage (from the repository root):  bash benchmarks/gpu_check.sh [DATA] [OUT]
#   DATA: the CIFAR-10 mirror archive or an ImageFolder directory (default ../shared/data/cifar10-jpeg.tar.gz)
#   OUT:  where results go (default $OUT or /tmp/gpu_check)
# Without CUDA the same steps run at tiny sizes on the CPU (tests/benchmarks/test_benchmarks.py runs that path).
set -euo pipefail
DATA=${1:-../shared/data/cifar10-jpeg.tar.gz}
DEST=${2:-${OUT:-/tmp/gpu_check}}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
# (gc.freeze: the exit skips its collection over what importing torch made, 1-2 s of each one-liner on 2 cores)
if python -c "import gc, sys, torch; gc.freeze(); sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEV=cuda; PREC=bf16; DECODE_IMAGES=512; STEPS=30; EPOCHS=2; DIMS=128,256,512,1024,2048,4096
  SIZE=(--set backbone.width=64)
  SWEEP=(--set train.epochs=2 --devices auto)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
else
  echo "gpu_check: no CUDA device; running the CPU fallback at tiny sizes"
  DEV=cpu; PREC=fp32; DECODE_IMAGES=64; STEPS=2; EPOCHS=1; DIMS=128,256
  SIZE=(--set backbone.width=4 --set projector.hidden_dim=32 --set train.batch_size=32
        --set data.train_subset=512 --set data.test_subset=200 --set eval.knn_k=10)
  SWEEP=(--set train.epochs=1 --set eval.linear_epochs=2 --devices cpu)
fi
DATASET=(--set data.dataset=folder --set "data.path=$DATA" --set train.precision=$PREC)
CFG=configs/cifar10/byol_directpred.yaml

echo "== 0. batched decode path (nvJPEG where CUDA exists) against Pillow, with each JPEG decoder =="
# The device machine reaches no package index: TorchCodec comes from a wheel carried in .gpu_data/ (pip download
# torchcodec --no-deps -d .gpu_data), else only torchvision's decoder is checked.
if ! python -c "import gc, torchcodec.decoders; gc.freeze()" 2>/dev/null; then
  wheel=$(ls .gpu_data/torchcodec-*.whl 2>/dev/null | head -1 || true)
  if [[ -n "$wheel" ]]; then python -m pip install -q --no-deps "$wheel" || true; fi
  python -c "import gc, torchcodec.decoders; gc.freeze()" 2>/dev/null || echo "gpu_check: TorchCodec cannot be imported; its cases skip"
fi
if python -c "import pytest" 2>/dev/null; then
  python -m pytest -q -p no:cacheprovider tests/data/test_stream.py -k "batched or jpeg_backend" \
    || echo "gpu_check: the batched decode test FAILED (see above)"
else
  echo "gpu_check: pytest is not installed; skipping the decode test"
fi
python benchmarks/stream_throughput.py --decode-only --decode-device $DEV --images $DECODE_IMAGES --out "$DEST/decode_$DEV.json" \
  || echo "gpu_check: the batched decode benchmark FAILED (see above)"

echo "== 1. throughput: step vs bare forward/backward, data pipeline (d=128) =="
python benchmarks/throughput.py --config $CFG --device $DEV --steps $STEPS --warmup 3 "${DATASET[@]}" "${SIZE[@]}" \
  --predictors directpred_freq1,directpred_freq5 --eigh-dims $DIMS --out "$DEST/throughput_d128.json"

echo "== 2. DirectPred overhead at d=256 =="
python benchmarks/throughput.py --config $CFG --device $DEV --steps $STEPS --warmup 3 "${DATASET[@]}" "${SIZE[@]}" \
  --set projector.out_dim=256 --predictors directpred_freq1 --eigh-dims "" --out "$DEST/throughput_d256.json"

echo "== 3. $EPOCHS-epoch BYOL + DirectPred, kNN =="
rm -rf "$DEST/knn_run"
python -m directpred train $CFG --out "$DEST/knn_run" "${DATASET[@]}" "${SIZE[@]}" --set train.epochs=$EPOCHS \
  --set eval.knn_every=1 --set eval.linear=false --set train.progress=false
echo "== 4. full-width comparison: directpred sweep sweeps/gpu/cifar10_fullwidth.yaml =="
rm -rf "$DEST/sweep"
python -m directpred sweep sweeps/gpu/cifar10_fullwidth.yaml --out "$DEST/sweep" "${DATASET[@]}" "${SIZE[@]}" \
  "${SWEEP[@]}"
python - "$DEST" <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
t = json.loads((d / "throughput_d128.json").read_text())
t2 = json.loads((d / "throughput_d256.json").read_text())
s = json.loads((d / "knn_run" / "summary.json").read_text())
step = t["steps"]["directpred_freq1"]


def pct(v):  # an accuracy of summary.json / results.json: null (non-finite features, or no finite seed) is nan
    return "nan" if v is None else f"{v:.2f}"


print("\n== gpu_check summary ==")
print(f"device: {t['device']}  precision: {t['precision']}  commit: {t['commit']}")
print(f"bare fwd+bwd {t['limit']['images_per_s']:.0f} img/s; step (DirectPred freq 1) {step['step_images_per_s']:.0f} "
      f"img/s = {step['step_over_limit']:.3f} of the limit; freq 5 {t['steps']['directpred_freq5']['step_images_per_s']:.0f} img/s")
print(f"data pipeline {t['pipeline']['images_per_s']:.0f} img/s = {t['pipeline_over_step']:.2f} x the step")
print(f"DirectPred update: d=128 {1e3 * step['predictor_update_s']:.2f} ms ({100 * step['predictor_update_share_of_step']:.2f}% of step), "
      f"d=256 {1e3 * t2['steps']['directpred_freq1']['predictor_update_s']:.2f} ms")
print("eigh ms by d: " + ", ".join(f"{k}: {1e3 * v:.2f}" for k, v in t["eigh_s"].items()))
dec = d / f"decode_{t['device'].split(':')[0]}.json"
if dec.is_file():
    print("batched JPEG decode + resize to 256 (img/s): " + ", ".join(
        f"{k.split('_')[2]} {v:.0f}" for k, v in json.loads(dec.read_text())["batched_decode"].items()))
print(f"{s['epochs']:g}-epoch run: kNN top-1 {pct(s['knn_top1'])}%, {s['images_per_second']:.0f} img/s end to end, "
      f"{s['wall_seconds']:.0f} s wall")
r = json.loads((d / "sweep" / "results.json").read_text())
for c in r["cells"]:
    t = r["timing"]["cells"][c["cell"]]
    print(f"sweep {c['cell']:10s}: kNN {pct(c['knn_top1']['mean'])}%, linear {pct(c['linear_top1']['mean'])}% "
          f"(best {pct(c['linear_top1_best']['mean'])}%), {t['images_per_second']['mean']:.0f} img/s, "
          f"{t['wall_seconds']['mean']:.0f} s wall")
PY
