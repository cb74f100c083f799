"""Minimal PNG writing (zlib + struct, no imaging library), image grids, and reading a folder of
PNG/JPG images (upstream's ``init_dataset`` / ``--cmi_init``; needs Pillow, imported on use)."""
from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np
import torch


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of an 8-bit image: (H, W) grey, (H, W, 1) grey or (H, W, 3) RGB."""
    img = np.ascontiguousarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"encode_png: img must be uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        color_type, h, w = 0, img.shape[0], img.shape[1]
    elif img.ndim == 3 and img.shape[2] == 3:
        color_type, h, w = 2, img.shape[0], img.shape[1]
    else:
        raise ValueError(f"encode_png: img must be (H, W), (H, W, 1) or (H, W, 3), got {img.shape}")
    rows = img.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def write_png(path: str, img: np.ndarray) -> str:
    with open(path, "wb") as f:
        f.write(encode_png(img))
    return path


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8 the way the upstream pool stores them (clamp, *255, truncate)."""
    return (x.detach().clamp(0, 1) * 255).to(torch.uint8)


def image_grid(images: torch.Tensor, ncol: int | None = None, padding: int = 1, scale: int = 1) -> np.ndarray:
    """(N, C, H, W) images in [0, 1] (or uint8) -> one (H', W', C) uint8 grid, ``scale``x
    nearest-neighbour enlarged."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    imgs = images.cpu()
    if scale > 1:
        imgs = imgs.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    n, c, h, w = imgs.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = torch.full((c, nrow * h + padding * (nrow - 1), ncol * w + padding * (ncol - 1)), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[:, r * (h + padding):r * (h + padding) + h, col * (w + padding):col * (w + padding) + w] = imgs[i]
    return grid.permute(1, 2, 0).numpy()


def save_image_grid(images: torch.Tensor, path: str, ncol: int | None = None, scale: int = 1) -> str:
    return write_png(path, image_grid(images, ncol=ncol, scale=scale))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def list_images(root: str) -> list:
    """Every PNG/JPG file under ``root`` (recursively, as upstream's UnlabeledImageDataset), sorted."""
    found = []
    for dirpath, _, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def read_images(paths, img_size) -> torch.Tensor:
    """The images at ``paths`` as one uint8 (N, C, H, W) tensor; each must be H x W of
    ``img_size`` = (C, H, W) (converted to RGB for C=3, greyscale for C=1)."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow comes with the demo extra
        raise ImportError("reading PNG/JPG images (init_dataset) needs Pillow: pip install pillow "
                          "(or the 'demo' extra)") from exc
    c, h, w = (int(v) for v in img_size)
    if c not in (1, 3):
        raise ValueError(f"init_dataset: images can be read for 1 or 3 channels, img_size is {tuple(img_size)}")
    out = []
    for path in paths:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB" if c == 3 else "L"))
        if arr.shape[:2] != (h, w):
            raise ValueError(f"init_dataset: {path} is {arr.shape[0]}x{arr.shape[1]}, expected {h}x{w} "
                             f"(img_size={tuple(img_size)})")
        out.append(arr.reshape(h, w, c).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))
