"""Helpers shared by test modules."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a script run by ``compile_triton_for_gpu`` starts with: Triton with the interpreter off,
# the target architecture from argv, ``signature`` (the argument types of a kernel) and
# ``compile_kernel`` (real compilation for that target, no GPU needed; it asserts a cubin came out).
_AOT_PRELUDE = r'''
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

arch = int(sys.argv[1])


def signature(fn, elem, int_args, float_args, float_type, special=None):
    """Triton signature of ``fn``: ``special[name]`` where given, pointers to ``elem``, ``int_args``
    i32, ``float_args`` of ``float_type``, everything else constexpr."""
    special = special or {}
    sig = {}
    for name in fn.arg_names:
        if name in special:
            sig[name] = special[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + elem
        elif name in int_args:
            sig[name] = "i32"
        elif name in float_args:
            sig[name] = float_type
        else:
            sig[name] = "constexpr"
    return sig


def compile_kernel(fn, signature, constexprs, what=()):
    kernel = triton.compile(triton.compiler.ASTSource(fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32))
    assert kernel.asm["cubin"], (fn.__name__,) + tuple(what)
'''


def compile_triton_for_gpu(script: str, arch: int) -> None:
    """Runs ``script`` (after the prelude above) in a fresh interpreter with TRITON_INTERPRET=0:
    the interpreter accepts what the compiler rejects (a plain module global read inside
    @triton.jit code was a NameError at the first GPU launch), so kernels are compiled for real
    targets, without a GPU. Fails with the script's stderr unless it ran to the end."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _AOT_PRELUDE + script + '\nprint("compiled")\n', str(arch)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
