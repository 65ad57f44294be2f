# Sourced by the GPU scripts (gpu_check.sh, gpu_imagenet_step.sh): the interpreter, this checkout on PYTHONPATH, and
# the carried wheels. A machine without this project's dependencies (a bare GPU image with torch) gets them as wheels
# in .gpu_data/ (pip download --no-deps ...): each one whose package does not import is installed into
# /tmp/gpu_check_site, so nothing shadows the machine's own packages (a TorchCodec wheel built for another torch would
# not load).
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fail() { echo "$(basename "$0" .sh): $1 FAILED (see above)"; }
SITE=/tmp/gpu_check_site
for wheel in .gpu_data/*.whl; do
  [[ -e "$wheel" ]] || continue
  name=$(basename "$wheel"); name=${name%%-*}
  if ! "$PY" -c "import gc, $name; gc.freeze()" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel" && echo "gpu_check: installed $wheel"
  fi
done
[[ -d "$SITE" ]] && export PYTHONPATH="$PYTHONPATH:$SITE"
