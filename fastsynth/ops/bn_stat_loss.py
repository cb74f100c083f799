"""BatchNorm-statistics matching loss (DeepInversion).

Math (per BatchNorm layer l with input a of shape N x C x H x W, M = N*H*W):

    mu_c  = mean_{n,h,w} a[n,c,h,w]
    var_c = mean_{n,h,w} (a[n,c,h,w] - mu_c)^2                     (biased)
    R_l   = || rv - (1-rho) var - rho var_bar ||_2 + || rm - (1-rho) mu - rho mu_bar ||_2
            (rho = 0, i.e. plain || rv - var || + || rm - mu ||, while no momentum state exists)
    L     = sum_l w_l R_l                                           (w_l = 1 by default)

Gradient: with r = target - f(stat), dR/dstat = -(1-rho) r / ||r|| (0 where ||r|| = 0), and
    dL/da[n,c,h,w] = g_mu_c / M + 2 g_var_c (a[n,c,h,w] - mu_c) / M.

Structure: the only passes over the feature maps are the statistics op (one read) and its
backward op (one read of x, one write of dL/da); everything per-channel (the norms and their
gradient, g_mu and g_var) is the tiny ``loss_from_stats`` graph, differentiated by autograd.

    fastsynth::bn_batch_stats(x) -> (mean, var)                       C++ (cpu, cuda)
    fastsynth::bn_batch_stats_backward(x, mean, g_mean, g_var) -> dL/dx
    fastsynth::bn_batch_stats_multi(xs) -> (means, vars)              all layers, one launch
    fastsynth::bn_batch_stats_multi_backward(xs, means, g_means, g_vars) -> [dL/dx]
    fastsynth::bn_batch_stats_multi_triton / ..._backward_triton      Triton (custom_op)

Accepted maps: 4-D (N, C, H, W) as BatchNorm2d sees them, and 2-D (N, C) / 3-D (N, C, L) as
BatchNorm1d sees them; statistics over every dim but dim 1, in any layout (NCHW,
channels_last, sliced) without copies. fp16/bf16 maps give fp32 statistics, fp64 gives fp64.
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Sequence

import torch

__all__ = ["bn_stat_loss", "bn_stat_loss_multi", "loss_from_stats", "bn_batch_stats_reference",
           "loss_from_stats_reference"]


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 statistics are accumulated and returned in fp32; fp64 stays fp64
    return torch.float64 if dtype == torch.float64 else torch.float32


def _safe_norm(sq: torch.Tensor) -> torch.Tensor:
    """sqrt of a sum of squares with gradient 0 (not NaN) where the sum is 0; a NaN/Inf sum
    propagates (as torch.norm does in the reference)."""
    zero = sq == 0
    return torch.where(zero, torch.zeros_like(sq), torch.where(zero, torch.ones_like(sq), sq).sqrt())


_SEGMENT_IDS: "OrderedDict" = OrderedDict()
# Small constant tensors (segment indices, zeros, per-layer weights) built once per key and device
# so that a step does not pay a host-to-device copy for them. The keys include the per-layer
# weights and the loss scale, which a caller may change every step (a schedule on the ``bn``
# coefficient): least-recently-used entries beyond this many are dropped.
_TABLE_MAX = 64


def _table(key, make):
    """The cached value of ``key`` (made by ``make()`` on a miss); bounded LRU. The values are
    pure functions of their key and never written to, so reusing them cannot go stale."""
    hit = _SEGMENT_IDS.get(key)
    if hit is None:
        hit = _SEGMENT_IDS[key] = make()
        if len(_SEGMENT_IDS) > _TABLE_MAX:
            _SEGMENT_IDS.popitem(last=False)
    else:
        _SEGMENT_IDS.move_to_end(key)
    return hit


def _segment_ids(sizes: tuple, device: torch.device) -> torch.Tensor:
    """Layer index of every channel, built once per (layer sizes, device): the synthesis loop calls
    this with the same sizes every step, and rebuilding it costs a host-to-device copy each time."""
    return _table((sizes, str(device)),
                  lambda: torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device))


def _layer_segments(sizes: tuple, device: torch.device) -> torch.Tensor:
    """Segment index of every entry of cat([vars..., means...]): layer l's variances are segment l,
    its means segment L + l (cached like ``_segment_ids``)."""
    L = len(sizes)
    return _table(("vm", sizes, str(device)),
                  lambda: torch.repeat_interleave(torch.arange(2 * L), torch.tensor(sizes + sizes)).to(device))


def _cat_constants(ts: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """cat(ts) cast to ``dtype``, read afresh on every call. The running buffers and momentum state
    look constant across the inner steps of a round, but a version-counter check cannot prove it:
    writes through ``.data``, through ``.numpy()`` and BatchNorm's own running-statistics update in
    a train-mode forward do not move ``_version``. The copy is a few thousand values."""
    out = ts[0] if len(ts) == 1 else torch.cat(list(ts))
    return out.to(dtype)


def _scaled_segment_norms(r: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """Per-segment 2-norms of ``r`` that do not overflow where the norm itself fits: float32 (and
    lower) residuals are squared and summed in float64, whose range holds the square of any
    float32; float64 residuals are divided by their segment's largest magnitude before squaring
    (the scaling of a careful norm). NaN propagates, an infinite entry gives inf. Differentiable
    by autograd (the scale is a constant), gradient 0 where a segment's norm is 0."""
    if r.dtype != torch.float64:
        r64 = r.to(torch.float64)
        sq = torch.zeros(n, dtype=torch.float64, device=r.device).index_add(0, seg, r64 * r64)
        return _safe_norm(sq).to(r.dtype)
    m = torch.zeros(n, dtype=r.dtype, device=r.device).scatter_reduce(0, seg, r.detach().abs(), "amax")
    m = torch.where((m == 0) | torch.isinf(m), torch.ones_like(m), m)  # inf: r/1 keeps the inf
    u = r / m.index_select(0, seg)
    sq = torch.zeros(n, dtype=r.dtype, device=r.device).index_add(0, seg, u * u)
    return _safe_norm(sq) * m


def _careful_norm(v: torch.Tensor) -> torch.Tensor:
    """torch.norm(v, 2) without the overflow of squaring: v is divided by its largest magnitude
    first (a constant for autograd: the norm is scale-invariant). Reference backend."""
    m = v.detach().abs().amax()
    m = torch.where((m == 0) | torch.isinf(m), torch.ones_like(m), m)
    return torch.linalg.vector_norm(v / m) * m


def _segment_norms_nograd(r: torch.Tensor, seg: torch.Tensor, zeros: torch.Tensor,
                          zeros_r: torch.Tensor | None) -> torch.Tensor:
    """``_scaled_segment_norms`` in the fewest ops, for the forward of ``_StatLoss`` (no autograd);
    ``zeros``: float64 zeros, one per segment; ``zeros_r``: float64 zeros shaped like ``r`` (None
    for float64 ``r``): addcmul(zeros_r, r, r) squares in float64 in one op (type promotion)."""
    if r.dtype != torch.float64:
        return torch.index_add(zeros, 0, seg, torch.addcmul(zeros_r, r, r)).sqrt_().to(r.dtype)
    m = zeros.scatter_reduce(0, seg, r.abs(), "amax")
    m = torch.where((m == 0) | torch.isinf(m), torch.ones_like(m), m)
    u = r / m.index_select(0, seg)
    return torch.index_add(zeros, 0, seg, u * u).sqrt_().mul_(m)


class _StatLoss(torch.autograd.Function):
    """loss = sum_k w_k ||r_k||,  r = target - (1-rho) s - rho sbar  over the 2L segments k of the
    concatenated statistics s = [vars..., means...]; analytic backward
    dL/ds_c = -(1-rho) w_k g r_c / ||r_k||  (0 where ||r_k|| = 0, NaN propagates).
    A fixed, small number of ops whatever L is, and one split for the backward. The norms are
    formed without overflowing where they fit (``_segment_norms_nograd``)."""

    @staticmethod
    def forward(ctx, target, sbar, rho, seg, zeros, zeros_r, w2, nw2, sizes, *stats):
        with torch.autocast(device_type=zeros.device.type, enabled=False):  # fp32/fp64 math as given
            s = torch.cat(stats)
            if sbar is None:  # no momentum state: rho = 0
                r = target - s
            else:
                r = torch.sub(torch.sub(target, s, alpha=1.0 - rho), sbar, alpha=rho)
            norm = _segment_norms_nograd(r, seg, zeros, zeros_r)
            loss = norm.sum() if w2 is None else torch.dot(norm, w2)
        ctx.save_for_backward(r, norm, nw2, seg)
        ctx.rho, ctx.sizes = rho, sizes
        return loss

    @staticmethod
    def backward(ctx, g):
        r, norm, nw2, seg = ctx.saved_tensors
        # coef_k = -(1-rho) * g * w_k / ||r_k||, then 0 where ||r_k|| = 0 (nw2 = -(1-rho) w)
        num = g * -(1.0 - ctx.rho) if nw2 is None else nw2 * g
        coef = (num / norm).masked_fill_(norm == 0, 0.0)
        grad_s = coef.index_select(0, seg).mul_(r)
        grads = grad_s.split_with_sizes(ctx.sizes)
        return (None,) * 9 + tuple(grads)


def _loss_from_stats_fused(means, variances, running_means, running_vars, mmt_means, mmt_vars, rho, weights,
                           scale, dtype, device, sizes):
    L = len(sizes)  # layers; means/variances may be one concatenated part each
    # the running statistics and momentum state are read on every call (eager, traced by
    # torch.compile or captured in a CUDA graph, whose replays then read their current values)
    target = _cat_constants(list(running_vars) + list(running_means), dtype)
    sbar = None
    if mmt_means is not None:
        sbar = _cat_constants(list(mmt_vars) + list(mmt_means), dtype)
    seg = _layer_segments(tuple(sizes), device)
    dev = str(device)
    n = 2 * sum(sizes)
    zeros = _table(("zeros", 2 * L, dev), lambda: torch.zeros(2 * L, dtype=torch.float64, device=device))
    zeros_r = None if dtype == torch.float64 else \
        _table(("zeros", n, dev), lambda: torch.zeros(n, dtype=torch.float64, device=device))
    w2 = nw2 = None
    if weights is not None or scale != 1.0:
        w = [1.0] * L if weights is None else [float(v) for v in weights]
        w2 = _table(("w2", tuple(w), float(scale), dtype, dev),
                    lambda: torch.tensor([v * scale for v in w] * 2, dtype=dtype, device=device))
        nw2 = _table(("nw2", tuple(w), float(scale), float(rho), dtype, dev),
                     lambda: torch.tensor([-(1.0 - rho) * v * scale for v in w] * 2, dtype=dtype, device=device))
    stats = tuple(t.reshape(-1) if t.dim() != 1 else t for t in list(variances) + list(means))
    return _StatLoss.apply(target, sbar, float(rho), seg, zeros, zeros_r, w2, nw2, [t.numel() for t in stats],
                           *stats)


def loss_from_stats(means: Sequence[torch.Tensor], variances: Sequence[torch.Tensor],
                    running_means: Sequence[torch.Tensor], running_vars: Sequence[torch.Tensor],
                    mmt_means: Sequence[torch.Tensor | None] | None = None,
                    mmt_vars: Sequence[torch.Tensor | None] | None = None, mmt_rate: float = 0.0,
                    weights: torch.Tensor | Sequence[float] | None = None, scale: float = 1.0) -> torch.Tensor:
    """Summed BN-statistics loss of L layers from their batch statistics (differentiable in
    ``means`` and ``variances``), as a fixed number of vectorised ops whatever L is.

    ``mmt_means[l]``/``mmt_vars[l]`` may be None for a layer with no momentum state yet (that
    layer uses the plain loss). ``weights``: optional per-layer weights (length L). ``scale``: a
    constant factor on the whole loss (the synthesizers' ``bn`` coefficient, folded in here so
    it costs no extra op).

    Fast path (the synthesis steady state: constant running buffers / momentum state / float
    weights that need no gradient): one autograd node, ``_StatLoss``, of ~6 forward and ~6
    backward ops. Otherwise (a momentum state on only some layers, or tensors of the loss's
    constants requiring grad) the plain autograd formulation below.
    """
    L = len(means)
    if L == 0:
        raise ValueError("loss_from_stats: need at least one layer")
    if not (len(variances) == len(running_means) == len(running_vars) == L):
        raise ValueError(
            f"loss_from_stats: got {L} means, {len(variances)} variances, {len(running_means)} running_means, "
            f"{len(running_vars)} running_vars; all must have one entry per layer"
        )
    for nm, seq in (("means", means), ("variances", variances), ("running_means", running_means),
                    ("running_vars", running_vars)):
        for i, t in enumerate(seq):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"loss_from_stats: {nm}[{i}] must be a tensor, got {type(t).__name__}")
    _check_rate(mmt_rate)
    _check_rate(scale, "scale")
    _check_weights(weights, L)
    sizes = [int(m.numel()) for m in means]
    return _loss_from_stat_parts(means, variances, sizes, running_means, running_vars, mmt_means, mmt_vars, mmt_rate,
                                 weights, scale)


def _flat(ts, dtype=None):
    # one layer: no concatenation copy
    t = ts[0].reshape(-1) if len(ts) == 1 else torch.cat([r.reshape(-1) for r in ts])
    return t if dtype is None else t.to(dtype)


def _loss_from_stat_parts(means, variances, sizes, running_means, running_vars, mmt_means, mmt_vars, mmt_rate,
                          weights, scale=1.0):
    """loss_from_stats of per-channel statistics given in parts whose concatenation covers the
    layers in order (``sizes``: channels per layer): one tensor per layer, or one tensor for all
    layers, as the fused multi-layer statistics op returns them (used as is, no split)."""
    L = len(sizes)
    dtype = means[0].dtype
    device = means[0].device

    has_mmt = mmt_means is not None and any(m is not None for m in mmt_means)
    if has_mmt and (mmt_vars is None or len(mmt_means) != L or len(mmt_vars) != L):
        raise ValueError("loss_from_stats: mmt_means and mmt_vars must both have one entry per layer")
    full_mmt = has_mmt and all(m is not None for m in mmt_means) and all(v is not None for v in mmt_vars)
    consts = list(running_means) + list(running_vars) + (list(mmt_means) + list(mmt_vars) if full_mmt else [])
    # tensor weights would have to be read back to the host for the fast path: plain path
    if (not isinstance(weights, torch.Tensor)) and (not has_mmt or full_mmt) and not any(t.requires_grad for t in consts) and \
            all(v.dtype == dtype for v in variances):
        return _loss_from_stats_fused(means, variances, running_means, running_vars,
                                      mmt_means if full_mmt else None, mmt_vars if full_mmt else None,
                                      float(mmt_rate) if full_mmt else 0.0, weights, float(scale), dtype, device,
                                      sizes)

    def flat(ts, cast=False):
        return _flat(ts, dtype if cast else None)

    mu = flat(means)
    var = flat(variances)
    rm = flat(running_means, True)
    rv = flat(running_vars, True)

    if has_mmt:
        if full_mmt:
            rho = float(mmt_rate)
            mbar = flat(mmt_means, True)
            vbar = flat(mmt_vars, True)
        else:
            rho = torch.cat([
                torch.full((n,), float(mmt_rate) if m is not None else 0.0, dtype=dtype, device=device)
                for n, m in zip(sizes, mmt_means)
            ])
            mbar = torch.cat([
                (m.reshape(-1).to(dtype) if m is not None else torch.zeros(n, dtype=dtype, device=device))
                for n, m in zip(sizes, mmt_means)
            ])
            vbar = torch.cat([
                (v.reshape(-1).to(dtype) if v is not None else torch.zeros(n, dtype=dtype, device=device))
                for n, v in zip(sizes, mmt_vars)
            ])
        r_mean = rm - (1 - rho) * mu - rho * mbar
        r_var = rv - (1 - rho) * var - rho * vbar
    else:
        r_mean = rm - mu
        r_var = rv - var

    seg = _segment_ids(tuple(sizes), device)
    per_layer = _scaled_segment_norms(r_var, seg, L) + _scaled_segment_norms(r_mean, seg, L)
    if weights is not None:
        per_layer = per_layer * torch.as_tensor(weights, dtype=dtype, device=device)
    loss = per_layer.sum()
    return loss * scale if scale != 1.0 else loss


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
from .. import _ext  # noqa: E402
from ..backend import check_tensor, resolve_backend  # noqa: E402

_MAP_NDIM = (2, 3, 4)


def _check_layer(x_name: str, x, stats: dict, ref: torch.Tensor | None = None, required: int = 2):
    """Validate one layer: the map ``x`` (named ``x_name``) and its per-channel vectors ``stats``
    (name -> tensor or None; the first ``required`` of them, the running statistics, must be
    tensors); ``ref`` is the first map of a multi-layer call."""
    check_tensor(x_name, x, ndim=_MAP_NDIM)
    if ref is not None:
        if x.device != ref.device:
            raise ValueError(f"{x_name} must be on {ref.device} like features[0], got {x.device}")
        if x.dtype != ref.dtype:
            raise TypeError(f"{x_name} must have dtype {ref.dtype} like features[0], got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{x_name} must have a non-empty batch (N*H*W > 0), got shape {tuple(x.shape)}")
    C = x.shape[1]
    allowed = tuple(dict.fromkeys((x.dtype, _stat_dtype(x.dtype))))
    for i, (name, t) in enumerate(stats.items()):
        if t is None:
            if i < required:
                raise TypeError(f"{name} must be a tensor of shape ({C},) (the BatchNorm's running statistic; "
                                f"a BatchNorm built with track_running_stats=False has none), got None")
            continue
        check_tensor(name, t, device=x.device)
        if t.dtype not in allowed:
            raise TypeError(f"{name} must have dtype {' or '.join(str(a) for a in allowed)} "
                            f"(the feature map is {x.dtype}), got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != C:
            raise ValueError(f"{name} must have shape ({C},) to match the {C} channels of {x_name}, "
                             f"got {tuple(t.shape)}")


def _check_rate(mmt_rate, name: str = "mmt_rate"):
    if isinstance(mmt_rate, (bool, torch.Tensor)) or not isinstance(mmt_rate, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {type(mmt_rate).__name__}")
    if not math.isfinite(float(mmt_rate)):
        raise ValueError(f"{name} must be finite, got {mmt_rate!r}")


def _check_weights(weights, L: int):
    """``weights``: None, a list/tuple of L finite numbers, or a 1-D tensor of L values (finite;
    checked on CPU tensors only, as reading a GPU tensor back would stall the device)."""
    if weights is None:
        return
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1 or weights.numel() != L:
            raise ValueError(f"weights must be a 1-D tensor with one entry per layer ({L},), "
                             f"got shape {tuple(weights.shape)}")
        if weights.dtype == torch.bool or weights.is_complex():
            raise TypeError(f"weights must be a real-valued tensor, got dtype {weights.dtype}")
        if weights.device.type == "cpu" and weights.dtype.is_floating_point and not bool(torch.isfinite(weights).all()):
            raise ValueError(f"weights must be finite, got {weights.tolist()}")
        return
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of floats (one per layer) or a 1-D tensor, "
                        f"got {type(weights).__name__}")
    if len(weights) != L:
        raise ValueError(f"weights must have one entry per layer ({L}), got {len(weights)}")
    for i, w in enumerate(weights):
        if isinstance(w, (bool, torch.Tensor)) or not isinstance(w, numbers.Real):
            raise TypeError(f"weights[{i}] must be a Python float, got {type(w).__name__}")
        if not math.isfinite(float(w)):
            raise ValueError(f"weights[{i}] must be finite, got {w!r}")


# --------------------------------------------------------------------------------------------
# reference backend: eager PyTorch written the way the upstream hook computes it
# --------------------------------------------------------------------------------------------
def bn_batch_stats_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = x.to(_stat_dtype(x.dtype))
    nch = a.shape[1]
    dims = [0] + list(range(2, a.dim()))
    mean = a.mean(dims)
    var = a.transpose(0, 1).contiguous().view(nch, -1).var(1, unbiased=False)
    return mean, var


def loss_from_stats_reference(means, variances, running_means, running_vars, mmt_means=None, mmt_vars=None,
                              mmt_rate=0.0, weights=None):
    """``sum_l w_l R_l`` layer by layer, as the upstream hooks compute it (a layer whose momentum
    state is None uses the plain loss)."""
    total = None
    for i, (mean, var) in enumerate(zip(means, variances)):
        rm = running_means[i].to(mean.dtype)
        rv = running_vars[i].to(mean.dtype)
        mm = None if mmt_means is None else mmt_means[i]
        mv = None if mmt_vars is None else mmt_vars[i]
        # torch.norm as upstream, but scaled before squaring (_careful_norm): no float32 overflow
        if mm is None:
            r = _careful_norm(rv - var) + _careful_norm(rm - mean)
        else:
            r = (_careful_norm(rv - (1 - mmt_rate) * var - mmt_rate * mv.to(var.dtype))
                 + _careful_norm(rm - (1 - mmt_rate) * mean - mmt_rate * mm.to(mean.dtype)))
        if weights is not None:
            r = r * weights[i]
        total = r if total is None else total + r
    return total


# --------------------------------------------------------------------------------------------
# registration of the C++ ops (fake kernels, autograd)
# --------------------------------------------------------------------------------------------
def _fake_stats(x):
    c = x.shape[1]
    sdt = _stat_dtype(x.dtype)
    return x.new_empty((c,), dtype=sdt), x.new_empty((c,), dtype=sdt)


def _fake_stats_multi(xs):
    c = sum(x.shape[1] for x in xs)
    sdt = _stat_dtype(xs[0].dtype)
    return xs[0].new_empty((c,), dtype=sdt), xs[0].new_empty((c,), dtype=sdt)


def _fake_backward(x, mean, g_mean, g_var):
    return torch.empty_like(x)


def _fake_backward_multi(xs, means, g_means, g_vars):
    return [torch.empty_like(x) for x in xs]


def _grads_or_zeros(means, g_means, g_vars):
    # an unused output gets no gradient; it contributes zero
    return (g_means if g_means is not None else torch.zeros_like(means),
            g_vars if g_vars is not None else torch.zeros_like(means))


def _setup_stats_multi(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0], output[0])


def _make_backward_multi(backward_op):
    def _backward(ctx, g_means, g_vars):
        *xs, means = ctx.saved_tensors
        g_means, g_vars = _grads_or_zeros(means, g_means, g_vars)
        return list(backward_op(list(xs), means, g_means, g_vars))
    return _backward


if _ext.has_extension():
    torch.library.register_fake("fastsynth::bn_batch_stats")(_fake_stats)
    torch.library.register_fake("fastsynth::bn_batch_stats_multi")(_fake_stats_multi)
    torch.library.register_fake("fastsynth::bn_batch_stats_backward")(_fake_backward)
    torch.library.register_fake("fastsynth::bn_batch_stats_multi_backward")(_fake_backward_multi)
    # autograd of the C++ ops: csrc/autograd/bn_stat_loss.cpp (the formulas of _make_backward_multi,
    # registered for the Autograd key, without a Python wrapper per call)


# --------------------------------------------------------------------------------------------
# Triton ops (the kernels module is imported inside the op bodies: fastsynth imports without Triton)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastsynth::bn_batch_stats_multi_triton", mutates_args=())
def _bn_batch_stats_multi_triton(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import bn_stat_loss as k

    return k.bn_batch_stats_multi(list(xs))


@torch.library.custom_op("fastsynth::bn_batch_stats_multi_backward_triton", mutates_args=())
def _bn_batch_stats_multi_backward_triton(xs: list[torch.Tensor], means: torch.Tensor, grad_means: torch.Tensor,
                                          grad_vars: torch.Tensor) -> list[torch.Tensor]:
    from ..kernels import bn_stat_loss as k

    return k.bn_batch_stats_multi_backward(list(xs), means, grad_means, grad_vars)


_bn_batch_stats_multi_triton.register_fake(_fake_stats_multi)
_bn_batch_stats_multi_backward_triton.register_fake(_fake_backward_multi)
_bn_batch_stats_multi_triton.register_autograd(_make_backward_multi(_bn_batch_stats_multi_backward_triton),
                                               setup_context=_setup_stats_multi)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _stats_multi(xs: list[torch.Tensor], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable concatenated (means, vars) of all layers through one fused launch."""
    if backend == "triton":
        return _bn_batch_stats_multi_triton(xs)
    if len(xs) == 1:
        return torch.ops.fastsynth.bn_batch_stats(xs[0])
    return torch.ops.fastsynth.bn_batch_stats_multi(xs)


def bn_stat_loss(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mmt_mean: torch.Tensor | None = None,
    mmt_var: torch.Tensor | None = None,
    mmt_rate: float = 0.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepInversion BN-statistics loss of one layer.

    Returns ``(loss, batch_mean, batch_var)``: ``loss`` is differentiable w.r.t. ``x``;
    ``batch_mean``/``batch_var`` are detached (fp32 for fp16/bf16/fp32 maps, fp64 for fp64), for
    the momentum update. ``mmt_mean``/``mmt_var`` (both or neither): the momentum state; with it
    the loss uses ``(1-mmt_rate)*stat + mmt_rate*state``. ``backend``: None (by device),
    "reference", "cpu", "triton" or "cuda".
    """
    _check_layer("x", x, {"running_mean": running_mean, "running_var": running_var,
                          "mmt_mean": mmt_mean, "mmt_var": mmt_var})
    if (mmt_mean is None) != (mmt_var is None):
        raise ValueError("mmt_mean and mmt_var must be given together (or both None)")
    _check_rate(mmt_rate)
    be = resolve_backend(backend, x.device, "bn_stat_loss")
    if be == "reference":
        mean, var = bn_batch_stats_reference(x)
        loss = loss_from_stats_reference([mean], [var], [running_mean], [running_var],
                                         None if mmt_mean is None else [mmt_mean],
                                         None if mmt_var is None else [mmt_var], float(mmt_rate))
        return loss, mean.detach(), var.detach()
    mean, var = _stats_multi([x], be)
    loss = loss_from_stats([mean], [var], [running_mean], [running_var],
                           None if mmt_mean is None else [mmt_mean], None if mmt_var is None else [mmt_var],
                           float(mmt_rate))
    return loss, mean.detach(), var.detach()


def bn_stat_loss_multi(
    features: Sequence[torch.Tensor],
    running_means: Sequence[torch.Tensor],
    running_vars: Sequence[torch.Tensor],
    mmt_means: Sequence[torch.Tensor | None] | None = None,
    mmt_vars: Sequence[torch.Tensor | None] | None = None,
    mmt_rate: float = 0.0,
    weights: torch.Tensor | Sequence[float] | None = None,
    backend: str | None = None,
    stats_hook=None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Summed BN-statistics loss of several layers: ``sum_l w_l R_l``.

    ``features[l]`` is the input of BatchNorm layer l (shapes differ per layer; one dtype and
    device for all). ``mmt_means[l]``/``mmt_vars[l]`` may be None for a layer without momentum
    state. ``weights``: optional per-layer weights (e.g. NVlabs' first_bn_multiplier).
    Returns ``(loss, means, vars)`` with per-layer detached statistics. One statistics launch
    and one backward launch serve all layers.

    ``stats_hook(means, vars, sizes, counts) -> (means, vars)``: optional; receives the batch
    statistics of all layers as one flat (differentiable) buffer each, ``sizes`` (channels per
    layer) and ``counts`` (elements per channel, N*H*W, per layer), and returns the statistics the
    loss is computed from (and returned) instead, e.g. ``fastsynth.distributed.global_bn_stats``
    for statistics over every rank's batch. None: the batch statistics, with no extra op.
    """
    if isinstance(features, torch.Tensor) or not isinstance(features, (list, tuple)):
        raise TypeError(f"features must be a list of tensors, got {type(features).__name__}")
    L = len(features)
    if L == 0:
        raise ValueError("features must hold at least one feature map")
    for nm, seq in (("running_means", running_means), ("running_vars", running_vars),
                    ("mmt_means", mmt_means), ("mmt_vars", mmt_vars)):
        if seq is None and nm.startswith("mmt"):
            continue
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)) or len(seq) != L:
            raise ValueError(f"{nm} must be a list with one entry per feature map ({L})")
    if (mmt_means is None) != (mmt_vars is None):
        raise ValueError("mmt_means and mmt_vars must be given together (or both None)")
    _check_rate(mmt_rate)
    for i, x in enumerate(features):
        mm = None if mmt_means is None else mmt_means[i]
        mv = None if mmt_vars is None else mmt_vars[i]
        if (mm is None) != (mv is None):
            raise ValueError(f"mmt_means[{i}] and mmt_vars[{i}] must both be tensors or both None")
        _check_layer(f"features[{i}]", x, {f"running_means[{i}]": running_means[i], f"running_vars[{i}]": running_vars[i],
                                           f"mmt_means[{i}]": mm, f"mmt_vars[{i}]": mv},
                     features[0] if i else None)
    _check_weights(weights, L)
    be = resolve_backend(backend, features[0].device, "bn_stat_loss_multi")
    sizes = [int(x.shape[1]) for x in features]
    if stats_hook is not None:
        counts = [x.numel() // x.shape[1] for x in features]
        if be == "reference":
            per = [bn_batch_stats_reference(x) for x in features]
            mu_cat, var_cat = torch.cat([m for m, _ in per]), torch.cat([v for _, v in per])
        else:
            mu_cat, var_cat = _stats_multi(list(features), be)
        mu_cat, var_cat = stats_hook(mu_cat, var_cat, sizes, counts)
        if be == "reference":
            loss = loss_from_stats_reference(mu_cat.split(sizes), var_cat.split(sizes), running_means, running_vars,
                                             mmt_means, mmt_vars, float(mmt_rate), weights)
        else:
            loss = _loss_from_stat_parts([mu_cat], [var_cat], sizes, running_means, running_vars, mmt_means,
                                         mmt_vars, float(mmt_rate), weights)
        return loss, list(mu_cat.detach().split(sizes)), list(var_cat.detach().split(sizes))
    if be == "reference":
        means, variances = zip(*[bn_batch_stats_reference(x) for x in features])
        total = loss_from_stats_reference(means, variances, running_means, running_vars, mmt_means, mmt_vars,
                                          float(mmt_rate), weights)
        return total, [m.detach() for m in means], [v.detach() for v in variances]
    mu_cat, var_cat = _stats_multi(list(features), be)
    # the concatenated statistics feed the loss directly (no split + re-concatenation in autograd)
    loss = _loss_from_stat_parts([mu_cat], [var_cat], sizes, running_means, running_vars, mmt_means, mmt_vars,
                                 float(mmt_rate), weights)
    return loss, list(mu_cat.detach().split(sizes)), list(var_cat.detach().split(sizes))
