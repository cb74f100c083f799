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

Images to start from (upstream's ``init_dataset`` / ``--cmi_init``, ``set_init``) are kept apart,
as upstream keeps its ConcatDataset of the pool and the init folder: they are sampled together
with the pool's images, but never evicted, never counted in ``len()`` and never written out.

Files (``save_dir``): upstream's ImagePool writes batch ``i`` as ``{i}-{k}.png`` (image ``k`` of
the batch); ``save_format="png"`` writes that layout, ``"shard"`` one ``shard_{i:06d}.npy`` per
batch. Batch numbers continue after the highest number already in the directory (scanned once
per directory and process, then counted on), so neither a second synthesize() call, a second
synthesizer on the same directory nor a restarted run overwrites earlier files.
"""
from __future__ import annotations

import atexit
import os
import queue
import re
import threading

import numpy as np
import torch

from .png import to_uint8, write_png

EVICTION = ("fifo", "random", None)
SAVE_FORMATS = ("shard", "png")

_NUMBERED = re.compile(r"^(?:(\d+)-\d+\.png|shard_(\d+)\.npy)$")
_DIR_LOCK = threading.Lock()
_DIR_NEXT: dict = {}  # absolute directory -> next free batch number (this process)


def first_free_batch(root: str) -> int:
    """1 + the highest batch number of the files in ``root`` (``{i}-{k}.png``, ``shard_{i}.npy``)."""
    top = -1
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = _NUMBERED.match(name)
            if m:
                top = max(top, int(m.group(1) or m.group(2)))
    return top + 1


def reserve_batch(root: str) -> int:
    """The next batch number to write in ``root``: after every file there when the directory was
    first used by this process, and after every number handed out since."""
    root = os.path.abspath(root)
    with _DIR_LOCK:
        n = _DIR_NEXT.get(root)
        if n is None:
            n = first_free_batch(root)
        _DIR_NEXT[root] = n + 1
        return n


def save_options(save_images, save_format: str = "shard") -> tuple:
    """(enabled, format) from a synthesizer's ``save_images``/``save_format`` keywords:
    ``save_images`` False/None (off), True (``save_format``), or a format name ("png", "shard")."""
    if save_images is None or save_images is False:
        return False, save_format
    if save_images is True:
        return True, save_format
    if isinstance(save_images, str):
        if save_images not in SAVE_FORMATS:
            raise ValueError(f"save_images must be True/False or one of {SAVE_FORMATS}, got {save_images!r}")
        return True, save_images
    raise TypeError(f"save_images must be a bool or one of {SAVE_FORMATS}, got {type(save_images).__name__}")


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
                _, batch = item
                idx = reserve_batch(self.root)  # never an existing file's number
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
        self._init: torch.Tensor | None = None  # set_init: sampled with the pool, kept apart

    def __len__(self) -> int:
        return self._n

    def set_init(self, images: torch.Tensor) -> None:
        """Images to sample from besides the synthesized ones (upstream's ``init_dataset``): in
        [0, 1] or uint8, (N, C, H, W); never evicted, counted or saved."""
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"DataPool.set_init: images must be a non-empty (N, C, H, W) tensor, got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        x = images.detach()
        x = (x if x.dtype == torch.uint8 else to_uint8(x)).to(self.device)
        if self._data is not None and tuple(self._data.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"DataPool.set_init: image shape {tuple(x.shape[1:])} differs from the pool's "
                             f"{tuple(self._data.shape[1:])}")
        self._init = x
        self._perm = None

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
        """Indices into the kept images followed by the init images (``set_init``)."""
        total = self._n + (0 if self._init is None else self._init.shape[0])
        if total == 0:
            raise RuntimeError("DataPool: empty; call synthesize() first")
        n = min(int(n), total)
        parts = []
        while n > 0:
            if self._perm is None or self._cursor >= self._perm.shape[0]:
                self._perm = torch.randperm(total, device=self.device, generator=generator)
                self._cursor = 0
            take = min(n, self._perm.shape[0] - self._cursor)
            parts.append(self._perm[self._cursor:self._cursor + take])
            self._cursor += take
            n -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def sample(self, n: int, dtype=torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` kept images (at most all of them) as floats in [0, 1]."""
        idx = self.sample_indices(n, generator)
        if self._init is None:
            return self._data.index_select(0, idx).to(dtype).div_(255.0)
        if self._n == 0:
            return self._init.index_select(0, idx).to(dtype).div_(255.0)
        # both sources, without a host read of which index goes where: gather from each, pick
        kept = self._data.index_select(0, idx.clamp(max=self._n - 1))
        init = self._init.index_select(0, (idx - self._n).clamp(min=0))
        x = torch.where((idx < self._n).view(-1, 1, 1, 1), kept, init)
        return x.to(dtype).div_(255.0)

    def flush(self):
        if self._saver is not None:
            self._saver.flush()

    def close(self):
        if self._saver is not None:
            self._saver.close()
            self._saver = None
