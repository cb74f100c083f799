#!/usr/bin/env bash
# CI leg: AddressSanitizer + UndefinedBehaviorSanitizer (issue 18).
#
#   1. a canary: a heap overflow and a signed overflow compiled with the same flags must be
#      reported (a sanitizer job that cannot fail is no check);
#   2. the C++ unit tests of csrc/tests (CMake -DFASTSYNTH_SANITIZE=ON, built as C++20, the
#      standard the extension is compiled in on the supported torch);
#   3. the CPU extension built with FASTSYNTH_SANITIZE=1 in a copy of this checkout (the checkout's
#      own build is left alone) running the op test files, with libasan preloaded into Python
#      (detect_leaks=0: CPython and torch keep allocations until exit by design).
# Any sanitizer report aborts the process it occurs in, so the job exits non-zero.
#
#   scripts/ci_sanitizers.sh
#   FASTSYNTH_SAN_PYTEST='-k "not triton"' ...   # pytest selection (default: all but the Triton interpreter runs)
#   FASTSYNTH_SAN_DIR=/tmp/x FASTSYNTH_KEEP=1 ... # keep the builds for inspection
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ci_common.sh
PY=${PYTHON:-python3}
CXX=${CXX:-g++}
WORK=${FASTSYNTH_SAN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/fastsynth_sanitizers.XXXXXX")}
ci_leg sanitizer
mkdir -p "$WORK"
SAN_FLAGS=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g)
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

stamp "canary: the sanitizers report a heap overflow and a signed overflow"
cat > "$WORK/canary.cpp" <<'EOF'
#include <cstdlib>
#include <vector>
int main(int argc, char **) {
  if (argc == 2) { std::vector<float> v(7); volatile float x = v.data()[7 + argc - 2]; return int(x); }
  volatile int big = 2147483647; return big + argc;  // signed overflow
}
EOF
"$CXX" "${SAN_FLAGS[@]}" -O1 "$WORK/canary.cpp" -o "$WORK/canary"
for mode in heap signed; do  # one argument: the heap overflow; none: the signed overflow
  if "$WORK/canary" $([ $mode = heap ] && echo heap) > "$WORK/canary.log" 2>&1; then
    echo "the sanitizer build did not report the canary's $mode error" >&2; cat "$WORK/canary.log" >&2; exit 1
  fi
  grep -q -E "heap-buffer-overflow|signed integer overflow" "$WORK/canary.log" || {
    echo "unexpected canary output:" >&2; cat "$WORK/canary.log" >&2; exit 1; }
done

stamp "C++ unit tests of csrc/tests under ASan+UBSan (C++20)"
cmake -S "$ROOT" -B "$WORK/cmake" -DFASTSYNTH_SANITIZE=ON -DCMAKE_CXX_STANDARD=20 > "$WORK/cmake.log" 2>&1 || {
  cat "$WORK/cmake.log"; exit 1; }
cmake --build "$WORK/cmake" -j "$(nproc)" > "$WORK/cmake_build.log" 2>&1 || { tail -n 80 "$WORK/cmake_build.log"; exit 1; }
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 ctest --test-dir "$WORK/cmake" --output-on-failure

copy_checkout

stamp "CPU extension with -fsanitize=address,undefined"
cd "$WORK/src"
FASTSYNTH_SANITIZE=1 FASTSYNTH_CUDA=0 "$PY" setup.py build_ext --inplace > "$WORK/ext_build.log" 2>&1 || {
  tail -n 80 "$WORK/ext_build.log"; exit 1; }
SO=$(ls "$WORK"/src/fastsynth/_C*.so)
ldd "$SO" | grep -q libasan || { echo "$SO is not linked against libasan" >&2; exit 1; }
ldd "$SO" | grep -q libubsan || { echo "$SO is not linked against libubsan" >&2; exit 1; }
LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBSTDCXX=$("$CXX" -print-file-name=libstdc++.so)
[ -e "$LIBASAN" ] && [ -e "$LIBSTDCXX" ] || { echo "libasan.so / libstdc++.so not found ($LIBASAN, $LIBSTDCXX)" >&2; exit 1; }

# libstdc++ is preloaded too: python itself does not link it, and ASan's __cxa_throw interceptor
# must find the real one at start-up (else the first C++ exception, e.g. a TORCH_CHECK, aborts
# with "CHECK failed: asan_interceptors.cpp ... real___cxa_throw")
export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:allocator_may_return_null=1
"$PY" - "$SO" <<'PYEOF'
import os, sys
import fastsynth
from fastsynth import _ext
so = sys.argv[1]
assert os.path.realpath(fastsynth._C.__file__) == os.path.realpath(so), (fastsynth._C.__file__, so)
assert _ext.has_extension(), _ext.extension_error()
print("sanitized extension:", fastsynth._C.__file__)
PYEOF

stamp "op tests against the sanitized extension"
TESTS=(tests/test_bn_stat_loss.py tests/test_logit_losses.py tests/test_reinit.py tests/test_fused_bn.py
       tests/test_noisy_linear.py)
# The Triton interpreter runs are pure Python/NumPy (nothing the sanitizers instrument) and slow.
eval "SEL=(${FASTSYNTH_SAN_PYTEST:--k 'not triton'})"
# --capture=sys: a sanitizer report is written to file descriptor 2 just before the process exits;
# pytest's default fd capture would swallow it
"$PY" -m pytest -q -p no:cacheprovider --capture=sys "${TESTS[@]}" "${SEL[@]}"
stamp "sanitizer leg passed"
