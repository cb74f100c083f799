"""The package, its extension and its backend selection."""
import pytest
import torch

import fastsynth
from fastsynth import _ext
from fastsynth.backend import check_tensor, resolve_backend

from conftest import GPU_PRESENT, TRITON_INTERPRETED


def test_extension_loaded_and_reports_backends():
    info = fastsynth.build_info()
    assert info["extension"], f"fastsynth._C failed to load: {info.get('extension_error')}"
    assert info["cpu"] is True
    assert info["cuda"] == _ext.has_cuda_extension()
    assert info["triton"] is True


def test_kernels_subpackage_is_the_checkout_one():
    import os

    import fastsynth.kernels as k

    pkg = os.path.dirname(os.path.abspath(fastsynth.__file__))
    assert os.path.dirname(os.path.abspath(k.__file__)) == os.path.join(pkg, "kernels")


def test_checkout_root_shadows_no_top_level_package():
    """Run from the repository root (``python -m fastsynth ...``, pytest's pythonpath), the root is
    on sys.path: a top-level folder there would shadow an installed package of the same name (a
    ``kernels/`` folder hid the ``kernels`` package transformers imports, so the lte extra's
    MiniLM encoder failed). Only ``fastsynth`` may be importable from the root."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(fastsynth.__file__)))
    code = ("import pkgutil, sys; print('\\n'.join(m.name for m in pkgutil.iter_modules([sys.argv[1]])))")
    names = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True,
                           check=True).stdout.split()
    assert set(names) <= {"fastsynth", "setup", "conftest"}, names


def test_backend_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend(None, cpu, "op") == "cpu"
    assert resolve_backend("reference", cpu, "op") == "reference"
    if TRITON_INTERPRETED:  # conftest sets TRITON_INTERPRET=1 where no GPU is present
        assert resolve_backend("triton", cpu, "op") == "triton"
    else:
        with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"):
            resolve_backend("triton", cpu, "op")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("gpu", cpu, "op")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("cuda", cpu, "op")


def test_check_tensor_messages_name_the_argument():
    with pytest.raises(TypeError, match="feature must be a floating tensor"):
        check_tensor("feature", torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="feature must have 4 dimensions"):
        check_tensor("feature", torch.zeros(2, 3), ndim=4)
    with pytest.raises(ValueError, match="feature must not be empty"):
        check_tensor("feature", torch.zeros(0, 3), nonempty=True)
    with pytest.raises(TypeError, match="feature must be a torch.Tensor"):
        check_tensor("feature", [1.0])


def test_triton_interpreter_only_without_a_gpu():
    """conftest: the interpreter where no GPU is present (CPU tensors), the compiled path on a GPU
    (the interpreter would read device addresses from host memory); an explicit setting wins."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    probe = ("import os, sys; sys.path.insert(0, sys.argv[1]); import conftest; "
             "print(os.environ.get('TRITON_INTERPRET'), conftest.TRITON_INTERPRETED, conftest.GPU_PRESENT)")

    def run(**env):
        e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        e.update(env, PYTHONPATH=os.path.dirname(here))
        out = subprocess.run([sys.executable, "-c", probe, here], env=e, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()[-3:]

    assert run() == (["None", "False", "True"] if GPU_PRESENT else ["1", "True", "False"])
    assert run(TRITON_INTERPRET="0")[:2] == ["0", "False"]
    assert TRITON_INTERPRETED == (os.environ.get("TRITON_INTERPRET") == "1")


def test_torch_lower_bound_is_the_tested_pin():
    """setup.py's torch lower bound is the torch CI tests (requirements.txt's pin), and setup.py
    leaves the C++ standard to torch (its headers decide: C++20 from torch 2.13 on)."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    setup_src = open(os.path.join(root, "setup.py")).read()
    reqs = open(os.path.join(root, "requirements.txt")).read()
    bound = re.search(r'"torch>=([0-9.]+)"', setup_src)
    pin = re.search(r"^torch==([0-9.]+)", reqs, re.M)
    assert bound and pin, "setup.py must state torch>=X and requirements.txt pin torch==X"
    assert pin.group(1).split(".")[:2] == bound.group(1).split(".")[:2], (bound.group(1), pin.group(1))
    assert not re.search(r'"-std=', setup_src), "setup.py must not force a C++ standard"



def test_version_is_written_once_and_setup_reads_it():
    """``__version__`` in fastsynth/__init__.py is the only copy: setup.py reads it (as text) and
    the installed metadata agrees."""
    import ast
    import importlib.metadata
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    setup_src = open(os.path.join(root, "setup.py")).read()
    tree = ast.parse(setup_src)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "version")
    ns = {"os": os, "re": re, "ROOT": root}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), ns)
    assert ns["version"]() == fastsynth.__version__
    assert "version=version()" in setup_src
    assert not re.search(r'version\s*=\s*["\']', setup_src), "setup.py must not write the version itself"
    assert importlib.metadata.version("fastsynth") == fastsynth.__version__


def test_every_macro_setup_defines_is_read_by_the_sources():
    """A -D flag or define_macros entry that no source reads is dead configuration."""
    import glob
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    setup_src = open(os.path.join(root, "setup.py")).read()
    macros = set(re.findall(r'"-D([A-Z_0-9]+)', setup_src)) | set(re.findall(r'\("([A-Z_0-9]+)", None\)', setup_src))
    assert "FASTSYNTH_WITH_CUDA" in macros
    sources = ""
    for ext in ("cpp", "h", "cu", "cuh"):
        for path in glob.glob(os.path.join(root, "csrc", "**", f"*.{ext}"), recursive=True):
            sources += open(path).read()
    for macro in macros:
        assert re.search(rf"\b{macro}\b", sources), f"setup.py defines {macro}, which no source under csrc/ reads"


def test_ops_all_lists_every_public_op_and_each_module_its_reference():
    import importlib

    import fastsynth.ops as ops

    assert "fused_bn" in ops.__all__ and len(set(ops.__all__)) == len(ops.__all__)
    for name in ops.__all__:
        assert callable(getattr(ops, name)), name
    # every op module exports its eager oracle under one name pattern: <op>_reference
    for mod_name, ref in (("fused_bn", "fused_bn_reference"), ("noisy_linear", "noisy_linear_reference"),
                          ("reinit", "reinit_reference"), ("logit_losses", "kd_loss_reference"),
                          ("contrastive_loss", "contrastive_ce_reference")):
        mod = importlib.import_module(f"fastsynth.ops.{mod_name}")
        assert ref in mod.__all__ and callable(getattr(mod, ref)), (mod_name, ref)


def test_cuda_sources_include_nothing_from_csrc_cpu_and_isa_checks_live_in_simd_h():
    """docs/DEVELOPING.md: glue both bindings share sits in csrc/binding/; CPU ISA macros and CPUID
    checks are defined once, in csrc/cpu/simd.h."""
    import glob
    import os
    import re

    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    for path in glob.glob(os.path.join(csrc, "cuda", "*")):
        assert not re.search(r'#include\s+"cpu/', open(path).read()), f"{path} includes a csrc/cpu header"
    simd = os.path.join(csrc, "cpu", "simd.h")
    for path in glob.glob(os.path.join(csrc, "**", "*.*"), recursive=True):
        if path == simd or not path.endswith((".cpp", ".h", ".cu", ".cuh")):
            continue
        src = open(path).read()
        for pattern in (r"__builtin_cpu_supports", r"#define\s+FS_SIMD_CLONES", r"#define\s+FS_ALWAYS_INLINE"):
            assert not re.search(pattern, src), f"{path}: {pattern} belongs in csrc/cpu/simd.h"
