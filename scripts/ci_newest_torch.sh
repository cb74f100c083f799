#!/usr/bin/env bash
# CI leg: build and test fastsynth against the newest torch the package registry serves.
#
# requirements.txt pins the oldest torch/triton CI supports (setup.py's lower bounds); this leg
# catches what breaks on the newest release (torch 2.14's headers, for example, need C++20). In a
# fresh virtual environment it installs an unpinned `torch` (on Linux a multi-GB CUDA build, which
# also runs on the CPU) with the triton that torch pins, the test dependencies, builds fastsynth from
# a copy of this checkout (the checkout's own build is left alone) and runs the test suite there.
# With a CUDA toolkit on the machine (nvcc), the CUDA kernels are compiled against that torch too
# (sm_80/sm_90 without a GPU); FASTSYNTH_CUDA=0 skips them.
#
#   scripts/ci_newest_torch.sh                        # whole suite
#   FASTSYNTH_NEWEST_PYTEST="tests/test_build.py" scripts/ci_newest_torch.sh   # a subset
#   FASTSYNTH_NEWEST_DIR=/tmp/x FASTSYNTH_KEEP=1 ...  # keep the venv and build for inspection
#
# Any failure (install, build, a test) exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ci_common.sh
PYTHON=${PYTHON:-python3}
WORK=${FASTSYNTH_NEWEST_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/fastsynth_newest_torch.XXXXXX")}
ci_leg newest-torch
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

stamp "fresh venv in $WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"

stamp "install the newest torch (unpinned) with its triton, and the build/test dependencies"
# one resolver run, so that triton is the version this torch declares (torch 2.14 pins triton~=3.8)
"$PY" -m pip install -q torch triton numpy pybind11 ninja pytest hypothesis pyyaml scipy scikit-learn matplotlib \
  "setuptools>=64" wheel
"$PY" - <<'PYEOF'
import torch, triton
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}")
PYEOF
# The registry's newest torch, for the log: an installer-side constraint (pip config) can hold the
# install back, and then the leg tests that older torch, which this line makes visible.
NEWEST=$(timeout 120 "$PY" -m pip index versions torch 2>/dev/null | sed -n 's/^torch (\(.*\))$/\1/p' || true)
INSTALLED=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
if [ -n "$NEWEST" ] && [ "$NEWEST" != "$INSTALLED" ]; then
  echo "NOTE: the registry lists torch $NEWEST but pip installed $INSTALLED (pip constraints: $("$PY" -m pip config list 2>/dev/null | grep -i constraint || echo none))"
fi

copy_checkout

# torch derives CUDA_HOME from the nvcc on PATH (its parent's parent); where that nvcc is a wrapper
# script (e.g. /usr/local/bin/nvcc), ask nvcc where its toolkit is instead.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  HERE=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
  [ -n "$HERE" ] && [ -d "$HERE/../include" ] && export CUDA_HOME=$(cd "$HERE/.." && pwd)
fi
# torch's CUDA headers include the CUDA libraries' headers (cusparse.h, cublas_v2.h); a toolkit
# with only nvcc and the runtime cannot compile the CUDA bindings: build the CPU extension then
# (FASTSYNTH_CUDA=1 in the environment still insists on CUDA).
if [ -z "${FASTSYNTH_CUDA:-}" ] && [ -n "${CUDA_HOME:-}" ] && [ ! -e "$CUDA_HOME/include/cusparse.h" ]; then
  echo "NOTE: $CUDA_HOME has no cusparse.h (torch's CUDA headers need it): CPU-only build (FASTSYNTH_CUDA=0)"
  export FASTSYNTH_CUDA=0
fi
# CUDA sources compile for one arch here (sm_90; the CMake check compiles sm_80 and sm_90 without
# torch) to keep the leg short; TORCH_CUDA_ARCH_LIST overrides.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
echo "CUDA_HOME=${CUDA_HOME:-unset} FASTSYNTH_CUDA=${FASTSYNTH_CUDA:-auto} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

stamp "build fastsynth against torch $INSTALLED (pip install --no-build-isolation -e .)"
cd "$WORK/src"
"$PY" -m pip install --no-build-isolation --no-deps -v -e . > "$WORK/build.log" 2>&1 || {
  tail -n 60 "$WORK/build.log"; echo "BUILD FAILED against torch $INSTALLED" >&2; exit 1; }
grep -A8 "fastsynth build configuration" "$WORK/build.log" | sed -n '1,6p' || true
"$PY" - <<'PYEOF'
import json, fastsynth
info = fastsynth.build_info()
print(json.dumps(info))
assert info["extension"], f"fastsynth._C did not load: {info.get('extension_error')}"
assert fastsynth.__file__.startswith(__import__("os").getcwd()), fastsynth.__file__
PYEOF

stamp "tests against torch $INSTALLED"
# shellcheck disable=SC2086
"$PY" -m pytest -q -p no:cacheprovider ${FASTSYNTH_NEWEST_PYTEST:-}
stamp "newest-torch leg passed (torch $INSTALLED)"
