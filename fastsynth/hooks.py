"""Drop-in DeepInversion BatchNorm hook computing through the fused bn_stat_loss op.

Same attributes and methods as the upstream hook (NVlabs/DeepInversion, zju-vipa CMI /
Fast-Datafree ``datafree/hooks.py``), so synthesizer code written against it runs unchanged:

    hooks = [DeepInversionHook(m, mmt_rate) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    teacher(x)
    loss_bn = sum(h.r_feature for h in hooks)
    ...
    for h in hooks: h.update_mmt()

``r_feature``: the layer's loss of the last forward (the math is in fastsynth/ops/bn_stat_loss.py's docstring; momentum variant once
``mmt`` is set); ``tmp_val``: its detached (batch_mean, batch_var); ``mmt``: the momentum state
(None until the first ``update_mmt()``); ``remove()`` (or ``close()``, NVlabs' name) removes the
forward hook.

The hooked module must have running statistics (a BatchNorm built with
``track_running_stats=True``); they are read afresh on every forward, so a train-mode BatchNorm
(whose forward updates them) or buffers loaded through ``.data`` are seen as they are now.

Upstream computes the loss on every forward, including no-grad forwards of the teacher during
student training. That stays the default; ``skip_no_grad=True`` skips the work when grad mode
is off (``r_feature``/``tmp_val`` then keep the values of the last grad-enabled forward).
"""
from __future__ import annotations

import math
import numbers

import torch

from .backend import BACKENDS
from .ops.bn_stat_loss import bn_stat_loss


def _check_rate(mmt_rate):
    if isinstance(mmt_rate, (bool, torch.Tensor)) or not isinstance(mmt_rate, numbers.Real):
        raise TypeError(f"DeepInversionHook: mmt_rate must be a Python float, got {type(mmt_rate).__name__}")
    if not math.isfinite(float(mmt_rate)):
        raise ValueError(f"DeepInversionHook: mmt_rate must be finite, got {mmt_rate!r}")


class DeepInversionHook:
    def __init__(self, module: torch.nn.Module, mmt_rate: float = 0.0, *, backend: str | None = None,
                 skip_no_grad: bool = False):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"DeepInversionHook: module must be a BatchNorm nn.Module, got {type(module).__name__}")
        for name in ("running_mean", "running_var"):
            if not isinstance(getattr(module, name, None), torch.Tensor):
                what = ("a BatchNorm built with track_running_stats=False"
                        if isinstance(module, torch.nn.modules.batchnorm._NormBase) else type(module).__name__)
                raise ValueError(f"DeepInversionHook: module must be a BatchNorm layer with running statistics "
                                 f"(track_running_stats=True); got {what}, whose {name} is "
                                 f"{type(getattr(module, name, None)).__name__}")
        _check_rate(mmt_rate)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"DeepInversionHook: backend must be None or one of {BACKENDS}, got {backend!r}")
        self.hook = module.register_forward_hook(self.hook_fn)
        self.module = module
        self.mmt_rate = mmt_rate
        self.mmt = None
        self.tmp_val = None
        self.r_feature = None
        self.backend = backend
        self.skip_no_grad = skip_no_grad

    def hook_fn(self, module, input, output):
        if self.skip_no_grad and not torch.is_grad_enabled():
            return
        mmt_mean, mmt_var = self.mmt if self.mmt is not None else (None, None)
        loss, mean, var = bn_stat_loss(input[0], module.running_mean, module.running_var, mmt_mean, mmt_var,
                                       float(self.mmt_rate), backend=self.backend)
        self.r_feature = loss
        self.tmp_val = (mean, var)

    def update_mmt(self):
        if self.tmp_val is None:
            raise RuntimeError("DeepInversionHook.update_mmt(): no batch statistics yet; run a forward of the "
                               "hooked module (with grad enabled when skip_no_grad=True) first")
        mean, var = self.tmp_val
        if self.mmt is None:
            self.mmt = (mean.detach(), var.detach())
        else:
            mean_mmt, var_mmt = self.mmt
            rho = self.mmt_rate
            self.mmt = (rho * mean_mmt + (1 - rho) * mean.detach(), rho * var_mmt + (1 - rho) * var.detach())

    def remove(self):
        self.hook.remove()

    def close(self):
        """``remove()`` under the name NVlabs/DeepInversion's hook uses."""
        self.remove()
