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

No bad batch enters the pool: ``add()`` finds the rows without NaN/Inf on the device (a mask;
a whole batch can be refused with ``valid=``, e.g. the images a non-finite loss produced), puts
them first (a stable sort) and writes them to slots computed on the device from device-resident
counters (kept count, FIFO pointer); dropped rows go to a trash row that is never read. Nothing
waits for the device: the counts reach the host through an asynchronous copy, which the host
reads once it has arrived (``take_dropped``; on the CPU at once). Until then ``sample()`` maps
the indices it draws onto the rows known to be kept, on the device. ``len``, ``seen``,
``images``, ``flush`` and ``close`` wait for the counts (they need exact host numbers).
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
STORAGES = ("device", "cuda", "cpu", "disk", None)

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
                _, batch, kept = item
                kept = int(kept)  # this thread waits for the device, never the synthesis loop
                if kept == 0:
                    continue
                batch = batch[:kept]
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

    def submit(self, idx: int, batch: torch.Tensor, kept):
        """Write the first ``kept`` rows of ``batch`` (``kept``: an int or a device scalar)."""
        self.queue.put((idx, batch, kept))

    def wait_idle(self):
        """Block until every submitted batch is written (errors are reported by flush())."""
        self.queue.join()

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
                 save_dir: str | None = None, save_format: str = "shard", storage: str | None = None,
                 directory: str | None = None):
        if storage not in STORAGES:
            raise ValueError(f"DataPool: storage must be one of {STORAGES}, got {storage!r}")
        if storage in ("cpu", "disk"):
            raise NotImplementedError(f"DataPool: storage={storage!r} is not available yet")
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"DataPool: directory must be a path or None, got {type(directory).__name__}")
        self.storage = "device"
        self.directory = None if directory is None else os.fspath(directory)
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
        # the counters live on the device (a dropped row is known there only); the host holds
        # the values of the last batch whose counts it has read, and an upper bound for ``_n``
        self._n_dev = self._seen_dev = self._ptr_dev = None
        self._n = 0  # images kept (exact when nothing is unresolved, else an upper bound)
        self._n_res = 0  # images kept after the last resolved batch
        self._seen = 0  # images ever kept, as of the last resolved batch
        self._unresolved: list = []  # (host counts, CUDA event or None, batch size) per add()
        self._batches = 0
        self._perm: torch.Tensor | None = None
        self._cursor = 0
        self.dropped = 0  # images refused as non-finite, ever (as far as resolved)
        self._dropped_new = 0  # of those, not yet handed out by take_dropped()
        self._saver = _SaveWorker(save_dir, save_format) if save_dir is not None else None
        self._init: torch.Tensor | None = None  # set_init: sampled with the pool, kept apart

    def __len__(self) -> int:
        self._resolve(wait=True)
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
        """Images ever kept (a host read of the device count when batches are unresolved)."""
        self._resolve(wait=True)
        return self._seen

    def _grow(self, need: int, shape):
        """Room for ``need`` images plus the trailing trash row that dropped rows are written to."""
        cap = self._data.shape[0] - 1 if self._data is not None else 0
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 64)
        if self.capacity is not None:
            new_cap = min(new_cap, self.capacity)
        # zeros: a slot is never read before it is written, except in sample()'s remap when no
        # finite image was ever kept (then the student gets black images, never a dropped one)
        buf = torch.zeros((new_cap + 1, *shape), dtype=torch.uint8, device=self.device)
        if self._data is not None:
            buf[:cap].copy_(self._data[:cap])
        self._data = buf

    def add(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add a batch of images in [0, 1] (or uint8), shape (B, C, H, W).

        Rows with a NaN or Inf are dropped on the device; ``valid`` (a one-element bool tensor,
        e.g. ``isfinite(loss)``) drops the whole batch where False. No host sync: the kept rows
        go to slots computed on the device from device counters (dropped rows to a trash row);
        their count reaches the host through an asynchronous copy (``take_dropped``)."""
        if not torch.is_tensor(images) or images.dim() != 4:
            raise ValueError(f"DataPool.add: images must be a (B, C, H, W) tensor, got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        if valid is not None and (not torch.is_tensor(valid) or valid.dtype != torch.bool or valid.numel() != 1):
            raise TypeError(f"DataPool.add: valid must be a one-element bool tensor or None, got {valid!r}")
        shape = tuple(images.shape[1:])
        known = tuple(self._data.shape[1:]) if self._data is not None else \
            (tuple(self._init.shape[1:]) if self._init is not None else None)
        if known is not None and known != shape:
            raise ValueError(f"DataPool.add: image shape {shape} differs from the pool's {known}")
        B = images.shape[0]
        if B == 0:
            return
        x = images.detach().to(self.device)
        dev = self.device
        if x.dtype == torch.uint8:
            keep = torch.ones(B, dtype=torch.bool, device=dev)
        else:
            keep = torch.isfinite(x).flatten(1).all(1)
        if valid is not None:
            keep = keep & valid.to(dev).reshape(())
        # the kept rows first, in their order (a stable sort); how many there are stays on the device
        order = torch.argsort((~keep).to(torch.uint8), stable=True)
        x = x.index_select(0, order)
        x = x if x.dtype == torch.uint8 else to_uint8(x)
        k = keep.sum()
        if self._n_dev is None:
            self._n_dev = torch.zeros((), dtype=torch.int64, device=dev)
            self._seen_dev = torch.zeros((), dtype=torch.int64, device=dev)
            self._ptr_dev = torch.zeros((), dtype=torch.int64, device=dev)
        cap = self.capacity
        self._grow(self._n + B if cap is None else min(cap, self._n + B), shape)
        trash = self._data.shape[0] - 1
        j = torch.arange(B, device=dev)
        m = self._n_dev
        kept = j < k
        if cap is None:
            self._data.index_copy_(0, torch.where(kept, m + j, trash), x)
            self._n_dev = m + k
        else:
            fill = kept & (m + j < cap)
            self._data.index_copy_(0, torch.where(fill, m + j, trash), x)
            if self.eviction is not None:
                # rows past the free slots replace old ones; of more new rows than the pool holds
                # only the newest ``cap`` are written (written after the fills, as they win)
                first = torch.maximum(cap - m, k - cap)
                ev = kept & (j >= first)
                e = (j - first).clamp(0, cap - 1)
                if self.eviction == "fifo":
                    slots = (self._ptr_dev + e) % cap
                else:
                    slots = torch.randperm(cap, device=dev)[e]
                self._data.index_copy_(0, torch.where(ev, slots, trash), x)
                self._ptr_dev = (self._ptr_dev + (k - first).clamp(min=0)) % cap
            self._n_dev = torch.clamp(m + k, max=cap)
        self._seen_dev = self._seen_dev + k
        self._perm = None  # like the rebuilt upstream loader: a new shuffle after every addition
        # the host learns k (and the counters after this add) from an asynchronous copy
        counts = torch.stack([k, self._n_dev, self._seen_dev])
        if dev.type == "cuda":
            host = torch.empty(3, dtype=torch.int64, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dev))
        else:
            host, event = counts, None
        self._unresolved.append((host, event, B))
        self._n = self._n + B if cap is None else min(cap, self._n + B)  # an upper bound until resolved
        if self._saver is not None:
            self._saver.submit(self._batches, x, k.clone())
        self._batches += 1

    def _resolve(self, wait: bool) -> None:
        """Read the counts of added batches on the host: those whose copy has arrived (``wait``
        False: no sync), or all of them (``wait`` True: a sync, for the readers that need exact
        numbers: ``len``, ``seen``, ``images``, ``flush``, ``close``)."""
        done = 0
        for host, event, B in self._unresolved:
            if event is not None:
                if wait:
                    event.synchronize()
                elif not event.query():
                    break
            k, n, seen = (int(v) for v in host.numpy())  # host memory: no device read
            self._dropped_new += B - k
            self.dropped += B - k
            self._n_res, self._seen = n, seen
            done += 1
        if done:
            del self._unresolved[:done]
            rest = sum(B for _, _, B in self._unresolved)
            n = self._n_res + rest if self.capacity is None else min(self.capacity, self._n_res + rest)
            if n != self._n:
                # a permutation drawn over the old upper bound may hold indices past the new one
                self._n, self._perm = n, None

    def take_dropped(self, wait: bool = False) -> int:
        """Images dropped since the last call, as far as the host knows without waiting (CPU: all
        of them; CUDA: those whose counts have arrived, the rest at a later call; ``wait=True``
        waits for every count)."""
        self._resolve(wait)
        n, self._dropped_new = self._dropped_new, 0
        return n

    def images(self) -> torch.Tensor:
        """All kept images (uint8 view)."""
        self._resolve(wait=True)
        if self._data is None or self._n == 0:
            raise RuntimeError("DataPool: empty; call synthesize() first")
        return self._data[: self._n]

    def sample_indices(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Indices into the kept images followed by the init images (``set_init``). While counts
        are unresolved the kept-image range is an upper bound (``sample`` maps the surplus)."""
        self._resolve(wait=False)
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
        n_up = self._n
        if not self._unresolved and self._init is None:
            return self._data.index_select(0, idx).to(dtype).div_(255.0)
        if n_up == 0:
            return self._init.index_select(0, idx).to(dtype).div_(255.0)
        # without a host read: an index in [kept, upper bound) (rows a drop left empty while the
        # host does not know the count yet) is mapped onto the kept and init images
        n_kept = self._n_dev if self._unresolved else n_up
        n_init = 0 if self._init is None else self._init.shape[0]
        is_init = idx >= n_up
        surplus = (idx >= n_kept) & ~is_init
        r = (idx - n_kept) % torch.clamp(torch.as_tensor(n_kept, device=idx.device) + n_init, min=1)
        kept_idx = torch.where(surplus, r, idx).clamp(max=n_up - 1)
        x = self._data.index_select(0, kept_idx)
        if self._init is None:
            return x.to(dtype).div_(255.0)
        from_init = is_init | (surplus & (r >= n_kept))
        init_idx = torch.where(is_init, idx - n_up, r - n_kept).clamp(0, n_init - 1)
        x = torch.where(from_init.view(-1, 1, 1, 1), self._init.index_select(0, init_idx), x)
        return x.to(dtype).div_(255.0)

    def state_dict(self) -> dict:
        """The pool's contents and sampling position (uint8 images, counters, the sampling
        permutation and its cursor), after waiting for every count and every queued write, so a
        pool loaded from it samples what this one would. Images written to ``save_dir`` stay
        there: a later pool numbers its files after them. The ``set_init`` images are not part
        of it (they come from the synthesizer's ``init_dataset``)."""
        self.flush()
        c = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        return {"capacity": self.capacity, "eviction": self.eviction, "data": c(self._data),
                "n_dev": c(self._n_dev), "seen_dev": c(self._seen_dev), "ptr_dev": c(self._ptr_dev),
                "n": self._n, "n_res": self._n_res, "seen": self._seen, "batches": self._batches,
                "perm": c(self._perm), "cursor": self._cursor, "dropped": self.dropped,
                "dropped_new": self._dropped_new}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s contents into a pool of the same capacity and eviction."""
        for key in ("capacity", "eviction"):
            if state[key] != getattr(self, key):
                raise ValueError(f"DataPool.load_state_dict: {key}={getattr(self, key)!r} differs from the saved "
                                 f"pool's {key}={state[key]!r}")
        self._resolve(wait=True)
        if self._data is not None and state["data"] is not None and \
                tuple(self._data.shape[1:]) != tuple(state["data"].shape[1:]):
            raise ValueError(f"DataPool.load_state_dict: saved images of shape {tuple(state['data'].shape[1:])}, "
                             f"this pool holds {tuple(self._data.shape[1:])}")
        d = lambda t: None if t is None else t.to(self.device).clone()  # noqa: E731
        self._data, self._n_dev, self._seen_dev, self._ptr_dev = (
            d(state["data"]), d(state["n_dev"]), d(state["seen_dev"]), d(state["ptr_dev"]))
        self._n, self._n_res, self._seen = int(state["n"]), int(state["n_res"]), int(state["seen"])
        self._batches, self._cursor = int(state["batches"]), int(state["cursor"])
        self._perm = d(state["perm"])
        self.dropped, self._dropped_new = int(state["dropped"]), int(state["dropped_new"])
        self._unresolved = []

    def wait_idle(self):
        """Block until the writer thread has written everything submitted so far (before a CUDA
        graph capture: no copy of ours runs on another thread meanwhile)."""
        if self._saver is not None:
            self._saver.wait_idle()

    def flush(self):
        self._resolve(wait=True)
        if self._saver is not None:
            self._saver.flush()

    def close(self):
        self._resolve(wait=True)
        if self._saver is not None:
            self._saver.close()
            self._saver = None
