"""Upstream-compatible base pieces: ``BaseSynthesis`` and ``Normalizer``."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Normalizer:
    """``Normalizer(mean, std)(x, reverse=False)``: (x - mean) / std per channel, or its inverse.

    Same semantics as the upstream class; the mean/std tensors are built once per
    (device, dtype) instead of on every call (upstream copies them host-to-device each time)."""

    def __init__(self, mean, std):
        self.mean = mean
        self.std = std
        self._cache: dict = {}

    def _coeffs(self, x: torch.Tensor, reverse: bool):
        key = (x.device, x.dtype, reverse)
        c = self._cache.get(key)
        if c is None:
            mean = torch.as_tensor(self.mean, dtype=torch.float64).reshape(-1)
            std = torch.as_tensor(self.std, dtype=torch.float64).reshape(-1)
            if reverse:  # x_orig = x * std + mean
                scale, shift = std, mean
            else:  # (x - mean) / std = x * (1/std) + (-mean/std)
                scale, shift = 1.0 / std, -mean / std
            c = (scale.to(x.dtype).to(x.device).view(1, -1, 1, 1), shift.to(x.dtype).to(x.device).view(1, -1, 1, 1))
            self._cache[key] = c
        return c

    def __call__(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        scale, shift = self._coeffs(x, reverse)
        return torch.addcmul(shift, x, scale)

    def __repr__(self):
        return f"Normalizer(mean={self.mean}, std={self.std})"


def normalize(tensor: torch.Tensor, mean, std, reverse: bool = False) -> torch.Tensor:
    return Normalizer(mean, std)(tensor, reverse=reverse)


class BaseSynthesis(ABC):
    """``BaseSynthesis(teacher, student)``: ``synthesize()`` takes some steps to make new images
    and returns them (in [0, 1]) for visualisation; ``sample()`` returns one training batch."""

    def __init__(self, teacher, student):
        super().__init__()
        self.teacher = teacher
        self.student = student

    @abstractmethod
    def synthesize(self, *args, **kwargs):
        ...

    @abstractmethod
    def sample(self, *args, **kwargs):
        ...
