"""Where a ``DataPool`` keeps its uint8 images: on the synthesis device, in (pinned) host
memory, or in memory-mapped shard files on disk.

The pool computes every slot on its device (``DataPool.add``); a store only holds rows and
writes/reads them:

* ``DeviceStore``: one uint8 tensor on the device plus a trailing trash row that dropped rows
  are written to (the writes stay on the device, no host sync).
* ``HostStore``: one uint8 tensor in host memory, pinned when the pool's device is a GPU so that each
  sampled batch is gathered on the host and copied to the device asynchronously.
* ``DiskStore``: an append-only log of shard files (``shard_{e:06d}.npy``, one per added
  batch: its surviving rows) and an index (``index.jsonl``) naming them. An entry is committed
  in this order: write the shard to a temporary name, fsync, rename it; then write the whole
  index to a temporary file, fsync, rename it over the old one, fsync the directory. A crash at
  any point leaves either the old index or the new one, and neither names a shard that is not
  complete on disk; a shard without an index entry is ignored (and overwritten by the next
  entry of that number). Shards are plain ``.npy`` files (``np.load(path, mmap_mode="r")``
  maps one); sampling reads its rows with ``pread`` (``DiskStore.gather`` says why not through
  maps), so the resident memory stays bounded however large the pool grows.

Slots (the pool's indices) map onto disk rows through a table held in host memory (8 bytes per
slot): with eviction a slot's newest image lives in a later shard. Evicted images stay in their
shard files (the index no longer points at them), so with a capacity the disk use grows with
the images seen, not the images kept.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections import OrderedDict

import numpy as np
import torch

from ..atomic_file import atomic_write

INDEX = "index.jsonl"
FORMAT_VERSION = 1


def _release_host_cache() -> None:
    """Return freed pinned blocks to the system (the caching host allocator keeps them, which
    after a doubling would hold the old pool's memory for good)."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


class _MemoryStore:
    """Rows in one uint8 tensor ``data`` (``_alloc``), grown by doubling; ``extra_rows`` past the
    pool's (the device store's trash row)."""

    extra_rows = 0

    @property
    def shape(self):
        return None if self.data is None else tuple(self.data.shape[1:])

    @property
    def rows(self) -> int:
        return 0 if self.data is None else self.data.shape[0] - self.extra_rows

    def reserve(self, need: int, shape, capacity: int | None) -> None:
        cap = self.rows
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 64)
        if capacity is not None:
            new_cap = min(new_cap, capacity)
        buf = self._alloc(new_cap, shape)
        if self.data is not None:
            buf[:cap].copy_(self.data[:cap])
        self.data = buf
        self._grown()

    def _grown(self) -> None:
        pass

    def view(self, n: int) -> torch.Tensor:
        return self.data[:n]


class DeviceStore(_MemoryStore):
    """The pool's rows on its device, plus a trash row at index ``rows`` (see the module doc)."""

    on_device = True
    extra_rows = 1

    def __init__(self, device: torch.device):
        self.device = device
        self.data: torch.Tensor | None = None

    @property
    def trash(self) -> int:
        return self.rows

    def _alloc(self, rows: int, shape) -> torch.Tensor:
        # zeros: a slot is never read before it is written, except in sample()'s remap when no
        # finite image was ever kept (then the student gets black images, never a dropped one)
        return torch.zeros((rows + 1, *shape), dtype=torch.uint8, device=self.device)

    def write(self, x: torch.Tensor, slots) -> None:
        for s in slots:  # in order: a later pass wins a slot written twice
            self.data.index_copy_(0, s, x)

    def state(self) -> dict:
        return {"data": None if self.data is None else self.data.detach().clone()}

    def load(self, state: dict) -> None:
        d = state["data"]
        self.data = None if d is None else d.to(self.device).clone()


class HostStore(_MemoryStore):
    """The pool's rows in host memory (pinned when the pool's device is a GPU)."""

    on_device = False
    trash = -1  # slots of dropped rows; skipped on the host

    def __init__(self, pin: bool):
        self.pin = bool(pin)  # pinned: the pool's batches are copied to a GPU asynchronously
        self.data: torch.Tensor | None = None

    def _alloc(self, rows: int, shape) -> torch.Tensor:
        # zeros, though no slot is read before it is written: the unwritten rows go into
        # state_dict(), which must not depend on what the memory held before
        return torch.zeros((rows, *shape), dtype=torch.uint8, pin_memory=self.pin)

    def _grown(self) -> None:
        if self.pin:
            _release_host_cache()

    def write(self, x: torch.Tensor, slots, counters: dict | None = None) -> None:
        """``x`` (B, C, H, W) uint8 and ``slots`` (passes, B) int64, both on the host."""
        for s in slots:
            m = s >= 0
            if bool(m.all()):
                self.data.index_copy_(0, s, x)
            elif bool(m.any()):
                self.data.index_copy_(0, s[m], x[m])

    def gather(self, idx: torch.Tensor, out: torch.Tensor) -> None:
        torch.index_select(self.data, 0, idx, out=out)

    def state(self) -> dict:
        # the device store's layout (rows + one trash row), so either store loads the other's state
        if self.data is None:
            return {"data": None}
        return {"data": torch.cat([self.data, self.data.new_zeros((1, *self.data.shape[1:]))])}

    def load(self, state: dict) -> None:
        d = state["data"]
        if d is None:
            self.data = None
            return
        self.data = self._alloc(d.shape[0] - 1, tuple(d.shape[1:]))
        self.data.copy_(d[:-1])


class DiskStore:
    """The pool's rows in shard files under ``directory`` (see the module docstring).

    ``max_open``: shard files kept open for reading (least recently used closed first)."""

    on_device = False
    trash = -1

    # hooks for tests: called between the steps of a commit (a crash there must be harmless)
    _after_shard_write = None
    # fsync every shard and index before the next step: the order of the steps already survives
    # the process being killed (the page cache outlives it); fsync makes it survive the machine
    # going down. Tests that only measure memory may switch it off.
    durable = True

    def __init__(self, directory: str, capacity: int | None, eviction, max_open: int = 256):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.capacity, self.eviction = capacity, eviction
        self.max_open = int(max_open)
        # one pool per directory: a second writer would interleave index entries
        self._lock = open(os.path.join(self.directory, "LOCK"), "a")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise RuntimeError(f"DataPool: directory {self.directory!r} is in use by another pool "
                               f"(each pool, and each rank, needs its own directory)") from None
        self.shape = None
        self._header: dict | None = None
        self._entries: list[dict] = []
        self._lines: list[bytes] = []  # the index as written (header first)
        self._starts = np.zeros(1, dtype=np.int64)  # disk row where entry e starts; last: total rows
        self._table = np.zeros(0, dtype=np.int64)  # slot -> disk row (-1: empty)
        self._files: OrderedDict = OrderedDict()  # entry -> (fd, offset of its rows)
        self._open_index()

    # ------------------------------------------------------------------ index
    def _open_index(self) -> None:
        path = os.path.join(self.directory, INDEX)
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            lines = [ln for ln in f.read().split(b"\n") if ln]
        if not lines:
            return
        header = json.loads(lines[0])
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"DataPool: {path} has format version {header.get('version')!r}, "
                             f"expected {FORMAT_VERSION}")
        for key in ("capacity", "eviction"):
            if header[key] != getattr(self, key):
                raise ValueError(f"DataPool: the pool in {self.directory!r} was written with {key}={header[key]!r}, "
                                 f"this pool has {key}={getattr(self, key)!r}")
        self._set_header(header)
        self._lines = [lines[0]]
        for ln in lines[1:]:
            self._replay(json.loads(ln), ln)

    def _set_header(self, header: dict) -> None:
        self._header = header
        self.shape = tuple(header["shape"])
        self._row_bytes = int(np.prod(self.shape))

    def _replay(self, entry: dict, line: bytes) -> None:
        e = len(self._entries)
        rows = int(entry["rows"])
        slots = self._entry_slots(e, entry)
        first = int(self._starts[-1])
        if rows:
            need = int(slots.max()) + 1
            if need > self._table.shape[0]:  # doubling: a run of E entries copies O(slots), not O(E x slots)
                grow = max(need, 2 * self._table.shape[0]) - self._table.shape[0]
                self._table = np.concatenate([self._table, np.full(grow, -1, np.int64)])
            self._table[slots] = first + np.arange(rows, dtype=np.int64)
        self._entries.append(entry)
        self._lines.append(line)
        self._starts = np.append(self._starts, first + rows)

    def _entry_slots(self, e: int, entry: dict) -> np.ndarray:
        rows, start = int(entry["rows"]), int(entry["start"])
        if start >= 0:
            return np.arange(start, start + rows, dtype=np.int64)
        return np.load(os.path.join(self.directory, f"shard_{e:06d}.slots.npy"))

    def counters(self) -> dict | None:
        """The pool's counters after the last committed entry (None: nothing committed)."""
        if not self._entries:
            return None
        last = self._entries[-1]
        return {k: int(last[k]) for k in ("n", "seen", "ptr", "dropped")}

    @property
    def entries(self) -> int:
        return len(self._entries)

    def truncate(self, entries: int) -> None:
        """Forget the entries after the first ``entries`` (a state saved earlier is loaded): the
        index is rewritten atomically; later shard files are overwritten by the next adds."""
        if entries > len(self._entries):
            raise ValueError(f"DataPool.load_state_dict: the saved pool has {entries} index entries, the index in "
                             f"{self.directory!r} holds only {len(self._entries)}")
        if entries == len(self._entries):
            return
        lines = self._lines[:1 + entries]
        self._close_files()
        self._entries, self._lines = [], [lines[0]]
        self._starts = np.zeros(1, dtype=np.int64)
        self._table = np.zeros(0, dtype=np.int64)
        for ln in lines[1:]:
            self._replay(json.loads(ln), ln)
        self._write_index()

    def _write_index(self) -> None:
        data = b"\n".join(self._lines) + b"\n"
        atomic_write(os.path.join(self.directory, INDEX), lambda f: f.write(data), fsync=self.durable)

    # ------------------------------------------------------------------ writes
    def reserve(self, need: int, shape, capacity: int | None) -> None:
        shape = tuple(int(s) for s in shape)
        if self._header is None:
            self._set_header({"version": FORMAT_VERSION, "shape": list(shape), "dtype": "uint8",
                              "capacity": self.capacity, "eviction": self.eviction})
            self._lines = [json.dumps(self._header).encode()]
            self._write_index()
        elif shape != self.shape:
            raise ValueError(f"DataPool.add: image shape {shape} differs from the pool's {self.shape} "
                             f"(in {self.directory!r})")

    def write(self, x: torch.Tensor, slots: torch.Tensor, counters: dict) -> None:
        """Commit one added batch: ``x`` (B, C, H, W) uint8 on the host, ``slots`` (passes, B)
        (-1: not written; a later pass wins a slot), ``counters`` the pool's after it."""
        s = slots.numpy()
        # the row that ends up in each slot: its last write (passes in order, rows in order)
        rows = np.tile(np.arange(s.shape[1], dtype=np.int64), s.shape[0])
        flat = s.reshape(-1)
        ok = flat >= 0
        rows, flat = rows[ok], flat[ok]
        keep_slots, last = np.unique(flat[::-1], return_index=True)  # first in reverse = last write
        keep_rows = rows[::-1][last]
        order = np.argsort(keep_rows, kind="stable")  # the shard keeps the batch's row order
        keep_rows, keep_slots = keep_rows[order], keep_slots[order]
        e = len(self._entries)
        n_rows = int(keep_rows.shape[0])
        contiguous = n_rows > 0 and bool((np.diff(keep_slots) == 1).all())
        start = int(keep_slots[0]) if contiguous else (-1 if n_rows else 0)
        arr = x.numpy()
        # keep_rows is sorted and unique: it is 0..n_rows-1 (the usual case, kept rows come first)
        # exactly when its last element is n_rows - 1; then a slice, not a copy
        arr = arr[:n_rows] if n_rows == 0 or int(keep_rows[-1]) == n_rows - 1 else arr[keep_rows]
        if n_rows:
            base = os.path.join(self.directory, f"shard_{e:06d}")
            if not contiguous:
                atomic_write(base + ".slots.npy", lambda f: np.save(f, keep_slots), fsync=self.durable,
                             sync_folder=False)
            # the folder's fsync comes with the index write that commits the shard
            atomic_write(base + ".npy", lambda f: np.save(f, np.ascontiguousarray(arr)), fsync=self.durable,
                         sync_folder=False)
            if self._after_shard_write is not None:
                self._after_shard_write(e)
        entry = {"rows": n_rows, "start": start, **{k: int(v) for k, v in counters.items()}}
        line = json.dumps(entry).encode()
        self._replay(entry, line)
        self._write_index()

    # ------------------------------------------------------------------ reads
    def _open(self, e: int) -> tuple:
        """(file descriptor, byte offset of the rows) of entry ``e``'s shard (kept open, LRU)."""
        hit = self._files.get(e)
        if hit is not None:
            self._files.move_to_end(e)
            return hit
        path = os.path.join(self.directory, f"shard_{e:06d}.npy")
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
        rows = int(self._entries[e]["rows"])
        if dtype != np.uint8 or fortran or tuple(shape) != (rows, *self.shape) or \
                size != offset + rows * self._row_bytes:
            raise RuntimeError(f"DataPool: shard {path} holds {dtype} {tuple(shape)} ({size} bytes), its index "
                               f"entry names {rows} uint8 images of shape {self.shape}")
        hit = self._files[e] = (os.open(path, os.O_RDONLY), offset)
        while len(self._files) > self.max_open:
            os.close(self._files.popitem(last=False)[1][0])
        return hit

    def _close_files(self) -> None:
        while self._files:
            os.close(self._files.popitem(last=False)[1][0])

    def gather(self, idx: torch.Tensor, out: torch.Tensor) -> None:
        """Rows of the slots ``idx`` (host int64) into ``out`` (host uint8, contiguous).

        Positional reads (``pread``), not the maps: a page fault on a mapped file makes a
        whole folio resident around the row (measured on Linux 6.18: 1000 random 3 KiB rows of
        one 77 MB shard left 80 MB resident), so sampling through maps grows the resident set
        towards the pool's size; a read costs one system call per row and nothing after."""
        g = self._table[idx.numpy()]
        if (g < 0).any():
            raise RuntimeError("DataPool: sampled a slot that holds no image (the index is inconsistent)")
        e = np.searchsorted(self._starts, g, side="right") - 1
        rows = g - self._starts[e]
        o = out.numpy().reshape(out.shape[0], -1)
        rb = self._row_bytes
        for i, (shard, row) in enumerate(zip(e.tolist(), rows.tolist())):
            fd, offset = self._open(shard)
            got = os.preadv(fd, [o[i]], offset + row * rb)
            if got != rb:
                raise RuntimeError(f"DataPool: short read from shard {shard} of {self.directory!r} "
                                   f"({got} of {rb} bytes)")

    def view(self, n: int) -> torch.Tensor:
        out = torch.empty((n, *self.shape), dtype=torch.uint8)
        for lo in range(0, n, 65536):
            hi = min(n, lo + 65536)
            self.gather(torch.arange(lo, hi), out[lo:hi])
        return out

    def state(self) -> dict:
        return {"index": {"directory": self.directory, "entries": len(self._entries)}}

    def close(self) -> None:
        self._close_files()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
