#!/usr/bin/env bash
# The lowest supported releases (pyproject.toml: torch>=2.6, torchvision>=0.21, kornia>=0.7): a fresh virtual
# environment with torch==2.6.*, torchvision==0.21.* and kornia==0.7.0, the package and its test extra installed
# from this checkout, then a fast subset of the tests (the config, the training loop with resume, checkpoints,
# heads, export, augmentations; no slow tests).
#
# Not part of .ci/run: it downloads torch. Run it when a change may use a newer torch API, and before lowering or
# raising the lower bounds:
#
#   .ci/min_deps.sh [VENV_DIR]          # default VENV_DIR: a temporary directory, removed afterwards
#
# TORCH_INDEX_URL: where torch comes from; default https://download.pytorch.org/whl/cpu (CPU wheels, ~200 MB).
# Set it empty (TORCH_INDEX_URL=) to take PyPI's wheels: CUDA builds with their nvidia-* packages, ~3.5 GB.
# PYTEST_ARGS: replaces the test selection below.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
venv="${1:-}"
if [[ -z "$venv" ]]; then
  venv="$(mktemp -d)/venv"
  trap 'rm -rf "$(dirname "$venv")"' EXIT
fi
index="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
if [[ -n "$index" ]]; then
  "${pip[@]}" --index-url "$index" "torch==2.6.*" "torchvision==0.21.*"
else
  "${pip[@]}" "torch==2.6.*" "torchvision==0.21.*"
fi
"${pip[@]}" "kornia==0.7.0"
"${pip[@]}" "$repo[test]"   # keeps the torch and kornia above: it satisfies torch>=2.6
"$venv/bin/python" - <<'PY'
import kornia, torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, kornia {kornia.__version__}")
assert torch.__version__.startswith("2.6.") and torchvision.__version__.startswith("0.21."), "not the lowest releases"
assert kornia.__version__ == "0.7.0", "not the lowest kornia"
PY
# From a directory outside the checkout, so that the installed package (not the source tree) is tested.
cd "$(mktemp -d)"
cp -r "$repo/tests" "$repo/configs" .
# shellcheck disable=SC2086
"$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" ${PYTEST_ARGS:-tests/core/test_config.py \
  tests/core/test_train.py tests/core/test_trainer_api.py tests/core/test_online_probe.py tests/core/test_trackers.py \
  tests/core/test_optim.py tests/core/test_losses_ema.py tests/heads tests/reliability/test_reliability_checkpoint.py \
  tests/eval/test_export.py tests/data/test_augment.py}
