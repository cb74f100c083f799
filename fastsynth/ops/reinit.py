"""Fused in-place re-initialisation of a list of tensors: NAYER re-initialises its noisy layers
every synthesis step.

``reinit_(tensors, seed, dist="normal", a=0.0, b=1.0)`` fills every tensor of the list in place,
in one kernel launch per backend (a multi-tensor kernel over a table of pointers and sizes):

    dist               value of element i
    "normal"           a + b * z_i                          z_i ~ N(0, 1)
    "uniform"          a + (b - a) * u_i, kept < b           u_i ~ U[0, 1)
    "kaiming_uniform"  U[-1/sqrt(fan_in), 1/sqrt(fan_in))   per tensor; fan_in = size(1) * prod(size[2:]),
                                                            i.e. nn.init.kaiming_uniform_(w, a=sqrt(5)),
                                                            PyTorch's default Linear/Conv weight init
    "constant"         a

Random stream (CPU and CUDA kernels, and the eager reference, bit for bit): Philox4x32-10 keyed by
the int64 ``seed`` (key = (seed lo 32 bits, seed hi 32 bits)) with counter (g lo, g hi, 0, 0),
g = i // 4, where i is the element's offset in the concatenation of the flattened tensors; element
i takes lane i % 4. u = (lane >> 8) * 2^-24; normals come in pairs by Box-Muller from lanes (0, 1)
and (2, 3): z_even = sqrt(-2 ln u1) cos(2 pi u2), z_odd = ... sin(...), u1 = ((x_r >> 8) + 1) 2^-24.
The arithmetic lives in csrc/common/philox.h (exactly rounded float32 only, see there); outputs of
32 bits or fewer are computed in float32 and rounded to their dtype, float64 outputs in float64
from the same float32 draw (so fp64 values carry 24 random bits).
The Triton backend uses Triton's own Philox (``tl.randn``/``tl.rand`` keyed by the same seed and
global element index): a different, statistically equivalent stream.

``seed`` is a one-element int64 tensor on the tensors' device, read inside the kernel (never
``.item()``): a captured CUDA graph draws fresh numbers on each replay when the seed is advanced
in the graph, e.g. with ``advance_seed_(seed)`` (an in-place ``seed += 1``; distinct seeds are
distinct Philox keys, hence independent streams).

Backends: ``cpu`` (csrc/cpu/reinit.cpp), ``cuda`` (csrc/cuda/reinit.cu, one launch for up to 64
tensors), ``triton`` (fastsynth/kernels/reinit.py, one launch per dtype present in the list), ``reference``
(eager torch, mirrors the CPU/CUDA arithmetic op for op). No autograd formula: it is a mutating
op (``Tensor(a!)[]``) and works under ``torch.compile`` and ``opcheck``.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch

from .. import _ext
from ..backend import resolve_backend

DISTS = ("normal", "uniform", "kaiming_uniform", "constant")

__all__ = ["reinit_", "reinit_reference", "make_seed", "advance_seed_", "philox_draws"]
_DIST_CODE = {"normal": 0, "uniform": 1, "kaiming_uniform": 1, "constant": 2}  # philox::Dist
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# validation and per-tensor parameters
# ----------------------------------------------------------------------------------------------
def _fan_in(t: torch.Tensor) -> int:
    fan_in = t.shape[1]
    for s in t.shape[2:]:
        fan_in *= s
    return int(fan_in)


def _per_tensor(name, v, n, types) -> list:
    """``v`` as a list of n values: a scalar is broadcast, a list must have n entries."""
    vals = list(v) if isinstance(v, (list, tuple)) else [v]
    if len(vals) not in (1, n):
        raise ValueError(f"reinit_: {name} must be one value or a list of one per tensor ({n}), got {len(vals)}")
    for x in vals:
        if isinstance(x, bool) or not isinstance(x, types):
            want = "a str" if types is str else "a Python float"
            raise TypeError(f"reinit_: {name} must be {want} (or a list of them, one per tensor), got {x!r}")
    return [(x if types is str else float(x)) for x in vals] * (n if len(vals) == 1 else 1)


def _validate(tensors, seed, dist, a, b):
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"reinit_: tensors must be a list of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    compiling = torch.compiler.is_compiling()
    if not tensors:
        raise ValueError("reinit_: tensors must be a non-empty list")
    device = None
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"reinit_: tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"reinit_: tensors[{i}] must be a floating tensor (float32/64/16, bfloat16), got {t.dtype}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"reinit_: tensors[{i}] is on {t.device} but tensors[0] is on {device}; all must share one device")
        if not t.is_contiguous():
            raise ValueError(f"reinit_: tensors[{i}] must be contiguous (got strides {tuple(t.stride())}); "
                             "fill a contiguous tensor and copy it in")
        if not compiling and t.is_inference() and not torch.is_inference_mode_enabled():
            # what an in-place write to it does in eager PyTorch (the reference backend); the
            # kernels would write it regardless, so every backend refuses it here
            raise ValueError(f"reinit_: tensors[{i}] is an inference tensor (made under torch.inference_mode()); "
                             "it can only be re-initialised inside torch.inference_mode()")
    if device.type == "meta":
        raise ValueError("reinit_: tensors are meta tensors (no data to fill)")
    if not compiling:  # traced tensors have no storage address (nor inference flag) to check
        _check_no_overlap(tensors)
    if not isinstance(seed, torch.Tensor):
        raise TypeError(f"reinit_: seed must be a one-element int64 torch.Tensor, got {type(seed).__name__}")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(f"reinit_: seed must be a one-element int64 tensor, got dtype {seed.dtype} shape {tuple(seed.shape)}")
    if seed.device != device:
        raise ValueError(f"reinit_: seed must be on the tensors' device {device}, got {seed.device}")
    n = len(tensors)
    dists = _per_tensor("dist", dist, n, str)
    avals = _per_tensor("a", a, n, (int, float))
    bvals = _per_tensor("b", b, n, (int, float))
    for i, (d, ai, bi) in enumerate(zip(dists, avals, bvals)):
        if d not in DISTS:
            raise ValueError(f"reinit_: dist must be one of {DISTS} (or a list of them, one per tensor), got {d!r}")
        for name, v in (("a", ai), ("b", bi)):
            if not math.isfinite(v):
                raise ValueError(f"reinit_: {name} must be finite, got {v!r}")
        if d == "normal" and not bi > 0:
            raise ValueError(f"reinit_: normal needs std b > 0, got b={bi} (tensor {i})")
        if d == "uniform" and not ai < bi:
            raise ValueError(f"reinit_: uniform needs a < b, got a={ai}, b={bi} (tensor {i})")
        _check_range(i, tensors[i].dtype, d, ai, bi)
        if d == "kaiming_uniform":
            t = tensors[i]
            if t.dim() < 2:
                raise ValueError(f"reinit_: kaiming_uniform needs tensors of 2 or more dimensions (fan-in), "
                                 f"tensors[{i}] has shape {tuple(t.shape)}")
            if _fan_in(t) == 0:
                raise ValueError(f"reinit_: kaiming_uniform needs a non-zero fan-in, tensors[{i}] has shape {tuple(t.shape)}")
    return tensors, dists, avals, bvals


# |z| of a standard normal draw is below sqrt(-2 ln 2^-32) < 6.7 for the Box-Muller of the
# CPU/CUDA kernels (u1 >= 2^-24) and of Triton's tl.randn (u1 >= 2^-32)
_NORMAL_MAX_Z = 7.0


def _check_range(i: int, dtype: torch.dtype, dist: str, a: float, b: float) -> None:
    """Refuse parameters whose values would not fit the tensor's dtype (written as inf) or whose
    arithmetic overflows the compute type (float32 for 32 bits or fewer, float64 for float64):
    uniform computes a + (b - a) u, so b - a must be finite, or values land outside [a, b)."""
    big = torch.finfo(dtype).max
    big_compute = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max
    if dist == "constant":
        if abs(a) > big:
            raise ValueError(f"reinit_: constant a={a!r} does not fit tensors[{i}]'s dtype {dtype} (max {big:g})")
    elif dist == "uniform":
        if max(abs(a), abs(b)) > big:
            raise ValueError(f"reinit_: uniform bounds a={a!r}, b={b!r} must fit tensors[{i}]'s dtype {dtype} "
                             f"(|a|, |b| <= {big:g})")
        if b - a > big_compute:
            raise ValueError(f"reinit_: uniform needs b - a <= {big_compute:g} (the largest finite value of the "
                             f"compute type of {dtype}), got a={a!r}, b={b!r} (tensors[{i}])")
    elif dist == "normal":
        if abs(a) + _NORMAL_MAX_Z * b > big:
            raise ValueError(f"reinit_: normal mean a={a!r}, std b={b!r}: a + {_NORMAL_MAX_Z:g} b must fit "
                             f"tensors[{i}]'s dtype {dtype} (max {big:g}), or draws are written as inf")


def _check_no_overlap(tensors) -> None:
    """Two tensors of the list sharing memory would be written twice, in an order that differs
    between backends (the kernels write in parallel)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i)
                   for i, t in enumerate(tensors) if t.numel() > 0)
    for (s0, e0, i0), (s1, e1, i1) in zip(spans, spans[1:]):
        if s1 < e0:
            i, j = sorted((i0, i1))
            raise ValueError(f"reinit_: tensors[{i}] and tensors[{j}] overlap in memory; pass each tensor once")


def _params(t: torch.Tensor, dist: str, a: float, b: float) -> tuple[float, float]:
    """(lo, hi) of one tensor: normal (mean, std), uniform (a, b), constant (a, unused)."""
    if dist == "kaiming_uniform":
        bound = 1.0 / math.sqrt(_fan_in(t))  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3), bound sqrt(3)*gain/sqrt(fan_in)
        return -bound, bound
    return float(a), float(b)


# ----------------------------------------------------------------------------------------------
# eager reference: the arithmetic of csrc/common/philox.h, op for op, on int64/float32 tensors
# ----------------------------------------------------------------------------------------------
_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85


def _mulhilo(m: int, x: torch.Tensor):
    """(hi, lo) 32-bit halves of m * x for uint32 values held in int64, without int64 overflow."""
    xl, xh = x & 0xFFFF, x >> 16
    p_lo, p_hi = xl * m, xh * m                         # < 2^48 each
    lo_full = p_lo + ((p_hi & 0xFFFF) << 16)             # < 2^49
    return (p_hi >> 16) + (lo_full >> 32), lo_full & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcasting)."""
    for r in range(10):
        if r > 0:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _f32(v: float, device) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=device)


def _log_f32(u: torch.Tensor) -> torch.Tensor:
    dev = u.device
    bits = u.view(torch.int32).to(torch.int64)
    e = ((bits >> 23) & 0xFF) - 127
    mbits = (bits & 0x7FFFFF) | 0x3F800000
    big = mbits > 0x3FB504F3
    mbits = torch.where(big, mbits - 0x00800000, mbits)
    e = torch.where(big, e + 1, e)
    m = mbits.to(torch.int32).view(torch.float32)
    one = _f32(1.0, dev)
    s = (m - one) / (m + one)
    s2 = s * s
    p = s2 * _f32(float.fromhex("0x1.c71c72p-3"), dev)
    p = s2 * (_f32(float.fromhex("0x1.24924ap-2"), dev) + p)
    p = s2 * (_f32(float.fromhex("0x1.99999ap-2"), dev) + p)
    p = s2 * (_f32(float.fromhex("0x1.555556p-1"), dev) + p)
    lnm = (s + s) + s * p
    ef = e.to(torch.float32)
    return ef * _f32(float.fromhex("0x1.62e4p-1"), dev) + (lnm + ef * _f32(float.fromhex("0x1.7f7d1cp-20"), dev))


def _sincos_2pi(x: torch.Tensor):
    dev = x.device
    k = x >> 8
    j = (k + (1 << 21)) >> 22
    r = (k - j * (1 << 22)).to(torch.float32) * _f32(2.0 ** -22, dev)
    a = r * _f32(float.fromhex("0x1.921fb6p+0"), dev)
    a2 = a * a
    ps = a2 * _f32(float.fromhex("0x1.71de3ap-19"), dev)
    ps = a2 * (_f32(-float.fromhex("0x1.a01a02p-13"), dev) + ps)
    ps = a2 * (_f32(float.fromhex("0x1.111112p-7"), dev) + ps)
    ps = _f32(-float.fromhex("0x1.555556p-3"), dev) + ps
    sa = a + (a * a2) * ps
    pc = a2 * _f32(-float.fromhex("0x1.27e4fcp-22"), dev)
    pc = a2 * (_f32(float.fromhex("0x1.a01a02p-16"), dev) + pc)
    pc = a2 * (_f32(-float.fromhex("0x1.6c16c2p-10"), dev) + pc)
    pc = a2 * (_f32(float.fromhex("0x1.555556p-5"), dev) + pc)
    pc = a2 * (_f32(-0.5, dev) + pc)
    ca = _f32(1.0, dev) + pc
    q = j & 3
    c = torch.where(q == 0, ca, torch.where(q == 1, -sa, torch.where(q == 2, -ca, sa)))
    s = torch.where(q == 0, sa, torch.where(q == 1, ca, torch.where(q == 2, -sa, -ca)))
    return c, s


def _box_muller(x_r: torch.Tensor, x_a: torch.Tensor):
    dev = x_r.device
    u1 = ((x_r >> 8) + 1).to(torch.float32) * _f32(2.0 ** -24, dev)
    # float32 sqrt through float64: exactly rounded (torch.sqrt on float32 CPU tensors is not)
    radius = torch.sqrt((_f32(-2.0, dev) * _log_f32(u1)).double()).float()
    c, s = _sincos_2pi(x_a)
    return radius * c, radius * s


def philox_draws(seed: torch.Tensor, total: int, dist: str) -> torch.Tensor:
    """The float32 draws (N(0,1) for normal, U[0,1) otherwise) of global elements 0..total-1."""
    dev = seed.device
    groups = (total + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=dev)
    sd = seed.reshape(1)
    k0, k1 = sd & _MASK32, (sd >> 32) & _MASK32
    x = philox4x32_10(g & _MASK32, (g >> 32) & _MASK32, torch.zeros_like(g), torch.zeros_like(g), k0, k1)
    if dist == "normal":
        z0, z1 = _box_muller(x[0], x[1])
        z2, z3 = _box_muller(x[2], x[3])
        draws = torch.stack([z0, z1, z2, z3], dim=1)
    else:
        draws = torch.stack([(xi >> 8).to(torch.float32) * _f32(2.0 ** -24, dev) for xi in x], dim=1)
    return draws.reshape(-1)[:total]


_INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def _step_down(v: torch.Tensor) -> torch.Tensor:
    """Next representable value toward -inf (philox::step_down_bits)."""
    it = _INT_OF[v.dtype]
    bits = v.view(it)
    nbits = torch.iinfo(it).bits
    mag_zero = (bits & torch.iinfo(it).max) == 0
    stepped = torch.where(mag_zero, torch.full_like(bits, -(1 << (nbits - 1)) + 1),
                          torch.where(bits < 0, bits + 1, bits - 1))
    return stepped.view(v.dtype)


def reinit_reference(tensors: Sequence[torch.Tensor], seed: torch.Tensor, dists: Sequence[str],
                     avals: Sequence[float], bvals: Sequence[float]) -> None:
    """Eager oracle of ``reinit_`` (the ``reference`` backend): the same Philox draws and the same
    float32 (float64 for float64 tensors) arithmetic as the kernels, written with torch ops, one
    entry of ``dists``/``avals``/``bvals`` per tensor."""
    total = sum(t.numel() for t in tensors)
    normal = philox_draws(seed, total, "normal") if "normal" in dists else None
    uniform = philox_draws(seed, total, "uniform") if any(d in ("uniform", "kaiming_uniform") for d in dists) else None
    offset = 0
    for t, dist, a, b in zip(tensors, dists, avals, bvals):
        n = t.numel()
        lo, hi = _params(t, dist, a, b)
        if dist == "constant":
            if t.dtype == torch.float64:
                out = torch.full((n,), lo, dtype=torch.float64, device=t.device)
            else:
                out = _f32(lo, t.device).expand(n).to(t.dtype)
        else:
            d = (normal if dist == "normal" else uniform)[offset:offset + n]
            scale = hi if dist == "normal" else hi - lo
            if t.dtype == torch.float64:
                out = torch.tensor(lo, dtype=torch.float64, device=t.device) + \
                    torch.tensor(scale, dtype=torch.float64, device=t.device) * d.to(torch.float64)
            else:
                out = (_f32(lo, t.device) + _f32(scale, t.device) * d).to(t.dtype)
            if dist != "normal":
                out = torch.where(out.to(torch.float64) >= hi, _step_down(out), out)
        t.copy_(out.view(t.shape))
        offset += n


# ----------------------------------------------------------------------------------------------
# registration: C++ op (cpu, cuda) fake kernel; Triton custom op
# ----------------------------------------------------------------------------------------------
if _ext.has_extension():
    @torch.library.register_fake("fastsynth::reinit_")
    def _reinit_fake(tensors, seed, dist, a, b):  # mutates its inputs, returns nothing
        return None


@torch.library.custom_op("fastsynth::reinit_triton", mutates_args=("tensors",))
def _reinit_triton(tensors: List[torch.Tensor], seed: torch.Tensor, dist: List[int], a: List[float],
                   b: List[float]) -> None:
    """dist: indices into DISTS (custom_op schemas have no str[]), one or one per tensor."""
    from ..kernels import reinit as kernel  # imports triton only when used

    n = len(tensors)
    dists = [DISTS[d] for d in dist]
    dists = dists * n if len(dists) == 1 else dists
    avals = a * n if len(a) == 1 else list(a)
    bvals = b * n if len(b) == 1 else list(b)
    params = [_params(t, d, ai, bi) for t, d, ai, bi in zip(tensors, dists, avals, bvals)]
    kernel.reinit(tensors, seed, [_DIST_CODE[d] for d in dists], params)


@_reinit_triton.register_fake
def _reinit_triton_fake(tensors, seed, dist, a, b):
    return None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def reinit_(tensors: Sequence[torch.Tensor], seed: torch.Tensor, dist: str | Sequence[str] = "normal",
            a: float | Sequence[float] = 0.0, b: float | Sequence[float] = 1.0, backend: str | None = None) -> None:
    """Fill every tensor of ``tensors`` in place (one fused launch); see the module docstring.

    ``dist``, ``a`` and ``b`` are one value for all tensors or a list with one per tensor (e.g.
    ``reinit_([w, bias], seed, ["normal", "constant"], [0.0, 0.0], [1.0, 0.0])``).
    """
    tensors, dists, avals, bvals = _validate(tensors, seed, dist, a, b)
    be = resolve_backend(backend, tensors[0].device, "reinit_")
    # pass one entry when all tensors agree (the kernels broadcast it)
    if len(set(dists)) == 1 and len(set(avals)) == 1 and len(set(bvals)) == 1:
        dists, avals, bvals = dists[:1], avals[:1], bvals[:1]
    with torch.no_grad():
        if be == "reference":
            n = len(tensors)
            reinit_reference(tensors, seed, dists * (n if len(dists) == 1 else 1),
                              avals * (n if len(avals) == 1 else 1), bvals * (n if len(bvals) == 1 else 1))
        elif be == "triton":
            torch.ops.fastsynth.reinit_triton(tensors, seed, [DISTS.index(d) for d in dists], avals, bvals)
        else:
            torch.ops.fastsynth.reinit_(tensors, seed, dists, avals, bvals)


def make_seed(value: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """A one-element int64 seed tensor on ``device`` (from ``torch.randint`` when ``value`` is None,
    so it follows ``torch.manual_seed``)."""
    if value is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64).to(device)
    return torch.tensor([int(value)], dtype=torch.int64, device=device)


def advance_seed_(seed: torch.Tensor, step: int = 1) -> torch.Tensor:
    """Advance ``seed`` in place (``seed += step``) on its device, without a host sync: inside a
    captured CUDA graph each replay then re-initialises from a fresh Philox key. Returns ``seed``."""
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("advance_seed_: seed must be a one-element int64 tensor")
    return seed.add_(step)
