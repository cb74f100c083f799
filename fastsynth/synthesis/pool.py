"""In-memory, on-device pool of synthesized images.

The upstream pool writes every image as a PNG into ``save_dir`` and rebuilds a DataLoader (4
worker processes, PIL decode, per-image transforms) after every synthesized batch. This pool
keeps the images on the synthesis device as uint8 (the same quantisation as the PNG round trip:
clamp to [0, 1], times 255, truncate), samples batches by index on the device, and writes to
disk only when asked, from a background thread.

Capacity: ``None`` keeps everything (the storage grows by doubling). With a capacity, new
images evict old ones: ``"fifo"`` (oldest first), ``"random"`` (uniformly chosen slots), or
``None`` (the pool stops accepting images once full).

Sampling is uniform over everything kept and, like a shuffled DataLoader that is rebuilt after
each addition, draws without replacement until the kept images are exhausted (a fresh
permutation starts after every addition and whenever the current one runs out).
"""
from __future__ import annotations

import atexit
import os
import queue
import threading

import numpy as np
import torch

from .png import to_uint8, write_png

EVICTION = ("fifo", "random", None)
SAVE_FORMATS = ("shard", "png")


class _SaveWorker:
    """Writes uint8 batches to ``root`` in a daemon thread (device-to-host copies happen there,
    so the synthesis loop never waits on them)."""

    def __init__(self, root: str, fmt: str):
        self.root = os.path.abspath(root)
        self.fmt = fmt
        os.makedirs(self.root, exist_ok=True)
        self.queue: queue.Queue = queue.Queue()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="fastsynth-pool-saver", daemon=True)
        self.thread.start()
        # images still queued when the interpreter exits are written before it does: nothing
        # the user synthesized is lost to the daemon thread being stopped
        atexit.register(self._drain_at_exit)

    def _drain_at_exit(self):
        if self.thread.is_alive():
            self.queue.join()

    def _run(self):
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                idx, batch = item
                arr = batch.cpu().numpy()
                if self.fmt == "shard":
                    np.save(os.path.join(self.root, f"shard_{idx:06d}.npy"), arr)
                else:
                    for k, img in enumerate(arr):
                        write_png(os.path.join(self.root, f"{idx}-{k}.png"), img.transpose(1, 2, 0))
            except BaseException as exc:  # reported by flush()
                self.errors.append(exc)
            finally:
                self.queue.task_done()

    def submit(self, idx: int, batch: torch.Tensor):
        self.queue.put((idx, batch))

    def flush(self):
        self.queue.join()
        if self.errors:
            raise RuntimeError(f"fastsynth: saving synthesized images failed: {self.errors[0]!r}")

    def close(self):
        self.flush()
        self.queue.put(None)
        self.thread.join()


class DataPool:
    """Bounded on-device image pool with uniform sampling (see the module docstring)."""

    def __init__(self, capacity: int | None = None, eviction: str | None = "fifo", device="cpu",
                 save_dir: str | None = None, save_format: str = "shard"):
        if capacity is not None and (not isinstance(capacity, int) or capacity <= 0):
            raise ValueError(f"DataPool: capacity must be a positive int or None, got {capacity!r}")
        if eviction not in EVICTION:
            raise ValueError(f"DataPool: eviction must be one of {EVICTION}, got {eviction!r}")
        if save_format not in SAVE_FORMATS:
            raise ValueError(f"DataPool: save_format must be one of {SAVE_FORMATS}, got {save_format!r}")
        self.capacity = capacity
        self.eviction = eviction
        self.device = torch.device(device)
        self._data: torch.Tensor | None = None
        self._n = 0  # images kept
        self._ptr = 0  # next slot to overwrite (fifo)
        self._seen = 0  # images ever added
        self._batches = 0
        self._perm: torch.Tensor | None = None
        self._cursor = 0
        self._saver = _SaveWorker(save_dir, save_format) if save_dir is not None else None

    def __len__(self) -> int:
        return self._n

    @property
    def seen(self) -> int:
        return self._seen

    def _grow(self, need: int, shape, like: torch.Tensor):
        cap = self._data.shape[0] if self._data is not None else 0
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 64)
        if self.capacity is not None:
            new_cap = min(new_cap, self.capacity)
        buf = torch.empty((new_cap, *shape), dtype=torch.uint8, device=self.device)
        if self._data is not None and self._n > 0:
            buf[: self._n].copy_(self._data[: self._n])
        self._data = buf

    def add(self, images: torch.Tensor) -> None:
        """Add a batch of images in [0, 1] (or uint8), shape (B, C, H, W)."""
        if images.dim() != 4:
            raise ValueError(f"DataPool.add: images must be (B, C, H, W), got shape {tuple(images.shape)}")
        x = images.detach()
        x = x if x.dtype == torch.uint8 else to_uint8(x)
        x = x.to(self.device)
        if self._data is not None and tuple(self._data.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"DataPool.add: image shape {tuple(x.shape[1:])} differs from the pool's "
                             f"{tuple(self._data.shape[1:])}")
        b = x.shape[0]
        self._seen += b
        if self._saver is not None:
            self._saver.submit(self._batches, x.clone())
        self._batches += 1
        cap = self.capacity
        free = b if cap is None else max(0, min(b, cap - self._n))
        if free > 0:
            self._grow(self._n + free, x.shape[1:], x)
            self._data[self._n:self._n + free].copy_(x[:free])
            self._n += free
        rest = x[free:]
        if rest.shape[0] > 0 and self.eviction is not None:
            if rest.shape[0] > cap:  # more new images than the pool holds: keep the newest
                rest = rest[-cap:]
            k = rest.shape[0]
            if self.eviction == "fifo":
                slots = (torch.arange(k, device=self.device) + self._ptr) % cap
                self._ptr = (self._ptr + k) % cap
            else:
                slots = torch.randperm(cap, device=self.device)[:k]
            self._data.index_copy_(0, slots, rest)
        self._perm = None  # like the rebuilt upstream loader: a new shuffle after every addition

    def images(self) -> torch.Tensor:
        """All kept images (uint8 view)."""
        if self._data is None:
            raise RuntimeError("DataPool: empty; call synthesize() first")
        return self._data[: self._n]

    def sample_indices(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self._n == 0:
            raise RuntimeError("DataPool: empty; call synthesize() first")
        n = min(int(n), self._n)
        parts = []
        while n > 0:
            if self._perm is None or self._cursor >= self._perm.shape[0]:
                self._perm = torch.randperm(self._n, device=self.device, generator=generator)
                self._cursor = 0
            take = min(n, self._perm.shape[0] - self._cursor)
            parts.append(self._perm[self._cursor:self._cursor + take])
            self._cursor += take
            n -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def sample(self, n: int, dtype=torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` kept images (at most all of them) as floats in [0, 1]."""
        idx = self.sample_indices(n, generator)
        return self._data.index_select(0, idx).to(dtype).div_(255.0)

    def flush(self):
        if self._saver is not None:
            self._saver.flush()

    def close(self):
        if self._saver is not None:
            self._saver.close()
            self._saver = None
