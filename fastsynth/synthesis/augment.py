"""Batched on-device augmentation for synthesis and for sampling from the data pool.

The upstream loops augment with kornia (synthesis) or a torchvision transform applied to each
PIL image of a rebuilt DataLoader (sampling). Here one call handles the whole batch:

    crop_flip(x, padding=4):   out[b, c, i, j] = pad(x)[b, c, oy_b + i, ox_b + (W-1-j if f_b else j)]

with per-sample offsets oy_b, ox_b uniform in [0, 2*padding] and flips f_b ~ Bernoulli(1/2),
all drawn in one random call; the crop and the flip are a single gather (its backward is one
scatter-add), then normalisation is one fused multiply-add. No per-image Python, no host sync.

Random numbers and compiled steps: torch.compile cannot trace a random op that takes a
``torch.Generator``, so the synthesizers draw the codes (``Augment.draw`` / ``jitter_codes``)
outside the compiled region, with their private generator, and pass them in as
``codes=(tensor, n)``, ``n`` being the number of codes they were drawn from; ``crop_flip`` /
``jitter_flip`` check ``n`` against the input's shape (a plain Python comparison, free under
tracing). The same numbers in eager and compiled steps; called without codes they draw them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .util import warn_once


def _flat_gather(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, width: int) -> torch.Tensor:
    """out[b, c, i, j] = x[b, c, rows[b, i], cols[b, j]] for x of row width ``width``."""
    B, C = x.shape[:2]
    H, W = rows.shape[1], cols.shape[1]
    idx = (rows.unsqueeze(2) * width + cols.unsqueeze(1)).reshape(B, 1, H * W).expand(B, C, H * W)
    return torch.gather(x.reshape(B, C, -1), 2, idx).view(B, C, H, W)


def crop_flip_count(hw, padding: int, size=None) -> int:
    """How many (oy, ox, flip) codes ``crop_flip`` picks from for an input of size ``hw``."""
    H, W = int(hw[0]), int(hw[1])
    oh, ow = (H, W) if size is None else (int(size[0]), int(size[1]))
    return (H + 2 * padding - oh + 1) * (W + 2 * padding - ow + 1) * 2


def jitter_count(hw, lim: float = 1.0 / 8.0) -> int:
    """How many (offsets, flip) codes ``jitter_flip`` picks from for an input of size ``hw``."""
    return (2 * int(hw[0] * lim) + 1) * (2 * int(hw[1] * lim) + 1) * 2


def jitter_codes(hw, device, generator: torch.Generator | None = None, lim: float = 1.0 / 8.0):
    """The random code of one ``jitter_flip`` call on inputs of size ``hw``, as ``(tensor, n)``."""
    n = jitter_count(hw, lim)
    return torch.randint(0, n, (1,), device=device, generator=generator), n


def _codes(codes, n_codes: int, count: int, device, generator, what: str) -> torch.Tensor:
    if codes is None:
        return torch.randint(0, n_codes, (count,), device=device, generator=generator)
    t, n = codes
    if n != n_codes or tuple(t.shape) != (count,):
        raise ValueError(f"codes: {what} of this input needs {count} codes out of {n_codes}, got "
                         f"{tuple(t.shape)} codes out of {n} (drawn for another input size?)")
    return t


_TABLE_MAX_BYTES = 8 * 2**20
_TABLES: dict = {}


def _crop_tables(B: int, C: int, ph: int, pw: int, oh: int, ow: int, flip: bool, device):
    """(table, base) for the one-gather form of crop_flip, or None when the table is too big.

    table[code, 0, i, j] = (oy + i) * pw + (ox + (ow-1-j if f else j)) for the (oy, ox, f) that
    ``code`` encodes; base[b, c] = (b*C + c) * ph * pw, the offset of plane (b, c) in the padded
    batch. Then out = take(padded, base + table[code]): no per-step index arithmetic."""
    ny, nx = ph - oh + 1, pw - ow + 1
    n = ny * nx * 2
    if n * oh * ow * 8 > _TABLE_MAX_BYTES:
        return None
    key = (B, C, ph, pw, oh, ow, flip, str(device))
    t = _TABLES.get(key)
    if t is None:
        code = torch.arange(n)
        oy, ox = code // (nx * 2), (code // 2) % nx
        ar_h, ar_w = torch.arange(oh), torch.arange(ow)
        f = (code % 2).bool().unsqueeze(1) if flip else torch.zeros(n, 1, dtype=torch.bool)
        cols = ox.unsqueeze(1) + torch.where(f, (ow - 1) - ar_w, ar_w)
        rows = oy.unsqueeze(1) + ar_h
        table = (rows.unsqueeze(2) * pw + cols.unsqueeze(1)).unsqueeze(1).to(device)  # (n, 1, oh, ow)
        base = (torch.arange(B * C) * (ph * pw)).view(B, C, 1, 1).to(device)
        t = _TABLES[key] = (table, base)
    return t


def crop_flip(x: torch.Tensor, padding: int = 4, flip: bool = True, size=None,
              generator: torch.Generator | None = None, codes=None) -> torch.Tensor:
    """Per-sample random crop of ``size`` (default: the input size) from the zero-padded batch,
    and a per-sample random horizontal flip. x: (B, C, H, W). ``codes``: ``(B codes, n)`` drawn
    beforehand (``Augment.draw``); then ``generator`` is not used."""
    B, C, H, W = x.shape
    oh, ow = (H, W) if size is None else (int(size[0]), int(size[1]))
    if padding == 0 and not flip and (oh, ow) == (H, W):
        return x
    ph, pw = H + 2 * padding, W + 2 * padding
    if oh > ph or ow > pw or oh <= 0 or ow <= 0:
        # a crop must fit in the padded image (e.g. NAYER's ImageNet script asks for 244x244
        # crops of 224x224 images): Python ints, no device read
        raise ValueError(f"crop_flip: crop size {oh}x{ow} does not fit the padded image {ph}x{pw} "
                         f"({H}x{W} images, padding={padding}); the crop size (img_size) must be at most "
                         f"the image size + 2*padding")
    ny, nx = ph - oh + 1, pw - ow + 1
    # one draw encodes (oy, ox, flip) for every sample
    code = _codes(codes, ny * nx * 2, B, x.device, generator, "crop_flip")
    xp = F.pad(x, (padding, padding, padding, padding)) if padding > 0 else x
    tables = None if torch.compiler.is_compiling() else _crop_tables(B, C, ph, pw, oh, ow, flip, x.device)
    if tables is not None:
        # 4 ops: randint, pad, index_select of the cached per-code index rows, add, take
        table, base = tables
        return torch.take(xp, base + table.index_select(0, code))
    oy = code // (nx * 2)
    ox = (code // 2) % nx
    ar_h = torch.arange(oh, device=x.device)
    ar_w = torch.arange(ow, device=x.device)
    rows = oy.unsqueeze(1) + ar_h
    if flip:
        f = (code % 2).bool().unsqueeze(1)
        cols = ox.unsqueeze(1) + torch.where(f, (ow - 1) - ar_w, ar_w)
    else:
        cols = ox.unsqueeze(1) + ar_w
    return _flat_gather(xp, rows, cols, pw)


def jitter_flip(x: torch.Tensor, lim: float = 1.0 / 8.0, do_flip: bool = True,
                generator: torch.Generator | None = None, codes=None) -> torch.Tensor:
    """DeepInversion's batch-wide jitter (torch.roll by random offsets in [-lim*H, lim*H]) and
    random horizontal flip, with the offsets drawn on the device (no host RNG, no recompiles).
    ``codes``: ``jitter_codes(...)`` drawn beforehand; then ``generator`` is not used."""
    B, C, H, W = x.shape
    l0, l1 = int(H * lim), int(W * lim)
    r = _codes(codes, jitter_count((H, W), lim), 1, x.device, generator, "jitter_flip")
    off1 = r // ((2 * l1 + 1) * 2) - l0
    off2 = (r // 2) % (2 * l1 + 1) - l1
    ar_h = torch.arange(H, device=x.device)
    ar_w = torch.arange(W, device=x.device)
    rows = torch.remainder(ar_h - off1, H)  # roll: out[i] = in[(i - shift) mod H]
    j = torch.where((r % 2).bool() & do_flip, (W - 1) - ar_w, ar_w)
    cols = torch.remainder(j - off2, W)
    return _flat_gather(x, rows.unsqueeze(0).expand(B, H), cols.unsqueeze(0).expand(B, W), W)


class Augment:
    """crop/flip then normalisation, as one callable: ``Augment(normalizer, padding=4)(x)``.

    ``enabled=False`` leaves only the normalisation (what equivalence tests use)."""

    def __init__(self, normalizer=None, padding: int = 4, flip: bool = True, size=None, enabled: bool = True):
        self.normalizer = normalizer
        self.padding = int(padding)
        self.flip = bool(flip)
        self.size = size
        self.enabled = bool(enabled)

    def draw(self, batch: int, hw, device, generator: torch.Generator | None = None):
        """The random codes of one call on ``batch`` images of size ``hw`` (H, W), as
        ``(tensor, n)`` (None when disabled): drawn outside a compiled step and passed to
        ``__call__(x, codes=...)``."""
        if not self.enabled:
            return None
        n = crop_flip_count(hw, self.padding, self.size)
        return torch.randint(0, n, (batch,), device=device, generator=generator), n

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, codes=None) -> torch.Tensor:
        if self.enabled:
            x = crop_flip(x, self.padding, self.flip, self.size, generator=generator, codes=codes)
        if self.normalizer is not None:
            x = self.normalizer(x)
        return x


# transform steps that need no work on a batch of [0, 1] float images
_NO_OP_STEPS = ("ToTensor", "ToPILImage", "PILToTensor", "ConvertImageDtype")


def parse_transform(transform):
    """The steps of a torchvision-style train transform (a Compose or one transform, read by
    class name: torchvision is not needed) that ``sample()`` applies to pool images, batched on
    the device. Returns None for None, else a dict with

    - ``padding``: RandomCrop's padding (0 without one),
    - ``flip``: whether there is a RandomHorizontalFlip,
    - ``mean`` / ``std``: Normalize's (None without one),
    - ``resized_crop``: None, or RandomResizedCrop's ``(size, scale, ratio)`` (the ImageNet
      train transform); it replaces the padded crop.

    Other steps are left out (one warning, naming them)."""
    if transform is None:
        return None
    out = {"padding": 0, "flip": False, "mean": None, "std": None, "resized_crop": None}
    unknown = []
    for t in getattr(transform, "transforms", [transform]):
        name = type(t).__name__
        if name == "RandomCrop":
            pad = getattr(t, "padding", 0) or 0
            out["padding"] = int(pad if isinstance(pad, int) else pad[0])
        elif name == "RandomResizedCrop":
            out["resized_crop"] = (getattr(t, "size", None), getattr(t, "scale", (0.08, 1.0)),
                                   getattr(t, "ratio", (3.0 / 4.0, 4.0 / 3.0)))
        elif name == "RandomHorizontalFlip":
            out["flip"] = True
        elif name == "Normalize":
            out["mean"], out["std"] = t.mean, t.std
        elif name not in _NO_OP_STEPS:
            unknown.append(name)
    if unknown:  # once per kind of transform
        warn_once(("transform",) + tuple(unknown),
                  f"fastsynth: transform steps {unknown} are not applied by sample(); it applies only "
                  f"RandomCrop/RandomResizedCrop/RandomHorizontalFlip/Normalize/ToTensor (batched on the device)")
    return out


def sample_augment(transform, normalizer=None, padding: int = 4, flip: bool = True, size=None,
                   enabled: bool = True) -> Augment:
    """What ``sample()`` applies to pool images: the parsed ``transform`` (``parse_transform``;
    a RandomResizedCrop gives a ``ResizedCropAugment``), or without a transform the synthesis
    augmentation's settings (``padding``, ``flip``, ``normalizer``) at ``size``."""
    parsed = parse_transform(transform)
    if parsed is None:
        return Augment(normalizer, padding=padding, flip=flip, size=size, enabled=enabled)
    from .base import Normalizer

    norm = Normalizer(parsed["mean"], parsed["std"]) if parsed["mean"] is not None else None
    if parsed["resized_crop"] is not None:
        from .resized_crop import ResizedCropAugment  # resized_crop imports this module

        rsize, scale, ratio = parsed["resized_crop"]
        return ResizedCropAugment(norm, size=rsize if rsize is not None else size, scale=scale, ratio=ratio,
                                  flip=parsed["flip"], enabled=enabled)
    return Augment(norm, padding=parsed["padding"], flip=parsed["flip"], size=size, enabled=enabled)
