"""Pool of synthesized images: on the synthesis device, in host memory, or on disk.

The upstream pool writes every image as a PNG into ``save_dir`` and rebuilds a DataLoader (4
worker processes, PIL decode, per-image transforms) after every synthesized batch. This pool
keeps the images as uint8 (the same quantisation as the PNG round trip: clamp to [0, 1], times
255, truncate), computes slots and samples indices on the device, and writes copies to
``save_dir`` only when asked, from a background thread. Where the images live is ``storage``
(``pool_store``; docs/POOL.md): on the device (the default on a CPU, and on a GPU when the
expected pool fits comfortably), in pinned host memory, or in memory-mapped shard files with
an atomically committed index; the last two keep the GPU memory independent of the pool size.

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
import logging
import os
import queue
import re
import threading

import numpy as np
import torch

from . import pool_store
from .png import to_uint8, write_png

EVICTION = ("fifo", "random", None)
SAVE_FORMATS = ("shard", "png")
STORAGES = ("device", "cuda", "cpu", "disk", None)

_NUMBERED = re.compile(r"^(?:(\d+)-\d+\.png|shard_(\d+)\.npy)$")
_DIR_LOCK = threading.Lock()
_DIR_NEXT: dict = {}  # absolute directory -> next free batch number (this process)
_log = logging.getLogger("fastsynth.pool")


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


def _free_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def choose_storage(expected_bytes: int | None, device_type: str, free_device: int | None,
                   free_host: int | None) -> tuple[str, str]:
    """The automatic storage (``DataPool(storage=None)``) and the reason, from the expected pool
    size in bytes (None: unknown) and the free device / host memory.

    - a CPU pool device: ``"device"`` (the device is host memory already);
    - unknown size on a GPU: ``"device"`` for now; ``DataPool`` asks again with the size of
      every doubling of its buffer and moves the pool to host memory or disk when the answer
      changes (``DataPool._grow_check``);
    - ``"device"`` when twice the expected size (a doubling holds the old and the new buffer) is
      at most a quarter of the free device memory (the rest is the models' and the synthesis');
    - else ``"cpu"`` when the expected size is at most half the available host memory;
    - else ``"disk"``."""
    if device_type != "cuda":
        return "device", f"the pool's device ({device_type}) is host memory"
    if expected_bytes is None:
        return "device", ("the pool size is not known (no capacity, no expected_images): on the GPU until a "
                          "doubling of it would not fit comfortably")
    size = _gib(expected_bytes)
    if free_device is not None and 2 * expected_bytes <= free_device // 4:
        return "device", f"the expected pool ({size}) fits a quarter of the free GPU memory ({_gib(free_device)}) twice"
    if free_host is None or expected_bytes <= free_host // 2:
        return "cpu", (f"the expected pool ({size}) does not fit the GPU comfortably "
                       f"(free {_gib(free_device or 0)}) and fits half the available host memory")
    return "disk", f"the expected pool ({size}) exceeds half the available host memory ({_gib(free_host)})"


def _rank_directory(directory: str) -> str:
    """``directory/rank{r}`` under an initialised torch.distributed group of several processes:
    each rank keeps its own shard (module docstring), and two writers never share an index."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return os.path.join(directory, f"rank{dist.get_rank():05d}")
    return directory


class DataPool:
    """Bounded image pool with uniform sampling (see the module docstring).

    ``storage``: where the uint8 images live -- ``"device"``/``"cuda"`` on ``device`` (``"cuda"``
    insists that it is a GPU), ``"cpu"`` in host memory (pinned where CUDA is available; each
    sampled batch is gathered on the host and copied to ``device`` asynchronously), ``"disk"`` in
    memory-mapped shard files under ``directory`` with an atomically appended index
    (``pool_store.DiskStore``; reopening a directory resumes its pool), or ``None``: chosen once
    the image shape is known, from the expected size (``capacity``, else ``expected_images``)
    and the free memory (``choose_storage``), and said in the ``fastsynth.pool`` log; of an
    unknown size on a GPU, on the device until a doubling would not fit (``_grow_check``). With
    ``"cpu"`` and ``"disk"`` the GPU memory does not depend on the pool's size (but for the
    sampling permutation, 8 bytes per image).

    Under torch.distributed each rank keeps its own pool (its own images; ``"disk"`` puts it in
    ``directory/rank{r}``) and samples its per-rank slice of the global batch from it. With equal
    pool sizes on every rank (equal per-rank synthesis batches) the global batch is a stratified
    uniform sample of the union of all ranks' images: every image has the same marginal
    probability, 1 / (world x pool size) per drawn image; there is no communication and each
    rank holds 1/world of the images."""

    def __init__(self, capacity: int | None = None, eviction: str | None = "fifo", device="cpu",
                 save_dir: str | None = None, save_format: str = "shard", storage: str | None = None,
                 directory: str | None = None, expected_images: int | None = None):
        if capacity is not None and (not isinstance(capacity, int) or capacity <= 0):
            raise ValueError(f"DataPool: capacity must be a positive int or None, got {capacity!r}")
        if eviction not in EVICTION:
            raise ValueError(f"DataPool: eviction must be one of {EVICTION}, got {eviction!r}")
        if save_format not in SAVE_FORMATS:
            raise ValueError(f"DataPool: save_format must be one of {SAVE_FORMATS}, got {save_format!r}")
        if storage not in STORAGES:
            raise ValueError(f"DataPool: storage must be one of {STORAGES}, got {storage!r}")
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"DataPool: directory must be a path or None, got {type(directory).__name__}")
        if expected_images is not None and (not isinstance(expected_images, int) or expected_images <= 0):
            raise ValueError(f"DataPool: expected_images must be a positive int or None, got {expected_images!r}")
        self.capacity = capacity
        self.eviction = eviction
        self.device = torch.device(device)
        if storage == "cuda" and self.device.type != "cuda":
            raise ValueError(f"DataPool: storage='cuda' keeps the pool on a GPU, but the pool's device is "
                             f"{self.device}")
        if storage == "disk" and directory is None:
            raise ValueError("DataPool: storage='disk' needs directory= (where the shard files and the index go)")
        self.directory = None if directory is None else os.fspath(directory)
        if save_dir is not None and self.directory is not None and \
                os.path.abspath(save_dir) == os.path.abspath(self.directory):
            # both write shard_{i:06d}.npy: the saved copies would overwrite the pool's shards
            raise ValueError(f"DataPool: save_dir and directory must differ, both are {self.directory!r}")
        self.expected_images = expected_images
        self.storage: str | None = None  # "device", "cpu" or "disk" once chosen
        self._auto = storage is None
        # an automatic "device" choice on a GPU is checked again at every doubling (_grow_check)
        self._watch_growth = False
        self._free_device = lambda: torch.cuda.mem_get_info(self.device)[0]
        self._store = None
        self._own_dir: str | None = None  # a temporary directory the automatic choice made (removed at close)
        # the counters live on the device (a dropped row is known there only); the host holds
        # the values of the last batch whose counts it has read, and an upper bound for ``_n``
        self._n_dev = self._seen_dev = self._ptr_dev = None
        self._n = 0  # images kept (exact when nothing is unresolved, else an upper bound)
        self._n_res = 0  # images kept after the last resolved batch
        self._seen = 0  # images ever kept, as of the last resolved batch
        self._unresolved: list = []  # per add(): (host counts, CUDA event or None, batch size)
        # beside each: a host store's (rows, slots) on the host (None for a device store); they
        # travel with the counts and are written when those are read
        self._payloads: list = []
        self._batches = 0
        self._perm: torch.Tensor | None = None
        self._perm_host: tuple | None = None  # (perm, its host copy)
        self._cursor = 0
        self.dropped = 0  # images refused as non-finite, ever (as far as resolved)
        self._dropped_new = 0  # of those, not yet handed out by take_dropped()
        self._saver = _SaveWorker(save_dir, save_format) if save_dir is not None else None
        self._init: torch.Tensor | None = None  # set_init: sampled with the pool, kept apart
        if storage in ("device", "cuda"):
            self._use("device")
        elif storage in ("cpu", "disk"):
            self._use(storage)
        elif self.directory is not None and os.path.exists(
                os.path.join(_rank_directory(self.directory), pool_store.INDEX)):
            self._use("disk", "a pool index exists in the directory: reopening it")
        elif self.device.type != "cuda":
            self._use("device", choose_storage(None, self.device.type, None, None)[1])

    # ------------------------------------------------------------------ storage
    def _use(self, storage: str, reason: str | None = None) -> None:
        self.storage = storage
        if storage == "device":
            self._store = pool_store.DeviceStore(self.device)
        elif storage == "cpu":
            self._store = pool_store.HostStore(pin=self.device.type == "cuda")
        else:
            directory = self.directory
            if directory is None:
                import tempfile
                directory = self._own_dir = tempfile.mkdtemp(prefix="fastsynth-pool-")
            self._store = pool_store.DiskStore(_rank_directory(directory), self.capacity, self.eviction)
            self._restore_counters(self._store.counters())
        if reason is not None:
            where = f" in {self._store.directory}" if storage == "disk" else ""
            _log.info("fastsynth: DataPool storage=%r%s: %s", storage, where, reason)

    def _decide(self, shape) -> None:
        """The automatic choice, once the image shape is known (first add/set_init/load)."""
        if self._store is not None:
            return
        expected = self.capacity if self.capacity is not None else self.expected_images
        nbytes = None if expected is None else expected * int(np.prod(shape))
        free_dev = self._free_device() if self.device.type == "cuda" else None
        storage, reason = choose_storage(nbytes, self.device.type, free_dev, _free_host_bytes())
        self._use(storage, reason)
        self._watch_growth = storage == "device" and self.device.type == "cuda"

    def _grow_check(self, need: int, shape) -> None:
        """An automatic device pool about to double: if the doubled buffer no longer fits
        (``choose_storage`` with its size and the free GPU memory, counting the buffer it
        replaces as free), the pool moves to pinned host memory or disk, once. The move waits
        for the device (the counts and the rows it copies) -- one sync, logged, in the whole run."""
        store = self._store
        if need <= store.rows:
            return
        new_rows = max(need, 2 * store.rows, 64)
        if self.capacity is not None:
            new_rows = min(new_rows, self.capacity)
        row = int(np.prod(shape))
        storage, reason = choose_storage(new_rows * row, "cuda", self._free_device() + store.rows * row,
                                         _free_host_bytes())
        if storage == "device":
            return
        self._resolve(wait=True)
        n = self._n
        self._watch_growth = False
        self._use(storage, f"the pool is growing to {new_rows} images, moved off the GPU: {reason}")
        if n:
            rows = self._host_tensor(store.data[:n])
            self._store.reserve(n, shape, self.capacity)
            counters = {"n": n, "seen": self._seen, "ptr": int(self._ptr_dev), "dropped": self.dropped}
            self._store.write(rows, torch.arange(n).view(1, n), counters=counters)
        if self._init is not None:
            self._init = self._host_tensor(self._init)
        store.data = None  # the GPU buffer goes now

    def _restore_counters(self, c: dict | None) -> None:
        """The counters of a reopened disk pool (its last committed index entry)."""
        if c is None:
            return
        dev = self.device
        self._n_dev, self._seen_dev, self._ptr_dev = (torch.tensor(c[k], dtype=torch.int64, device=dev)
                                                      for k in ("n", "seen", "ptr"))
        self._n = self._n_res = c["n"]
        self._seen, self.dropped = c["seen"], c["dropped"]
        self._batches = self._store.entries
        self._perm = None

    @property
    def _shape(self):
        if self._store is not None and self._store.shape is not None:
            return tuple(self._store.shape)
        return None if self._init is None else tuple(self._init.shape[1:])

    def _host_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in host memory, pinned where it is copied to a GPU."""
        if self.device.type == "cuda":
            out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            out.copy_(x)
            return out
        return x.cpu()

    def __len__(self) -> int:
        self._resolve(wait=True)
        return self._n

    def set_init(self, images: torch.Tensor) -> None:
        """Images to sample from besides the synthesized ones (upstream's ``init_dataset``): in
        [0, 1] or uint8, (N, C, H, W); never evicted, counted or saved. They live where the
        pool's images do (device or host memory; host memory for ``"disk"``)."""
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"DataPool.set_init: images must be a non-empty (N, C, H, W) tensor, got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        x = images.detach()
        x = x if x.dtype == torch.uint8 else to_uint8(x)
        known = self._shape
        if known is not None and known != tuple(x.shape[1:]):
            raise ValueError(f"DataPool.set_init: image shape {tuple(x.shape[1:])} differs from the pool's {known}")
        self._decide(tuple(x.shape[1:]))
        self._init = x.to(self.device) if self._store.on_device else self._host_tensor(x)
        self._perm = None

    @property
    def seen(self) -> int:
        """Images ever kept (a host read of the device count when batches are unresolved)."""
        self._resolve(wait=True)
        return self._seen

    def add(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add a batch of images in [0, 1] (or uint8), shape (B, C, H, W).

        Rows with a NaN or Inf are dropped on the device; ``valid`` (a one-element bool tensor,
        e.g. ``isfinite(loss)``) drops the whole batch where False. No host sync: the kept rows
        go to slots computed on the device from device counters (dropped rows to a trash row);
        their count reaches the host through an asynchronous copy (``take_dropped``). With a host
        or disk store the batch and its slots follow the counts to the host in the same
        asynchronous copy and are written there once it has arrived (at a later add, or the
        next sample/flush at the latest)."""
        if not torch.is_tensor(images) or images.dim() != 4:
            raise ValueError(f"DataPool.add: images must be a (B, C, H, W) tensor, got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        if valid is not None and (not torch.is_tensor(valid) or valid.dtype != torch.bool or valid.numel() != 1):
            raise TypeError(f"DataPool.add: valid must be a one-element bool tensor or None, got {valid!r}")
        shape = tuple(images.shape[1:])
        known = self._shape
        if known is not None and known != shape:
            raise ValueError(f"DataPool.add: image shape {shape} differs from the pool's {known}")
        B = images.shape[0]
        if B == 0:
            return
        self._decide(shape)
        x = images.detach().to(self.device)
        dev = self.device
        if x.dtype == torch.uint8 and valid is None:
            k = torch.full((), B, dtype=torch.int64, device=dev)  # every row kept: no sort needed
            if self._saver is not None and x.data_ptr() == images.data_ptr():
                x = x.clone()  # the writer thread reads it later; the caller may reuse its tensor
        else:
            if x.dtype == torch.uint8:
                keep = torch.ones(B, dtype=torch.bool, device=dev)
            else:
                keep = torch.isfinite(x).flatten(1).all(1)
            if valid is not None:
                keep = keep & valid.to(dev).reshape(())
            # the kept rows first, in their order (a stable sort); how many stays on the device
            order = torch.argsort((~keep).to(torch.uint8), stable=True)
            x = x.index_select(0, order)
            k = keep.sum()
        x = x if x.dtype == torch.uint8 else to_uint8(x)
        if self._n_dev is None:
            self._n_dev = torch.zeros((), dtype=torch.int64, device=dev)
            self._seen_dev = torch.zeros((), dtype=torch.int64, device=dev)
            self._ptr_dev = torch.zeros((), dtype=torch.int64, device=dev)
        cap = self.capacity
        if self._watch_growth:
            self._grow_check(self._n + B if cap is None else min(cap, self._n + B), shape)
        store = self._store
        store.reserve(self._n + B if cap is None else min(cap, self._n + B), shape, cap)
        trash = store.trash
        j = torch.arange(B, device=dev)
        m = self._n_dev
        kept = j < k
        writes = []  # slot per row (trash: not written), one pass after another (later passes win)
        if cap is None:
            writes.append(torch.where(kept, m + j, trash))
            self._n_dev = m + k
        else:
            fill = kept & (m + j < cap)
            writes.append(torch.where(fill, m + j, trash))
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
                writes.append(torch.where(ev, slots, trash))
                self._ptr_dev = (self._ptr_dev + (k - first).clamp(min=0)) % cap
            self._n_dev = torch.clamp(m + k, max=cap)
        self._seen_dev = self._seen_dev + k
        self._perm = None  # like the rebuilt upstream loader: a new shuffle after every addition
        # the host learns k (and the counters after this add) from an asynchronous copy
        counts = torch.stack([k, self._n_dev, self._seen_dev, self._ptr_dev])
        payload = None
        if store.on_device:
            store.write(x, writes)
        if dev.type == "cuda":
            host = torch.empty(4, dtype=torch.int64, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            if not store.on_device:
                slots = torch.stack(writes)
                payload = (torch.empty(x.shape, dtype=torch.uint8, pin_memory=True),
                           torch.empty(slots.shape, dtype=torch.int64, pin_memory=True))
                payload[0].copy_(x, non_blocking=True)
                payload[1].copy_(slots, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dev))
        else:
            host, event = counts, None
            if not store.on_device:
                payload = (x, torch.stack(writes))
        self._unresolved.append((host, event, B))
        self._payloads.append(payload)
        self._n = self._n + B if cap is None else min(cap, self._n + B)  # an upper bound until resolved
        if self._saver is not None:
            self._saver.submit(self._batches, x, k.clone())
        self._batches += 1
        if payload is not None:
            self._resolve(wait=False)  # write what has arrived (on the CPU: this batch, now)

    def _resolve(self, wait: bool) -> None:
        """Read the counts of added batches on the host (and write a host store's rows): those
        whose copy has arrived (``wait`` False: no sync), or all of them (``wait`` True: a sync,
        for the readers that need exact numbers: ``len``, ``seen``, ``images``, ``flush``,
        ``close``, and a host store's ``sample``)."""
        done = 0
        for (host, event, B), payload in zip(self._unresolved, self._payloads):
            if event is not None:
                if wait:
                    event.synchronize()
                elif not event.query():
                    break
            k, n, seen, ptr = (int(v) for v in host.numpy())  # host memory: no device read
            self._dropped_new += B - k
            self.dropped += B - k
            self._n_res, self._seen = n, seen
            if payload is not None:
                self._store.write(*payload, counters={"n": n, "seen": seen, "ptr": ptr, "dropped": self.dropped})
            done += 1
        if done:
            del self._unresolved[:done]
            del self._payloads[:done]
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
        """All kept images (uint8): a view on the device or in host memory; for ``"disk"`` a
        host tensor read from the shards (the whole pool in memory: for inspection only)."""
        self._resolve(wait=True)
        if self._store is None or self._n == 0:
            raise RuntimeError("DataPool: empty; call synthesize() first")
        return self._store.view(self._n)

    def _take(self, n: int, generator, host: bool) -> list:
        """The next ``n`` indices of the sampling permutation (kept images, then init images),
        drawn on ``device`` with ``generator``; ``host``: as host tensors (the permutation is
        copied to the host once per draw: the one device read a host store's sampling needs)."""
        total = self._n + (0 if self._init is None else self._init.shape[0])
        if total == 0:
            raise RuntimeError("DataPool: empty; call synthesize() first")
        n = min(int(n), total)
        parts = []
        while n > 0:
            if self._perm is None or self._cursor >= self._perm.shape[0]:
                self._perm = torch.randperm(total, device=self.device, generator=generator)
                self._cursor = 0
            perm = self._perm
            if host:
                if self._perm_host is None or self._perm_host[0] is not perm:
                    self._perm_host = (perm, perm.cpu())
                perm = self._perm_host[1]
            take = min(n, perm.shape[0] - self._cursor)
            parts.append(perm[self._cursor:self._cursor + take])
            self._cursor += take
            n -= take
        return parts

    def sample_indices(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Indices into the kept images followed by the init images (``set_init``), on ``device``.
        While counts are unresolved the kept-image range is an upper bound (``sample`` maps the
        surplus)."""
        self._resolve(wait=False)
        parts = self._take(n, generator, host=False)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def sample(self, n: int, dtype=torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` kept images (at most all of them) as floats in [0, 1] on ``device``."""
        if self._store is not None and not self._store.on_device:
            return self._sample_host(n, dtype, generator)
        idx = self.sample_indices(n, generator)
        n_up = self._n
        data = None if self._store is None else self._store.data
        if not self._unresolved and self._init is None:
            return data.index_select(0, idx).to(dtype).div_(255.0)
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
        x = data.index_select(0, kept_idx)
        if self._init is None:
            return x.to(dtype).div_(255.0)
        from_init = is_init | (surplus & (r >= n_kept))
        init_idx = torch.where(is_init, idx - n_up, r - n_kept).clamp(0, n_init - 1)
        x = torch.where(from_init.view(-1, 1, 1, 1), self._init.index_select(0, init_idx), x)
        return x.to(dtype).div_(255.0)

    def _sample_host(self, n: int, dtype, generator) -> torch.Tensor:
        """A host store's batch: the rows are gathered on the host into pinned memory and copied
        to the device asynchronously. What waits for the device: the rows of the last adds must
        be on the host before they can be read (one wait per add, for the copy that follows the
        synthesis), and each new permutation is copied to the host once (drawn on the device
        with the caller's generator, so the indices are those of a device pool)."""
        self._resolve(wait=True)
        parts = self._take(n, generator, host=True)
        idx = parts[0] if len(parts) == 1 else torch.cat(parts)
        n_pool = self._n
        out = torch.empty((idx.shape[0], *self._shape), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        if self._init is None:
            self._store.gather(idx, out)
        else:
            mine = idx < n_pool
            if bool(mine.all()):
                self._store.gather(idx, out)
            else:
                if bool(mine.any()):
                    rows = torch.empty((int(mine.sum()), *self._shape), dtype=torch.uint8)
                    self._store.gather(idx[mine], rows)
                    out[mine] = rows
                out[~mine] = self._init.index_select(0, idx[~mine] - n_pool)
        x = out.to(self.device, non_blocking=True) if self.device.type == "cuda" else out
        return x.to(dtype).div_(255.0)

    def state_dict(self) -> dict:
        """The pool's contents and sampling position (counters, the sampling permutation and its
        cursor, and the images: uint8 rows for ``"device"``/``"cpu"``, the index's directory and
        entry count for ``"disk"``), after waiting for every count and every queued write, so a
        pool loaded from it samples what this one would. Images written to ``save_dir`` stay
        there: a later pool numbers its files after them. The ``set_init`` images are not part
        of it (they come from the synthesizer's ``init_dataset``)."""
        self.flush()
        c = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        images = {"data": None} if self._store is None else self._store.state()
        return {"capacity": self.capacity, "eviction": self.eviction, "storage": self.storage,
                "data": images.get("data"), "index": images.get("index"),
                "n_dev": c(self._n_dev), "seen_dev": c(self._seen_dev), "ptr_dev": c(self._ptr_dev),
                "n": self._n, "n_res": self._n_res, "seen": self._seen, "batches": self._batches,
                "perm": c(self._perm), "cursor": self._cursor, "dropped": self.dropped,
                "dropped_new": self._dropped_new}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s contents into a pool of the same capacity and eviction. A
        ``"device"`` state and a ``"cpu"`` state load into either storage; a ``"disk"`` state
        reopens its index (in this pool's ``directory`` when it has one, else the saved one) and
        forgets the entries appended after it was saved."""
        for key in ("capacity", "eviction"):
            if state[key] != getattr(self, key):
                raise ValueError(f"DataPool.load_state_dict: {key}={getattr(self, key)!r} differs from the saved "
                                 f"pool's {key}={state[key]!r}")
        self._resolve(wait=True)
        index = state.get("index")
        if index is not None:
            if self._store is None or (self._auto and self.storage != "disk"):
                # an automatic choice follows the state (whatever it held is replaced anyway)
                if self.directory is None:
                    self.directory = index["directory"]
                self._use("disk", "the loaded state is a disk pool's")
            if self.storage != "disk":
                raise ValueError(f"DataPool.load_state_dict: the saved pool is a disk pool (index in "
                                 f"{index['directory']!r}); this pool has storage={self.storage!r}")
            self._store.truncate(int(index["entries"]))
        else:
            data = state["data"]
            if data is not None:
                known = self._shape
                if known is not None and known != tuple(data.shape[1:]):
                    raise ValueError(f"DataPool.load_state_dict: saved images of shape {tuple(data.shape[1:])}, "
                                     f"this pool holds {known}")
                self._decide(tuple(data.shape[1:]))
                if self.storage == "disk":
                    raise ValueError("DataPool.load_state_dict: the saved pool holds its images in the state "
                                     f"(storage={state.get('storage', 'device')!r}); a disk pool loads only a disk "
                                     "pool's state")
            if self._store is not None:
                self._store.load({"data": data})
        d = lambda t: None if t is None else t.to(self.device).clone()  # noqa: E731
        self._n_dev, self._seen_dev, self._ptr_dev = d(state["n_dev"]), d(state["seen_dev"]), d(state["ptr_dev"])
        self._n, self._n_res, self._seen = int(state["n"]), int(state["n_res"]), int(state["seen"])
        self._batches, self._cursor = int(state["batches"]), int(state["cursor"])
        self._perm = d(state["perm"])
        self.dropped, self._dropped_new = int(state["dropped"]), int(state["dropped_new"])
        self._unresolved, self._payloads = [], []

    def wait_idle(self):
        """Block until the writer thread has written everything submitted so far (before a CUDA
        graph capture: no copy of ours runs on another thread meanwhile)."""
        if self._saver is not None:
            self._saver.wait_idle()

    def flush(self):
        """Wait for every count and every write (a host store's rows, the ``save_dir`` files)."""
        self._resolve(wait=True)
        if self._saver is not None:
            self._saver.flush()

    def close(self):
        self._resolve(wait=True)
        if self._saver is not None:
            self._saver.close()
            self._saver = None
        close = getattr(self._store, "close", None)
        if close is not None:
            close()
        if self._own_dir is not None:
            import shutil
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None
