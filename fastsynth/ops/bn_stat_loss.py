"""BatchNorm-statistics matching loss (DeepInversion), spec section 1.

Math (per BatchNorm layer l with input a of shape N x C x H x W, M = N*H*W):

    mu_c  = mean_{n,h,w} a[n,c,h,w]
    var_c = mean_{n,h,w} (a[n,c,h,w] - mu_c)^2                     (biased)
    R_l   = || rv - (1-rho) var - rho var_bar ||_2 + || rm - (1-rho) mu - rho mu_bar ||_2
            (rho = 0, i.e. plain || rv - var || + || rm - mu ||, while no momentum state exists)
    L     = sum_l w_l R_l                                           (w_l = 1 by default)

Gradient: with r = target - f(stat), dR/dstat = -(1-rho) r / ||r|| (0 where ||r|| = 0), and
    dL/da[n,c,h,w] = g_mu_c / M + 2 g_var_c (a[n,c,h,w] - mu_c) / M.

This module: ``loss_from_stats`` (the per-channel part, shared by every backend and by the fused
teacher BatchNorm); the statistics kernels and ``bn_stat_loss``/``bn_stat_loss_multi`` follow.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 statistics are accumulated and returned in fp32; fp64 stays fp64
    return torch.float64 if dtype == torch.float64 else torch.float32


def _safe_norm(sq: torch.Tensor) -> torch.Tensor:
    """sqrt of a sum of squares with gradient 0 (not NaN) where the sum is 0."""
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def loss_from_stats(
    means: Sequence[torch.Tensor],
    variances: Sequence[torch.Tensor],
    running_means: Sequence[torch.Tensor],
    running_vars: Sequence[torch.Tensor],
    mmt_means: Sequence[torch.Tensor | None] | None = None,
    mmt_vars: Sequence[torch.Tensor | None] | None = None,
    mmt_rate: float = 0.0,
    weights: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """Summed BN-statistics loss of L layers from their batch statistics (differentiable in
    ``means`` and ``variances``), as a fixed number of vectorised ops whatever L is.

    ``mmt_means[l]``/``mmt_vars[l]`` may be None for a layer with no momentum state yet (that
    layer uses the plain loss). ``weights``: optional per-layer weights (length L).
    """
    L = len(means)
    if L == 0:
        raise ValueError("loss_from_stats: need at least one layer")
    if not (len(variances) == len(running_means) == len(running_vars) == L):
        raise ValueError(
            f"loss_from_stats: got {L} means, {len(variances)} variances, {len(running_means)} running_means, "
            f"{len(running_vars)} running_vars; all must have one entry per layer"
        )
    dtype = means[0].dtype
    device = means[0].device
    sizes = [int(m.numel()) for m in means]
    mu = torch.cat([m.reshape(-1) for m in means])
    var = torch.cat([v.reshape(-1) for v in variances])
    rm = torch.cat([r.reshape(-1) for r in running_means]).to(dtype)
    rv = torch.cat([r.reshape(-1) for r in running_vars]).to(dtype)

    has_mmt = mmt_means is not None and any(m is not None for m in mmt_means)
    if has_mmt:
        if mmt_vars is None or len(mmt_means) != L or len(mmt_vars) != L:
            raise ValueError("loss_from_stats: mmt_means and mmt_vars must both have one entry per layer")
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

    if L == 1:
        per_layer = _safe_norm((r_var * r_var).sum().reshape(1)) + _safe_norm((r_mean * r_mean).sum().reshape(1))
    else:
        seg = torch.repeat_interleave(torch.arange(L, device=device), torch.tensor(sizes, device=device))
        sq_var = torch.zeros(L, dtype=dtype, device=device).index_add(0, seg, r_var * r_var)
        sq_mean = torch.zeros(L, dtype=dtype, device=device).index_add(0, seg, r_mean * r_mean)
        per_layer = _safe_norm(sq_var) + _safe_norm(sq_mean)
    if weights is not None:
        w = torch.as_tensor(weights, dtype=dtype, device=device).reshape(-1)
        if w.numel() != L:
            raise ValueError(f"loss_from_stats: weights must have one entry per layer ({L}), got {w.numel()}")
        per_layer = per_layer * w
    return per_layer.sum()
