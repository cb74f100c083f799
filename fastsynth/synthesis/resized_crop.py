"""RandomResizedCrop + RandomHorizontalFlip for a whole batch on the device.

Upstream's ImageNet FastMeta augments every inner step with kornia's ``RandomResizedCrop(size,
scale=(0.75, 1.0))`` and ``RandomHorizontalFlip()``, and its ImageNet train transform (applied to
pool images at sampling) is torchvision's ``RandomResizedCrop(224)``. Both draw one box per
sample. Here the whole batch is one ``affine_grid`` + one ``grid_sample``:

    box of sample b:  area a_b ~ U(scale) * H * W,  log aspect log r_b ~ U(log ratio),
                      w_b = sqrt(a_b r_b), h_b = sqrt(a_b / r_b)       (w_b / h_b = r_b)
    as torchvision, up to ``tries`` (10) candidates per sample; the first that fits the image is
    taken, and a sample none of whose candidates fits gets torchvision's fallback (the whole image,
    its aspect ratio clamped into ``ratio``, centred). All candidates are drawn at once and the
    first fitting one is picked with an argmax on the device: no host sync, no loop over samples.
    position:         x0_b ~ U(0, W - w_b), y0_b ~ U(0, H - h_b) (continuous: the resampling is
                      bilinear anyway; torchvision rounds boxes to whole pixels)
    resampling:       output pixel (i, j) of size (oh, ow) samples the input at
                      x = x0_b + (j + 1/2) w_b / ow, y = y0_b + (i + 1/2) h_b / oh (bilinear,
                      pixel centres, ``align_corners=False``), j mirrored within the box when
                      sample b is flipped (probability 1/2).

Random numbers: one ``torch.rand`` of [B, 3*tries + 3] per call with the caller's generator,
turned into the per-sample affine matrices ``theta`` [B, 2, 3] by ``ResizedCropAugment.draw``
(outside a compiled region: torch.compile cannot trace a random op given a generator; inside a
captured CUDA graph step, so every replay draws fresh boxes). ``__call__(x, codes=...)`` applies
them; its backward (to the images) is grid_sample's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .augment import Augment, parse_transform, sample_augment

CODES_TAG = "resized_crop"  # the second element of the codes pair (Augment's (tensor, n) form)


def _check_range(name: str, value) -> tuple:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"resized_crop: {name} must be a pair of numbers (min, max), got {value!r}") from None
    if not (0.0 < lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"resized_crop: {name} must satisfy 0 < min <= max < inf, got {value!r}")
    return lo, hi


def _check_size(size) -> tuple:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    try:
        oh, ow = (int(v) for v in size)
        ok = oh > 0 and ow > 0 and all(float(v) == int(v) for v in size)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"resized_crop: size must be an int or (H, W) of positive ints, got {size!r}")
    return oh, ow


def resized_crop_theta(u: torch.Tensor, hw, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                       flip: bool = True) -> torch.Tensor:
    """The affine matrices [B, 2, 3] (``affine_grid``'s normalised coordinates) of the boxes that
    the uniforms ``u`` [B, 3*tries + 3] encode for images of size ``hw``; see the module docstring.
    Columns: areas (tries), log aspect ratios (tries), unused (tries), x/y position, flip."""
    H, W = float(hw[0]), float(hw[1])
    B, k = u.shape
    tries = (k - 3) // 3
    if tries < 1 or k != 3 * tries + 3:
        raise ValueError(f"resized_crop_theta: u must be [B, 3*tries + 3] uniforms, got shape {tuple(u.shape)}")
    s0, s1 = scale
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    area = (s0 + (s1 - s0) * u[:, :tries]) * (H * W)
    r = torch.exp(lr0 + (lr1 - lr0) * u[:, tries:2 * tries])
    w = torch.sqrt(area * r)
    h = torch.sqrt(area / r)
    fits = (w <= W) & (h <= H)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first fitting candidate (0 if none)
    found = fits.any(dim=1)
    # torchvision's fallback: the whole image with its aspect ratio clamped into ``ratio``, centred
    in_ratio = W / H
    if in_ratio < ratio[0]:
        fw, fh = W, W / ratio[0]
    elif in_ratio > ratio[1]:
        fw, fh = H * ratio[1], H
    else:
        fw, fh = W, H
    w = torch.where(found, w.gather(1, first).squeeze(1), fw)
    h = torch.where(found, h.gather(1, first).squeeze(1), fh)
    ux = torch.where(found, u[:, 3 * tries], 0.5)
    uy = torch.where(found, u[:, 3 * tries + 1], 0.5)
    x0 = ux * (W - w)
    y0 = uy * (H - h)
    ax = w / W
    if flip:
        ax = torch.where(u[:, 3 * tries + 2] < 0.5, -ax, ax)
    bx = (2.0 * x0 + w) / W - 1.0
    ay = h / H
    by = (2.0 * y0 + h) / H - 1.0
    zero = torch.zeros_like(ax)
    return torch.stack([ax, zero, bx, zero, ay, by], dim=1).view(B, 2, 3)


def resized_crop_apply(x: torch.Tensor, theta: torch.Tensor, size=None) -> torch.Tensor:
    """Resample every image of ``x`` [B, C, H, W] from its box ``theta`` [B, 2, 3] to ``size``
    (default: the input size): one affine_grid, one grid_sample."""
    B, C, H, W = x.shape
    oh, ow = (H, W) if size is None else _check_size(size)
    if theta.shape != (B, 2, 3):
        raise ValueError(f"resized_crop: theta must be [B={B}, 2, 3] for a batch of {B} images, got "
                         f"{tuple(theta.shape)} (drawn for another batch size?)")
    grid = F.affine_grid(theta.to(x.dtype), [B, C, oh, ow], align_corners=False)
    # "border": sample points within half a pixel of the image edge read the edge pixel (a box
    # never leaves the image, but bilinear weights at its edge reach half a pixel past it)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resized_crop_flip(x: torch.Tensor, size=None, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                      flip: bool = True, generator: torch.Generator | None = None, tries: int = 10) -> torch.Tensor:
    """Per-sample RandomResizedCrop (+ horizontal flip) of the batch ``x``, drawing its boxes with
    ``generator``."""
    scale, ratio = _check_range("scale", scale), _check_range("ratio", ratio)
    u = torch.rand(x.shape[0], 3 * tries + 3, device=x.device, generator=generator)
    return resized_crop_apply(x, resized_crop_theta(u, x.shape[-2:], scale, ratio, flip), size)


class ResizedCropAugment(Augment):
    """``Augment`` with a RandomResizedCrop instead of the padded crop: RandomResizedCrop(size,
    scale, ratio), RandomHorizontalFlip (``flip``), then the normaliser, as one callable.

    ``draw(batch, hw, device, generator)`` returns ``(theta, "resized_crop")``, the codes that
    ``__call__(x, codes=...)`` takes (``Augment``'s protocol); ``enabled=False`` leaves only the
    normalisation (what the equivalence tests use)."""

    def __init__(self, normalizer=None, size=None, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                 flip: bool = True, enabled: bool = True, tries: int = 10):
        super().__init__(normalizer, padding=0, flip=flip, size=None if size is None else _check_size(size),
                         enabled=enabled)
        self.scale = _check_range("scale", scale)
        self.ratio = _check_range("ratio", ratio)
        if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
            raise ValueError(f"ResizedCropAugment: tries must be an int >= 1, got {tries!r}")
        self.tries = tries

    def draw(self, batch: int, hw, device, generator: torch.Generator | None = None):
        if not self.enabled:
            return None
        u = torch.rand(batch, 3 * self.tries + 3, device=device, generator=generator)
        return resized_crop_theta(u, hw, self.scale, self.ratio, self.flip), CODES_TAG

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, codes=None) -> torch.Tensor:
        if self.enabled:
            if codes is None:
                codes = self.draw(x.shape[0], x.shape[-2:], x.device, generator)
            theta, tag = codes
            if tag != CODES_TAG:
                raise ValueError(f"ResizedCropAugment: codes must come from ResizedCropAugment.draw, got codes "
                                 f"tagged {tag!r}")
            x = resized_crop_apply(x, theta, self.size)
        if self.normalizer is not None:
            x = self.normalizer(x)
        return x

    def __repr__(self) -> str:
        return (f"ResizedCropAugment(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip}, "
                f"enabled={self.enabled})")


def resized_crop_from_transform(transform, enabled: bool = True):
    """A ``ResizedCropAugment`` for a torchvision-style Compose that holds a ``RandomResizedCrop``
    (``augment.parse_transform``: its size/scale/ratio, a ``RandomHorizontalFlip`` and
    ``Normalize`` when present). None when there is no RandomResizedCrop."""
    parsed = parse_transform(transform)
    if parsed is None or parsed["resized_crop"] is None:
        return None
    return sample_augment(transform, enabled=enabled)
