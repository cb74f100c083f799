"""Every Triton kernel compiles for real GPUs (sm_80, sm_90) with no spill outside fp64.

The rest of the suite runs the Triton kernels under TRITON_INTERPRET=1 (set by conftest.py), which
accepts code the real compiler rejects (module globals, types the GPU backend refuses). Here
fastsynth.bench.triton_aot runs in a subprocess with TRITON_INTERPRET=0 and compiles, with Triton's
bundled ptxas and no GPU, the launches the real launchers make at the CIFAR / ImageNet teacher
shapes and 10..50000 classes (its ``--subset``: per kernel, arch, dtype and block size, the
variants with the most and the fewest flags on, one integer specialisation each; the full matrix
is ``python -m fastsynth.bench.triton_aot --write docs/TRITON_KERNELS.md``).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

ARCHS = {80, 90}
DTYPES = {"fp32", "fp16", "bf16", "fp64"}


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-m", "fastsynth.bench.triton_aot", "--subset", "--jobs", str(min(os.cpu_count() or 1, 4)),
         "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1200)
    if not out.exists():
        pytest.fail(f"the AOT check did not finish (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def test_no_compile_errors(aot):
    errors = [f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['constexprs']}: {r['error']}"
              for r in aot["rows"] if r["error"]]
    assert not errors, "\n".join(errors)


def test_no_spills_outside_fp64(aot):
    spills = [f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['constexprs']}: {r['spill_st']}/{r['spill_ld']} B"
              for r in aot["rows"] if not r["error"] and r["dtype"] != "fp64" and (r["spill_st"] or r["spill_ld"])]
    assert not spills, "spills (stores/loads):\n" + "\n".join(spills)


def test_every_kernel_covered_for_both_archs_and_all_dtypes(aot):
    """Every @triton.jit function of every fastsynth/kernels/ module is compiled (a device function inside a
    compiled caller, transitively), each kernel for both archs and every dtype its launchers use,
    and every module is launched in all four dtypes."""
    compiled = {}
    for r in aot["rows"]:  # a variant may serve several workload dtypes (fp32 statistics of fp16 maps)
        compiled.setdefault(f"{r['module']}.{r['kernel']}", set()).update((r["arch"], d) for d in r["launch_dtypes"])
    missing = []
    for kernel, dtypes in aot["launched"].items():
        absent = {(a, d) for a in ARCHS for d in dtypes} - compiled.get(kernel, set())
        if absent:
            missing.append(f"{kernel}: launched but not compiled for {sorted(absent)}")
    for module, fns in aot["inventory"].items():
        covered = {n for n in fns if f"{module}.{n}" in compiled}
        grew = True
        while grew:
            grown = {n for n, callers in fns.items() if any(c in covered for c in callers)} - covered
            covered |= grown
            grew = bool(grown)
        missing += [f"{module}.{n}: never compiled (add its launcher to the workloads of "
                    f"fastsynth/bench/triton_aot.py)" for n in sorted(set(fns) - covered)]
        used = set().union(*[set(d) for k, d in aot["launched"].items() if k.startswith(module + ".")])
        if used != DTYPES:
            missing.append(f"{module}: launched only in {sorted(used)}")
    assert not missing, "\n".join(missing)


def test_batchnorm_kernels_within_register_bound(aot):
    from fastsynth.bench.triton_aot import BOUNDED_KERNELS, REGISTER_BOUND

    rows = [r for r in aot["rows"] if r["kernel"] in BOUNDED_KERNELS and not r["error"]]
    assert {r["kernel"] for r in rows} == set(BOUNDED_KERNELS)
    over = [f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['constexprs']}: {r['regs']} registers"
            for r in rows if r["dtype"] != "fp64" and r["regs"] > REGISTER_BOUND]
    assert not over, f"over {REGISTER_BOUND} registers:\n" + "\n".join(over)


def test_interpreter_is_refused():
    # the check must never run the interpreter and report its "compiles" as real
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "fastsynth.bench.triton_aot", "--subset"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "TRITON_INTERPRET" in proc.stderr
