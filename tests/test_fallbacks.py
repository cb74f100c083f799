"""fastsynth imports and computes without its compiled extension and without Triton."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import sys, warnings
{prelude}
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch
    import fastsynth
    from fastsynth.ops import bn_stat_loss, synthesis_logit_loss, kd_loss
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    loss, mean, var = bn_stat_loss(x, rm, rv)
    loss.backward()
    ref = torch.linalg.vector_norm(rv - x.var(dim=(0, 2, 3), unbiased=False)) + torch.linalg.vector_norm(rm - x.mean(dim=(0, 2, 3)))
    assert torch.allclose(loss, ref), (loss, ref)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    t, s = torch.randn(6, 10), torch.randn(6, 10, requires_grad=True)
    y = torch.randint(0, 10, (6,))
    l, parts = synthesis_logit_loss(t, s, y, oh=1.0, adv=1.0)
    l.backward()
    kd_loss(s, t, 4.0).backward()
    bn_stat_loss(x.detach(), rm, rv)  # a second call: the fallback warning is not repeated
msgs = [str(w.message) for w in caught if "fastsynth" in str(w.message)]
print("INFO", fastsynth.build_info())
print("WARNINGS", len(msgs), msgs)
"""


def _run(prelude: str, env_extra: dict) -> str:
    env = dict(os.environ, **env_extra)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(prelude=prelude)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_without_extension_uses_reference_and_warns_once():
    out = _run("", {"FASTSYNTH_DISABLE_EXTENSION": "1"})
    assert "'extension': False" in out
    warn_line = [line for line in out.splitlines() if line.startswith("WARNINGS")][0]
    assert warn_line.startswith("WARNINGS 1 "), warn_line
    assert "eager reference" in warn_line


def test_without_triton_installed():
    block = (
        "import importlib.abc\n"
        "class _NoTriton(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton is not installed')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _NoTriton())\n"
        "import importlib.util\n"
        "importlib.util.find_spec = (lambda f: (lambda n, *a: None if n.split('.')[0] == 'triton' else f(n, *a)))(importlib.util.find_spec)\n"
    )
    out = _run(block, {})
    assert "'triton': False" in out
    assert "'extension': True" in out
