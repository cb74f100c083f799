"""torch.distributed for the synthesizers: the one module with process-group logic.

Used when the caller's default process group is initialised with more than one process
(``torchrun``, one process per GPU; NCCL on GPUs, gloo on CPUs). With no group, or a group of
one, every function here is the identity or a no-op and issues no collective.

- ``rank_seed``: each rank draws its own random stream (seed + rank).
- ``global_bn_stats``: the BN-statistics loss over the global synthesis batch. Every rank
  gathers all ranks' per-channel (mean, biased variance, count) of all layers in ONE collective
  and merges them exactly (the parallel-variance merge of Chan et al.). Every rank then computes
  the same global loss; the backward of the gather returns to each rank the gradient of that
  loss with respect to its own statistics only (no collective in the backward): summing the
  identical per-rank gradients instead (what ``torch.distributed.nn.all_gather`` does) would
  scale them by the world size.
- ``broadcast_module_``: rank 0's parameters and buffers to every rank (one broadcast per dtype).
- ``average_gradients_``: the mean of the gradients across ranks in one flat all_reduce per dtype.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["is_distributed", "rank", "world_size", "rank_seed", "unwrap", "global_bn_stats", "broadcast_module_",
           "average_gradients_"]


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """True when torch.distributed is available, its default group is initialised and it has
    more than one process."""
    return _initialised() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if _initialised() else 0


def world_size() -> int:
    """The default group's size (1 without one)."""
    return dist.get_world_size() if _initialised() else 1


def rank_seed(seed: int | None) -> int | None:
    """The seed of this rank's random stream: ``seed + rank()`` (None stays None)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"rank_seed: seed must be an int or None, got {type(seed).__name__}")
    return seed + rank()


def unwrap(module):
    """The user's module inside DistributedDataParallel / DataParallel wrappers (any depth);
    anything else is returned as is."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


# ------------------------------------------------------------------------------- BN statistics
_CONSTS: dict = {}


def _const(key, make):
    # small constant tensors (counts, segment ids) built once per key: a host-to-device copy per
    # step would cost a transfer on the synthesis hot path. Keys hold only layer shapes and
    # counts, which are fixed for a run; the size bound guards against a caller that varies them.
    t = _CONSTS.get(key)
    if t is None:
        if len(_CONSTS) > 64:
            _CONSTS.clear()
        t = _CONSTS[key] = make()
    return t


# all_gather_single is the newer name of all_gather_into_tensor (deprecated from torch 2.13)
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _GatherOwnGrad(torch.autograd.Function):
    """all_gather of one flat tensor into [world, n]; backward: this rank's row of the incoming
    gradient. Every rank evaluates the same function of the gathered tensor, so that row already
    is d(global loss)/d(this rank's input): nothing is communicated in the backward."""

    @staticmethod
    def forward(ctx, local, group):
        w = dist.get_world_size(group)
        out = local.new_empty(w * local.numel())  # the concatenated form, which every backend takes
        _gather_single(out, local.contiguous(), group=group)
        ctx.rank = dist.get_rank(group)
        return out.view(w, local.numel())

    @staticmethod
    def backward(ctx, g):
        return g[ctx.rank], None


def global_bn_stats(means: torch.Tensor, variances: torch.Tensor, counts: Sequence[int],
                    sizes: Sequence[int] | None = None, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global per-channel (mean, biased variance) of L BatchNorm layers over all ranks' batches.

    ``means`` / ``variances``: this rank's statistics of all layers in one flat buffer (layer l
    has ``sizes[l]`` channels; ``sizes=None``: one layer); ``counts[l]``: the number of elements
    each channel of layer l averaged over on this rank (N*H*W; ranks may differ). One all_gather
    per call carries all of it. The merge is exact:

        n = sum_r n_r,   mu = sum_r n_r mu_r / n,   var = sum_r n_r (var_r + (mu_r - mu)^2) / n

    Differentiable: the backward gives d(loss)/d(this rank's means, variances) for a loss that
    every rank computes identically from the result (see ``_GatherOwnGrad``). Without a
    process group of more than one rank, returns ``(means, variances)`` unchanged."""
    if means.dim() != 1 or variances.shape != means.shape:
        raise ValueError(f"global_bn_stats: means and variances must be 1-D of equal length (all layers' channels "
                         f"in one buffer), got shapes {tuple(means.shape)} and {tuple(variances.shape)}")
    sizes = [means.numel()] if sizes is None else [int(s) for s in sizes]
    counts = [int(c) for c in counts]
    if len(counts) != len(sizes) or sum(sizes) != means.numel():
        raise ValueError(f"global_bn_stats: counts must have one entry per layer ({len(sizes)} layers of "
                         f"{sizes} channels, {means.numel()} in all), got {len(counts)} counts and "
                         f"{sum(sizes)} channels")
    if any(c <= 0 for c in counts):
        raise ValueError(f"global_bn_stats: counts must be positive, got {counts}")
    if (group is None and not is_distributed()) or (group is not None and dist.get_world_size(group) == 1):
        return means, variances
    if variances.dtype != means.dtype:
        variances = variances.to(means.dtype)
    dtype, dev, C, L = means.dtype, means.device, means.numel(), len(sizes)
    n_local = _const(("n", tuple(counts), dtype, str(dev)), lambda: torch.tensor(counts, dtype=dtype, device=dev))
    local = torch.cat([means, variances, n_local])
    g = _GatherOwnGrad.apply(local, group)  # [world, 2C + L]
    mu_r, var_r, n_r = g[:, :C], g[:, C:2 * C], g[:, 2 * C:].detach()
    if L > 1:
        seg = _const(("seg", tuple(sizes), str(dev)),
                     lambda: torch.repeat_interleave(torch.arange(L), torch.tensor(sizes)).to(dev))
        n_r = n_r.index_select(1, seg)  # [world, C]: each channel's count
    w = n_r / n_r.sum(0)
    mu = (w * mu_r).sum(0)
    d = mu_r - mu
    var = (w * (var_r + d * d)).sum(0)
    return mu, var


# ------------------------------------------------------------------------------- modules, grads
def _by_dtype(tensors: Iterable[torch.Tensor]) -> dict:
    out: dict = {}
    for t in tensors:
        out.setdefault((t.dtype, t.device), []).append(t)
    return out


def broadcast_module_(module: nn.Module, src: int = 0, group=None) -> nn.Module:
    """Every parameter and buffer (non-persistent ones included) of ``module`` (unwrapped from
    DDP) set to rank ``src``'s values, in place: one broadcast per dtype. No-op on one process."""
    module = unwrap(module)
    if not is_distributed() and group is None:
        return module
    tensors = list(module.parameters()) + [b for b in module.buffers() if b is not None]
    with torch.no_grad():
        for ts in _by_dtype(tensors).values():
            flat = torch.cat([t.detach().reshape(-1) for t in ts])
            dist.broadcast(flat, src=src, group=group)
            torch._foreach_copy_(ts, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in ts]), ts)])
    return module


def average_gradients_(params_or_grads: Iterable[torch.Tensor], group=None) -> None:
    """Replace gradients by their mean across ranks, in place: one flat all_reduce (SUM, then a
    scale by 1/world) per dtype. Tensors that require grad (parameters) stand for their
    ``.grad`` (None ones are skipped: every rank must have the same set); others (gradient
    buffers) for themselves. No-op on one process."""
    if group is None and not is_distributed():
        return
    ts = []
    for t in params_or_grads:
        g = t.grad if t.requires_grad else t  # a parameter (or leaf) gives its .grad
        if g is not None:
            ts.append(g)
    if not ts:
        return
    inv = 1.0 / dist.get_world_size(group)
    with torch.no_grad():
        for group_ts in _by_dtype(ts).values():
            flat = torch.cat([t.reshape(-1) for t in group_ts])
            dist.all_reduce(flat, group=group)
            flat.mul_(inv)
            torch._foreach_copy_(group_ts, [f.view(t.shape) for f, t in
                                            zip(flat.split([t.numel() for t in group_ts]), group_ts)])
