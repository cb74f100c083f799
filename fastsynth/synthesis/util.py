"""Small helpers of the synthesizers that are not the inner-step machinery of ``core``:
one-time warnings, NVTX ranges, frozen parameters, the Adam factory, a wall clock, and the
copying helpers of the resumable state (``SynthCore.state_dict``)."""
from __future__ import annotations

import contextlib
import copy
import time
import warnings

import torch
import torch.nn as nn

_WARNED: set = set()  # keys of the warnings already given (tests discard a key to see one again)


def warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def nvtx_range(name: str, enabled: bool | str):
    """A named phase of the inner step: an NVTX range for Nsight Systems when ``enabled`` is True
    (the default on a GPU), a ``torch.profiler.record_function`` range when it is "record"
    (``fastsynth profile`` sets it, so the phases show in torch.profiler traces on any device),
    nothing otherwise (the default on the CPU: no extra ops in the step)."""
    if enabled == "record":
        with torch.profiler.record_function(name):
            yield
    elif enabled:
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Parameters of ``modules`` do not require grad inside the block (restored after)."""
    saved = []
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            saved.append((p, p.requires_grad))
            p.requires_grad_(False)
    try:
        yield
    finally:
        for p, rg in saved:
            p.requires_grad_(rg)


def make_adam(params, lr, betas, device, capturable=False):
    """Adam with the fused kernel where torch has one for these tensors (one op per step).
    ``device`` is not read (the parameters' devices decide); kept for the existing callers."""
    params = list(params)
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused_ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in flat)
    kw = {"fused": True} if fused_ok else {}
    if capturable:
        kw["capturable"] = True
    return torch.optim.Adam(params, lr=lr, betas=betas, **kw)


def reset_optimizer_state_(opt: torch.optim.Optimizer) -> None:
    """Make ``opt`` behave like a freshly built optimizer, in place (tensors keep their
    addresses, so a captured CUDA graph stays valid): one ``_foreach_zero_`` over every state
    tensor (Adam: step, exp_avg, exp_avg_sq of each parameter) instead of one op each."""
    tensors = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    if tensors:
        torch._foreach_zero_(tensors)


def now() -> float:
    return time.time()


def set_fields(obj, **values) -> None:
    """``obj.<name> = value`` for each keyword: the plain fields an upstream constructor stores
    (``lr_g``, ``adv``, ``ep_start``, ...), named once per synthesizer."""
    for name, value in values.items():
        setattr(obj, name, value)


# ---------------------------------------------------------------- resumable state


def _plain(v) -> bool:
    """A value ``torch.load(weights_only=True)`` reads back and ``==`` compares: None, bool,
    int, float, str, or a list/tuple of them."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, (list, tuple)) and all(_plain(x) for x in v)


def _clone_state(obj):
    """A deep copy of a state (dicts, lists, tuples, tensors, plain values) whose tensors are
    detached clones: the state keeps its values while the synthesizer runs on."""
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        out = type(obj)((k, _clone_state(v)) for k, v in obj.items())
        meta = getattr(obj, "_metadata", None)
        if meta is not None:  # a module's state_dict: BatchNorm reads its version from it on load
            out._metadata = copy.deepcopy(meta)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_state(v) for v in obj)
    return obj


def _nonpersistent_buffers(m: nn.Module) -> dict:
    """The buffers a module's state_dict leaves out (``persistent=False``), by qualified name:
    e.g. the seed tensor of NAYER's noisy layers, which advances at every re-initialisation."""
    out = {}
    for prefix, mod in m.named_modules():
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            buf = mod._buffers.get(name)
            if buf is not None:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out
