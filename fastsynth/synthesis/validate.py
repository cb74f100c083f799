"""Constructor checks of the synthesizers: a wrong argument raises at construction, naming the
argument, what was given and what is expected, instead of failing later inside a matmul, an
index or cross-entropy (issue 18).

Shapes that only a forward pass reveals (the teacher's number of classes, the generator's image
size) are read from a forward on the ``meta`` device: parameters and buffers are replaced by
meta tensors of the same shapes through ``torch.func.functional_call``, so no memory is touched
and no module state changes. Where that forward cannot run (a module with hooks, an op without
a meta kernel, data-dependent Python) the check is skipped and the run-time error stands.
"""
from __future__ import annotations

import itertools
import numbers

import torch
import torch.nn as nn


def check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")


def check_img_size(owner: str, img_size) -> tuple:
    try:
        size = tuple(int(v) for v in img_size)
        ok = len(size) == 3 and all(v > 0 for v in size) and all(float(v) == int(v) for v in img_size)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{owner}: img_size must be (C, H, W) with positive ints, got {img_size!r}")
    return size


def meta_output(module: nn.Module, *inputs: torch.Tensor):
    """``module(*inputs)`` computed on the meta device (shapes only), or None where it cannot be."""
    if not isinstance(module, nn.Module):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()):
        return None  # hooks would run on meta tensors and keep them
    try:
        state = {n: torch.empty_like(t, device="meta")
                 for n, t in itertools.chain(module.named_parameters(), module.named_buffers())}
        with torch.no_grad():
            out = torch.func.functional_call(module, state, inputs, strict=False)
    except Exception:  # noqa: BLE001 - any failure means: no shape to check against
        return None
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        out = out[0]
    return out if torch.is_tensor(out) else None


def generator_nz(generator: nn.Module) -> int | None:
    """The latent size a FastDFKD-style generator takes: its ``nz`` attribute, else the input
    size of its first Linear layer (upstream's ``l1``)."""
    nz = getattr(generator, "nz", None)
    if isinstance(nz, int):
        return nz
    for m in generator.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    return None


def check_num_classes(owner: str, teacher: nn.Module, num_classes: int, img_size: tuple) -> None:
    out = meta_output(teacher, torch.empty(2, *img_size, device="meta"))
    if out is not None and out.dim() == 2 and out.shape[1] < num_classes:
        raise ValueError(f"{owner}: num_classes={num_classes} but the teacher has {out.shape[1]} outputs "
                         f"(logits [B, {out.shape[1]}] for img_size={tuple(img_size)}); num_classes must be at "
                         f"most {out.shape[1]}")


def check_crop(owner: str, out_hw, img_size: tuple, padding: int) -> None:
    """The synthesis augmentation crops img_size[-2:] from the generator's images padded by
    ``padding`` on each side."""
    h, w = int(out_hw[0]), int(out_hw[1])
    ch, cw = img_size[-2], img_size[-1]
    if ch > h + 2 * padding or cw > w + 2 * padding:
        raise ValueError(f"{owner}: img_size={tuple(img_size)} asks for {ch}x{cw} crops, larger than the "
                         f"generator's {h}x{w} images padded by aug_padding={padding} ({h + 2 * padding}x"
                         f"{w + 2 * padding}); img_size must match the generator's output size")


def check_generator(owner: str, generator, *, kind: str, nz: int | None, img_size: tuple,
                    padding: int | None) -> None:
    """``kind``: "latent" (FastDFKD: z [B, nz]) or "nayer" (targets [B], reinit/re_init_le)."""
    if not isinstance(generator, nn.Module):
        raise TypeError(f"{owner}: generator must be an nn.Module, got {type(generator).__name__}")
    name = type(generator).__name__
    if kind == "nayer":
        missing = [a for a in ("reinit", "re_init_le") if not callable(getattr(generator, a, None))]
        if missing:
            raise TypeError(f"{owner}: generator must be a NAYER generator with reinit() and re_init_le() "
                            f"(NLGenerator / NLDeepGenerator), got {name} without {' and '.join(missing)}() "
                            f"(a FastDFKD Generator belongs to FastMetaSynthesizer / FastSynthesizer)")
        sample = torch.zeros(2, dtype=torch.long, device="meta")
    else:
        g_nz = generator_nz(generator)
        if g_nz is not None and g_nz != nz:
            raise ValueError(f"{owner}: nz={nz} but the generator ({name}) takes z of {g_nz} features (its "
                             f"first Linear is Linear({g_nz}, ...)); pass nz={g_nz} or build the generator "
                             f"with nz={nz}")
        sample = torch.empty(2, nz, device="meta")
    if padding is None:
        return
    out = meta_output(generator, sample)
    if out is not None and out.dim() == 4:
        check_crop(owner, out.shape[-2:], img_size, padding)


def check_synthesizer_args(owner: str, *, teacher, num_classes, img_size, steps: tuple, batch: int,
                           generator=None, kind: str = "latent", nz=None, padding: int | None = None) -> tuple:
    """The checks every synthesizer shares; ``steps`` = (name, value, minimum). Returns img_size
    as a tuple of ints."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"{owner}: teacher must be an nn.Module, got {type(teacher).__name__}")
    check_int(owner, steps[0], steps[1], steps[2])
    check_int(owner, "num_classes", num_classes, 1)
    check_int(owner, "synthesis_batch_size", batch, 1)
    if nz is not None or kind == "latent" and generator is not None:
        check_int(owner, "nz", nz, 1)
    size = check_img_size(owner, img_size)
    if generator is not None:
        check_generator(owner, generator, kind=kind, nz=nz, img_size=size, padding=padding)
    check_num_classes(owner, teacher, num_classes, size)
    return size
