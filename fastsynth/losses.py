"""Drop-in replacements of the upstream DFKD criteria (zju-vipa/CMI and Fast-Datafree
``datafree/criterions.py``) with the same signatures and results, running the fused logit-loss
kernels of fastsynth.ops.logit_losses where they apply.

    kldiv(logits, targets, T=1.0, reduction='batchmean')
        = F.kl_div(log_softmax(logits/T), softmax(targets/T), reduction) * T^2
        i.e. T^2 KL(softmax(targets/T) || softmax(logits/T))
        T a number or a tensor (a learnable temperature, as upstream): a 0-d tensor runs fused,
        other shapes the upstream eager formula; the gradient reaches T when it requires grad
    KLDiv(T=1.0, reduction='batchmean')       module form of kldiv
    jsdiv(logits, targets, T=1.0, reduction='batchmean')
        P = softmax(logits/T), Q = softmax(targets/T), M = (P + Q)/2, each clamped to [0.01, 0.99],
        0.5 KL(M||P) + 0.5 KL(M||Q) with F.kl_div's reduction (no T^2 factor)

Fused path: 2-D logits of one floating dtype with reduction 'batchmean', 'sum' or 'mean' (the
fused ops compute scale * sum_i row_i; the reduction only sets the scale). Other inputs
(reduction='none', which returns the elementwise [N, C] tensor, logits of more than 2 dims such
as segmentation maps, mixed dtypes) run the upstream eager formula. The result has the dtype of
the logits, as upstream.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .backend import resolve_backend
from .ops import logit_losses as _ll

__all__ = ["kldiv", "KLDiv", "jsdiv"]

_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _row_scale(reduction: str, n: int, c: int) -> float:
    # F.kl_div reductions of an [N, C] elementwise tensor: batchmean /N, mean /(N*C), sum 1
    return {"batchmean": 1.0 / n, "mean": 1.0 / (n * c), "sum": 1.0}[reduction]


def _fusable(logits, targets, reduction: str) -> bool:
    return (
        reduction != "none"
        and isinstance(logits, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and logits.dim() == 2
        and logits.shape == targets.shape
        and logits.dtype == targets.dtype
        and logits.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        and logits.device == targets.device
        and logits.numel() > 0
    )


def _fused_backend(op: str, logits, targets, reduction: str, temperature_fusable: bool = True) -> str | None:
    """The backend of the fused kernel, or None where the upstream eager formula runs (inputs
    outside the fused path, or the reference backend)."""
    if not (_fusable(logits, targets, reduction) and temperature_fusable):
        return None
    backend = resolve_backend(None, logits.device, op)
    return None if backend == "reference" else backend


def _as_logits(loss, logits):
    # the result has the dtype of the logits, as upstream
    return loss if loss.dtype == logits.dtype else loss.to(logits.dtype)


def _check_reduction(op: str, reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_pair(op: str, logits, targets) -> None:
    for name, t in (("logits", logits), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    try:
        torch.broadcast_shapes(logits.shape, targets.shape)
    except RuntimeError:
        raise ValueError(f"{op}: targets of shape {tuple(targets.shape)} do not match logits of shape "
                         f"{tuple(logits.shape)} (expected the same [N, C] shape)") from None


def _check_tensor_temperature(op: str, T: torch.Tensor) -> None:
    # The value is not checked: that would need it on the host (a sync per call for a learnable T
    # on the GPU); a T <= 0 or NaN gives what the upstream formula gives.
    if T.dtype == torch.bool or T.is_complex():
        raise TypeError(f"{op}: a tensor T must be real (a learnable temperature), got dtype {T.dtype}")


def _fusable_temperature(T, logits) -> bool:
    # a 0-d tensor on the logits' device (or a 0-d CPU tensor, which torch treats as a scalar)
    return T.dim() == 0 and (T.device == logits.device or T.device.type == "cpu")


def kldiv(logits, targets, T=1.0, reduction="batchmean"):
    """``F.kl_div(log_softmax(logits/T), softmax(targets/T), reduction) * T*T`` (upstream kldiv).

    ``T`` is a positive number or, as upstream, a tensor (a learnable temperature; the gradient
    reaches it when it requires grad). A 0-d tensor runs the fused kernel on ``logits / T`` and
    ``targets / T`` at temperature 1, times ``T*T`` (autograd of the two divisions and the product
    carries the gradient to T; no host sync); other shapes (a per-sample ``[N, 1]`` T) broadcast
    in the upstream eager formula."""
    _check_pair("kldiv", logits, targets)
    _check_reduction("kldiv", reduction)
    if isinstance(T, torch.Tensor):
        _check_tensor_temperature("kldiv", T)
        backend = _fused_backend("kldiv", logits, targets, reduction, _fusable_temperature(T, logits))
    else:
        T = _ll._check_temperature("kldiv", T)
        backend = _fused_backend("kldiv", logits, targets, reduction)
    if backend is None:
        return _ll._upstream_kldiv(logits, targets, T=T, reduction=reduction)
    n, c = logits.shape
    if isinstance(T, torch.Tensor):
        loss = _ll._kd(logits / T, targets / T, 1.0, _row_scale(reduction, n, c), backend) * (T * T)
    else:
        loss = _ll._kd(logits, targets, T, T * T * _row_scale(reduction, n, c), backend)
    return _as_logits(loss, logits)


class KLDiv(nn.Module):
    """Module form of :func:`kldiv` (upstream ``KLDiv(T=1.0, reduction='batchmean')``). ``T`` may be
    a tensor; an ``nn.Parameter`` T is registered as the module's parameter, as upstream."""

    def __init__(self, T=1.0, reduction="batchmean"):
        super().__init__()
        self.T = T
        self.reduction = reduction

    def forward(self, logits, targets):
        return kldiv(logits, targets, T=self.T, reduction=self.reduction)


def jsdiv(logits, targets, T=1.0, reduction="batchmean"):
    """Upstream clamped JS: P, Q = softmax(logits/T), softmax(targets/T), M = (P+Q)/2, each
    clamped to [0.01, 0.99]; ``0.5 * F.kl_div(log P, M, reduction) + 0.5 * F.kl_div(log Q, M, reduction)``."""
    _check_pair("jsdiv", logits, targets)
    _check_reduction("jsdiv", reduction)
    T = _ll._check_temperature("jsdiv", T)
    backend = _fused_backend("jsdiv", logits, targets, reduction)
    if backend is None:
        return _ll._upstream_jsdiv(logits, targets, T=T, reduction=reduction)
    n, c = logits.shape
    return _as_logits(_ll._js(logits, targets, T, 0.01, 0.99, _row_scale(reduction, n, c), backend), logits)


# ---------------------------------------------------------------------------------------------
# The generative methods' criteria (DAFL / DFQ): upstream ``cross_entropy``, ``onehot_loss``,
# ``class_balance_loss`` with the same signatures and results.

def cross_entropy(logits, targets, reduction="mean"):
    """``F.cross_entropy(logits, targets, reduction=reduction)`` (upstream cross_entropy)."""
    return nn.functional.cross_entropy(logits, targets, reduction=reduction)


def onehot_loss(logits, targets=None):
    """Cross-entropy against ``targets``, or against the logits' own argmax when None (DAFL's
    one-hot loss; the argmax of the logits, as upstream's ``logits.max(1)[1]``)."""
    if targets is None:
        targets = logits.detach().argmax(1)
    return cross_entropy(logits, targets)


def class_balance_loss(logits):
    """``sum_c p_c log p_c`` with ``p = softmax(logits).mean(0)`` (upstream class_balance_loss;
    minimising it maximises the entropy of the mean prediction). ``xlogy`` is p log p in one op
    (0 where a mean probability underflows to 0, where upstream's product gives NaN)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        raise ValueError(f"class_balance_loss: logits must be a tensor [N, C, ...], got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    p = torch.softmax(logits, dim=1).mean(dim=0)
    return torch.special.xlogy(p, p).sum()


__all__ += ["cross_entropy", "onehot_loss", "class_balance_loss"]
