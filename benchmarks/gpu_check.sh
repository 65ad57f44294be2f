#!/usr/bin/env bash
# GPU check, prepared to finish in under 8 minutes on one H100/H200:
#   1. images/s of the full-width CIFAR recipe (ResNet-18 width 64, batch 128) in bf16, against its bare
#      forward/backward, for DirectPred at freq 1 and 5 (with its update's share at d = 128, the projector's
#      output), the data pipeline on the GPU, and eigh alone up to d = 4096;
#   2. DirectPred's overhead at d = 256;
#   3. a 2-epoch BYOL + DirectPred run on CIFAR-10 with its kNN figure;
#   4. the full-width comparison DirectPred vs linear vs MLP predictor (sweeps/gpu/cifar10_fullwidth.yaml) through
#      `directpred sweep`, with its results table, stopped (SIGTERM: each run checkpoints) at BUDGET seconds after
#      the start (default 420), so that the figures of the steps before it always come back;
#   0. first, the streamed data path's batched nvJPEG decode against Pillow (tests/data/test_stream.py, seconds;
#      on the CPU only its libjpeg-turbo half runs).
# A step that fails is reported ("gpu_check: ... FAILED") and the others still run; only a package that cannot be
# imported stops the script at once (rc 1), so a broken set-up costs seconds.
# The runs and the sweep (without checkpoints) are packed into OUT/results.tgz beside the JSON files.
# Usage (from the repository root):  bash benchmarks/gpu_check.sh [DATA] [OUT]
#   DATA: the CIFAR-10 mirror archive or an ImageFolder directory (default ../shared/data/cifar10-jpeg.tar.gz)
#   OUT:  where results go (default $OUT or /tmp/gpu_check)
# A machine without this project's dependencies (a bare GPU image with torch): carry their wheels in .gpu_data/
# (pip download --no-deps ...); the script installs, into /tmp/gpu_check_site, each one whose package does not import.
# Without CUDA the same steps run at tiny sizes on the CPU (tests/benchmarks/test_benchmarks.py runs that path).
set -uo pipefail
DATA=${1:-../shared/data/cifar10-jpeg.tar.gz}
DEST=${2:-${OUT:-/tmp/gpu_check}}
BUDGET=${BUDGET:-420}
START=$(date +%s)
mkdir -p "$DEST"
source "$(dirname "$0")/gpu_env.sh"
# One interpreter checks the imports, names the versions and the code, and says whether CUDA is there. (gc.freeze:
# the exit skips its collection over what importing torch made, 1-2 s on 2 cores.)
# The commit can be stale on a device machine's copy: the digest identifies the code (benchmarks/source_digest.py).
CUDA_AVAILABLE=$("$PY" - <<'PY'
import gc, subprocess, sys, torch, torchvision, directpred.data.augment, directpred.train  # noqa: E401,F401
from directpred.data.stream import jpeg_backend
sys.path.insert(0, "benchmarks")
from source_digest import source_digest
gc.freeze()
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}, "
      f"commit {commit}{'+dirty' if dirty.strip() else ''}, batched JPEG decoder (auto): {jpeg_backend()}",
      file=sys.stderr)
print(f"source digest: {source_digest()}", file=sys.stderr)
print("yes" if torch.cuda.is_available() else "no")
PY
) || { echo "gpu_check: the package cannot be imported; nothing else runs"; exit 1; }
if [[ $CUDA_AVAILABLE == yes ]]; then
  DEV=cuda; PREC=bf16; DECODE_IMAGES=512; STEPS=30; EPOCHS=2; DIMS=128,256,512,1024,2048,4096
  SIZE=(--set backbone.width=64)
  SWEEP=(--set train.epochs=2 --devices auto)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
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
# TorchCodec's decoder is checked where a release with decode_jpeg (>= 0.16, built for this torch) imports: the device
# machine reaches no package index, so its wheel travels in .gpu_data/ (above); else only torchvision's decoder.
if "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pytest -q -p no:cacheprovider tests/data/test_stream.py -k "batched or jpeg_backend" \
    || fail "the batched decode test"
else
  echo "gpu_check: pytest is not installed; skipping the decode test"
fi
"$PY" benchmarks/stream_throughput.py --decode-only --decode-device $DEV --images $DECODE_IMAGES \
  --out "$DEST/decode_$DEV.json" || fail "the batched decode benchmark"

echo "== 1. throughput: step vs bare forward/backward, data pipeline (d=128) =="
"$PY" benchmarks/throughput.py --config $CFG --device $DEV --steps $STEPS --warmup 3 "${DATASET[@]}" "${SIZE[@]}" \
  --predictors directpred_freq1,directpred_freq5 --eigh-dims $DIMS --out "$DEST/throughput_d128.json" \
  || fail "the throughput benchmark (d=128)"

echo "== 2. DirectPred overhead at d=256 =="
"$PY" benchmarks/throughput.py --config $CFG --device $DEV --steps $STEPS --warmup 3 "${DATASET[@]}" "${SIZE[@]}" \
  --set projector.out_dim=256 --predictors directpred_freq1 --eigh-dims "" --out "$DEST/throughput_d256.json" \
  || fail "the throughput benchmark (d=256)"

echo "== 3. $EPOCHS-epoch BYOL + DirectPred, kNN =="
rm -rf "$DEST/knn_run"
"$PY" -m directpred train $CFG --out "$DEST/knn_run" "${DATASET[@]}" "${SIZE[@]}" --set train.epochs=$EPOCHS \
  --set eval.knn_every=1 --set eval.linear=false --set train.progress=false || fail "the $EPOCHS-epoch run"

echo "== 4. full-width comparison: directpred sweep sweeps/gpu/cifar10_fullwidth.yaml (deadline $BUDGET s after the start) =="
rm -rf "$DEST/sweep"
SWEEP_CMD=("$PY" -m directpred sweep sweeps/gpu/cifar10_fullwidth.yaml --out "$DEST/sweep" "${DATASET[@]}" "${SIZE[@]}")
"${SWEEP_CMD[@]}" "${SWEEP[@]}" &
P=$!
while kill -0 $P 2>/dev/null; do
  if (( $(date +%s) - START > BUDGET )); then
    echo "gpu_check: deadline; stopping the sweep (its runs checkpoint; rerunning the command resumes them)"
    kill -TERM $P 2>/dev/null
    break
  fi
  sleep 2
done
wait $P || fail "the sweep (or its deadline)"
[[ -f "$DEST/sweep/results.json" ]] || "${SWEEP_CMD[@]}" "${SWEEP[@]}" --report >/dev/null 2>&1 || true
(cd "$DEST" && tar czf results.tgz --exclude='*.pt' knn_run sweep 2>/dev/null) || true
"$PY" - "$DEST" <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])


def load(*parts):
    f = d.joinpath(*parts)
    return json.loads(f.read_text()) if f.is_file() else None


def pct(v):  # an accuracy of summary.json / results.json: null (non-finite features, or no finite seed) is nan
    return "nan" if v is None else f"{v:.2f}"


print("\n== gpu_check summary ==")
t, t2 = load("throughput_d128.json"), load("throughput_d256.json")
if t:
    step = t["steps"]["directpred_freq1"]
    print(f"device: {t['device']}  precision: {t['precision']}  commit: {t['commit']}")
    print(f"bare fwd+bwd {t['limit']['images_per_s']:.0f} img/s; step (DirectPred freq 1) {step['step_images_per_s']:.0f} "
          f"img/s = {step['step_over_limit']:.3f} of the limit; freq 5 {t['steps']['directpred_freq5']['step_images_per_s']:.0f} img/s")
    print(f"data pipeline {t['pipeline']['images_per_s']:.0f} img/s = {t['pipeline_over_step']:.2f} x the step")
    print(f"DirectPred update: d=128 {1e3 * step['predictor_update_s']:.2f} ms ({100 * step['predictor_update_share_of_step']:.2f}% of step)"
          + (f", d=256 {1e3 * t2['steps']['directpred_freq1']['predictor_update_s']:.2f} ms" if t2 else ""))
    print("eigh ms by d: " + ", ".join(f"{k}: {1e3 * v:.2f}" for k, v in t["eigh_s"].items()))
else:
    print("throughput: no results")
for dec in sorted(d.glob("decode_*.json")):
    print(f"batched JPEG decode + resize to 256 ({dec.stem[7:]}, img/s): " + ", ".join(
        f"{k.split('_')[2]} {v:.0f}" for k, v in json.loads(dec.read_text())["batched_decode"].items()))
s = load("knn_run", "summary.json")
print(f"{s['epochs']:g}-epoch run: kNN top-1 {pct(s['knn_top1'])}%, {s['images_per_second']:.0f} img/s end to end, "
      f"{s['wall_seconds']:.0f} s wall" if s else "the short run: no summary")
r = load("sweep", "results.json")
for c in r["cells"] if r else []:
    tc = r["timing"]["cells"].get(c["cell"]) or {}
    ips, wall = (tc.get(k, {}).get("mean") for k in ("images_per_second", "wall_seconds"))
    print(f"sweep {c['cell']:10s}: kNN {pct(c['knn_top1']['mean'])}%, linear {pct(c['linear_top1']['mean'])}% "
          f"(best {pct(c['linear_top1_best']['mean'])}%), n={c['n']}"
          + (f", {ips:.0f} img/s, {wall:.0f} s wall" if ips and wall else ""))
PY
echo "gpu_check: $(( $(date +%s) - START )) s; files in $DEST (runs without checkpoints: results.tgz)"
