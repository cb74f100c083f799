#!/usr/bin/env bash
# fastsynth GPU validation in one call, within 8 minutes, on a machine with a CUDA GPU and no network.
#
# Installed beforehand (nothing is downloaded): a CUDA build of torch (>= 2.13), triton, pytest,
# hypothesis, scipy, numpy, ninja, pybind11, setuptools, and a CUDA toolkit whose nvcc matches
# torch.version.cuda's major version. compute-sanitizer and nsys are used when on PATH.
#
#   OUT=/path/for/results scripts/gpu_check.sh      # from the repo root; $OUT defaults to ./gpu_check_out
#   GPU_CHECK_DRY=1 scripts/gpu_check.sh            # (or --dry) the control flow without a GPU
#   GPU_CHECK_BUDGET=460                            # total seconds (default 460: 8 minutes with margin)
#
# Steps, each limited to min(its own limit, the time left) and skipped when less than its minimum
# is left, in priority order; a failing step never stops the next ones:
#   env          nvidia-smi, nvcc, python/torch/triton versions, tools present      -> env.txt
#   triton_aot   (background, during the build) AOT compile of every Triton kernel, sm_80/sm_90
#   build        setup.py build_ext --inplace, FASTSYNTH_CUDA=1, this GPU's arch; build_info has cuda
#   conftest     tests/test_build.py: no TRITON_INTERPRET on a GPU (compiled Triton)
#   needs_cuda   pytest -m needs_cuda, the interpreter off                         -> needs_cuda.xml
#   extra        scripts/gpu_check_extra.py: graph replay == eager on fresh inputs per op and per
#                synthesizer at realistic size, CUDA vs Triton vs float64 at realistic shapes in
#                fp32/fp16/bf16, a tensor of more than 2^31 elements                -> extra.jsonl
#   bench        python -m fastsynth bench --device cuda --quick                    -> bench/
#   memcheck, racecheck   compute-sanitizer on scripts/gpu_check_sanitize.py (small launches of
#                every CUDA kernel path), when present
#   nsys         nsys profile of `fastsynth profile` (smoke), when present
# Read $OUT/summary.txt first: one line per step (PASS / FAIL / SKIP and why), then the results.
# Exit status: 0 when no step failed, 1 otherwise (2: no usable python/torch).
set -u
DRY=${GPU_CHECK_DRY:-0}
for a in "$@"; do
  case $a in
    --dry) DRY=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument $a (use --dry or -h)" >&2; exit 2 ;;
  esac
done
ROOT=$(pwd)
[ -f "$ROOT/setup.py" ] && [ -d "$ROOT/fastsynth" ] || { echo "run from the fastsynth repo root" >&2; exit 2; }
SCRIPTS="$ROOT/scripts"
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECK_BUDGET:-460}
T0=$(date +%s)
SUM="$OUT/summary.txt"
: > "$SUM"
rm -f "$OUT/extra.jsonl" "$OUT/needs_cuda.xml" "$OUT/triton_aot.json"  # results of an earlier run
FAILED=0
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 OUT GPU_CHECK_DRY=$DRY
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUT/triton_cache}
# GPU runs use compiled Triton; the interpreter would read device addresses from host memory
unset TRITON_INTERPRET

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(elapsed) )); }
log() { echo "[$(printf '%3d' "$(elapsed)")s] $*" | tee -a "$SUM"; }
skip() { log "SKIP $1: $2"; }
have() { command -v "$1" >/dev/null 2>&1; }
# run_step NAME MAX_S MIN_S cmd... : cmd limited to min(MAX_S, time left), skipped when fewer than
# MIN_S seconds are left. Output in $OUT/NAME.log; a PASS/FAIL line (and the log's tail) in summary.
run_step() {
  local name=$1 max=$2 min=$3; shift 3
  local rem; rem=$(left)
  if (( rem < min )); then skip "$name" "time budget (${rem}s left, needs ${min}s)"; return 99; fi
  local lim=$(( max < rem ? max : rem ))
  local s; s=$(date +%s)
  timeout -k 10 "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  case $rc in 124|137) note=" TIMEOUT" ;; 139) note=" SEGFAULT" ;; esac
  if [ $rc = 0 ]; then
    log "PASS $name ($(( $(date +%s) - s ))s of ${lim}s)"
  else
    FAILED=1
    log "FAIL $name rc=$rc$note ($(( $(date +%s) - s ))s of ${lim}s)"
    tail -n 6 "$OUT/$name.log" | cut -c1-300 | sed 's/^/        /' >> "$SUM"
  fi
  return $rc
}
echo "fastsynth gpu_check $(date -u +%FT%TZ)  dry=$DRY  budget=${BUDGET}s  out=$OUT" | tee -a "$SUM"

# ------------------------------------------------------------------ env
{
  date -u; uname -a; echo "cpus $(nproc)"; free -g 2>/dev/null | head -2
  (git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -20) || echo "no git metadata"
  if have nvidia-smi; then
    nvidia-smi 2>&1 | head -25
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  else
    echo "nvidia-smi absent"
  fi
  for t in nvcc nsys ncu compute-sanitizer cmake ninja g++; do printf '%-18s %s\n' "$t" "$(command -v $t || echo absent)"; done
  have nvcc && nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1

PY=""
if [ "$DRY" = 1 ]; then
  for c in ${PYTHON:-} python3 python; do have "$c" && "$c" -c 'import torch' >/dev/null 2>&1 && { PY=$(command -v "$c"); break; }; done
else
  for c in ${PYTHON:-} python3 python /opt/conda/bin/python /usr/local/bin/python3 /usr/bin/python3; do
    have "$c" || continue
    if "$c" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
      PY=$(command -v "$c"); break
    fi
  done
fi
if [ -z "$PY" ]; then
  log "FAIL env: no python with a CUDA-enabled torch and a visible GPU (tried: ${PYTHON:-} python3 python ...)"
  for c in python3 python; do have "$c" && "$c" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' >> "$OUT/env.txt" 2>&1; done
  exit 2
fi
"$PY" - >> "$OUT/env.txt" 2>&1 <<'PYEOF'
import importlib, sys, torch
print("python", sys.executable, sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "cc %d.%d" % (p.major, p.minor), "sms", p.multi_processor_count, "GiB", round(p.total_memory / 2**30, 1))
else:
    print("gpu none")
for m in ("triton", "pytest", "hypothesis", "numpy", "ninja", "pybind11", "setuptools", "scipy"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__)
PYEOF
log "PASS env: $PY; $(grep -E '^(torch|gpu|triton) ' "$OUT/env.txt" | tr '\n' ';')"
GPU=1
[ "$DRY" = 1 ] && GPU=0

# ------------------------------------------------------------------ Triton AOT compile (background)
TRITON_PID=""
if [ "$DRY" = 1 ]; then
  skip triton_aot "dry mode (tests/test_triton_aot.py runs it in the test suite)"
elif "$PY" -c 'import fastsynth.bench.triton_aot' >/dev/null 2>&1; then
  s_aot=$(date +%s)
  ( TRITON_INTERPRET=0 timeout -k 5 240 "$PY" -m fastsynth.bench.triton_aot --json "$OUT/triton_aot.json" \
      > "$OUT/triton_aot.log" 2>&1; echo "rc=$?" >> "$OUT/triton_aot.log" ) &
  TRITON_PID=$!
else
  skip triton_aot "fastsynth.bench.triton_aot not importable"
fi

# ------------------------------------------------------------------ build
BUILT=0
# torch derives CUDA_HOME from the nvcc on PATH (its parent's parent); where that nvcc is a wrapper
# script (e.g. /usr/local/bin/nvcc), ask nvcc where its toolkit is instead.
if [ -z "${CUDA_HOME:-}" ] && have nvcc; then
  HERE=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
  [ -n "$HERE" ] && [ -d "$HERE/../include" ] && export CUDA_HOME=$(cd "$HERE/.." && pwd)
fi
echo "CUDA_HOME=${CUDA_HOME:-unset}" >> "$OUT/env.txt"
if [ $GPU = 1 ]; then
  CAP=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')
  have ninja || "$PY" -c 'import ninja' 2>/dev/null || log "WARNING: ninja absent: the extension builds serially (slow)"
  FASTSYNTH_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$CAP}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    run_step build 270 60 "$PY" setup.py build_ext --inplace
  run_step build_info 40 10 "$PY" -c '
import json, fastsynth
i = fastsynth.build_info(); print(json.dumps(i))
assert i["cuda"], "fastsynth._C has no CUDA kernels"' && BUILT=1
else
  skip build "no GPU"
fi

# ------------------------------------------------------------------ tests on the GPU, compiled Triton
if [ $BUILT = 1 ]; then
  run_step conftest 60 20 "$PY" -m pytest -q -p no:cacheprovider tests/test_build.py
  run_step needs_cuda 170 40 "$PY" -m pytest -q -m needs_cuda -p no:cacheprovider -rfEs \
    --junitxml="$OUT/needs_cuda.xml" tests
else
  skip conftest "no GPU"
  skip needs_cuda "no GPU"
fi

# ------------------------------------------------------------------ extra GPU checks
# the dry run checks the harness on the CPU (reference backend, tiny shapes) within a short budget
if [ "$DRY" = 1 ]; then
  EXTRA_MAX=${GPU_CHECK_EXTRA_DRY_S:-60}
else
  EXTRA_MAX=165
fi
EXTRA_BUDGET=$(( $(left) - 15 < EXTRA_MAX - 15 ? $(left) - 15 : EXTRA_MAX - 15 )) \
  run_step extra "$EXTRA_MAX" 30 "$PY" "$SCRIPTS/gpu_check_extra.py"

# ------------------------------------------------------------------ benchmark
if [ $GPU = 1 ]; then
  run_step bench 110 50 "$PY" -m fastsynth bench --device cuda --quick --out "$OUT/bench"
else
  skip bench "no GPU"
fi

# ------------------------------------------------------------------ compute-sanitizer
if [ $GPU = 1 ] && [ $BUILT = 1 ] && have compute-sanitizer; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step memcheck 90 45 compute-sanitizer --tool memcheck --error-exitcode 99 \
    --print-limit 40 "$PY" "$SCRIPTS/gpu_check_sanitize.py"
  run_step racecheck 70 40 compute-sanitizer --tool racecheck --error-exitcode 99 --print-limit 40 \
    "$PY" "$SCRIPTS/gpu_check_sanitize.py"
else
  why="no GPU"; [ $GPU = 1 ] && { [ $BUILT = 1 ] && why="compute-sanitizer absent" || why="no CUDA build"; }
  skip memcheck "$why"; skip racecheck "$why"
fi

# ------------------------------------------------------------------ nsys smoke
if [ $GPU = 1 ] && have nsys; then
  run_step nsys 60 30 nsys profile -t cuda,nvtx --force-overwrite true -o "$OUT/nsys_profile" \
    "$PY" -m fastsynth profile --device cuda --steps 2 --warmup 1 --out "$OUT/profile_out"
else
  skip nsys "$([ $GPU = 1 ] && echo 'nsys absent' || echo 'no GPU')"
fi

# ------------------------------------------------------------------ Triton AOT result
if [ -n "$TRITON_PID" ]; then
  wait_left=$(( $(left) > 5 ? $(left) : 5 ))
  ( sleep "$wait_left"; kill "$TRITON_PID" 2>/dev/null ) & WATCH=$!
  wait "$TRITON_PID" 2>/dev/null
  kill "$WATCH" 2>/dev/null
  if grep -q '^rc=0$' "$OUT/triton_aot.log" 2>/dev/null; then
    log "PASS triton_aot ($(( $(date +%s) - s_aot ))s, in the background)"
  else
    FAILED=1
    log "FAIL triton_aot ($(grep '^rc=' "$OUT/triton_aot.log" 2>/dev/null || echo 'killed: time budget'))"
    tail -n 6 "$OUT/triton_aot.log" 2>/dev/null | cut -c1-300 | sed 's/^/        /' >> "$SUM"
  fi
fi

# ------------------------------------------------------------------ results
"$PY" - >> "$SUM" 2>&1 <<'PYEOF'
import json, os, xml.etree.ElementTree as ET
out = os.environ["OUT"]
print("\n== results")
x = os.path.join(out, "needs_cuda.xml")
if os.path.exists(x):
    s = ET.parse(x).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    print("needs_cuda tests:", {k: s.get(k) for k in ("tests", "failures", "errors", "skipped")})
    for tc in s.iter("testcase"):
        f = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
        if f is not None:
            print("    FAIL", tc.get("name"), (f.get("message") or "")[:160].replace("\n", " "))
        elif "cuda_graph" in (tc.get("name") or "") and tc.find("skipped") is None:
            print("    pass", tc.get("classname", "").split(".")[-1], tc.get("name"))
rows = []
p = os.path.join(out, "extra.jsonl")
if os.path.exists(p):
    for line in open(p):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
bad = [r for r in rows if r.get("ok") is False]
print(f"extra checks: {sum(1 for r in rows if r.get('ok') is True)} ok, {len(bad)} not ok, "
      f"{sum(1 for r in rows if 'skipped' in r)} skipped, {sum(1 for r in rows if r.get('done'))} groups run")
for r in bad[:25]:
    print("    NOT OK", json.dumps(r)[:300])
for r in rows:
    if str(r.get("check", "")).startswith(("synth_graph_vs_eager", "big_")):
        print("   ", json.dumps(r)[:300])
a = os.path.join(out, "triton_aot.json")
if os.path.exists(a):
    try:
        data = json.load(open(a))
        items = data if isinstance(data, list) else data.get("rows", [])
        print(f"triton AOT: {len(items)} compiled variants")
    except ValueError:
        print("triton AOT: unreadable json")
PYEOF
if [ $FAILED = 0 ]; then log "RESULT PASS in $(elapsed)s (dry=$DRY)"; else log "RESULT FAIL in $(elapsed)s (dry=$DRY)"; fi
echo "artefacts:" >> "$SUM"
ls -la "$OUT" | sed 's/^/    /' >> "$SUM"
exit $FAILED
