"""DataPool storages: "device", "cpu" (host memory) and "disk" (memory-mapped shards with an
atomically committed index) keep the same images, counters and sample the same indices; the
disk index survives a crash between a shard write and its index entry and a process restart;
a disk pool of a million images keeps the resident memory bounded while sampling uniformly."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fastsynth.synthesis import DataPool
from fastsynth.synthesis import pool_store
from fastsynth.synthesis.pool import choose_storage

STORAGES = ["device", "cpu", "disk"]
CONFIGS = [(None, "fifo"), (10, "fifo"), (10, "random"), (10, None), (3, "fifo")]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pool(storage, tmp_path, capacity=None, eviction="fifo", name="pool"):
    directory = str(tmp_path / name) if storage == "disk" else None
    return DataPool(capacity=capacity, eviction=eviction, storage=storage, directory=directory)


def _batches(seed=0):
    """Float batches with NaN/Inf rows, a batch refused by ``valid``, a uint8 batch and one
    larger than the smallest capacity; every image distinct."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(6):
        x = torch.rand(4 + b % 3, 3, 5, 3, generator=g)
        valid = None
        if b == 1:
            x[1, 0, 0, 0] = float("nan")
            x[2, 2, 4, 2] = float("inf")
        if b == 3:
            valid = torch.tensor([False])
        if b == 4:
            x = (x * 255).to(torch.uint8)
        out.append((x, valid))
    return out


def _fill(pool, batches):
    for x, valid in batches:
        pool.add(x, valid=valid)


def _same(a, b, seed=5, draws=4):
    assert len(a) == len(b) and a.seen == b.seen and a.dropped == b.dropped
    assert torch.equal(a.images().cpu(), b.images().cpu())
    for k in range(draws):
        ga, gb = torch.Generator().manual_seed(seed + k), torch.Generator().manual_seed(seed + k)
        assert torch.equal(a.sample(7, generator=ga), b.sample(7, generator=gb))


@pytest.mark.parametrize("capacity,eviction", CONFIGS)
@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_storage_matches_device(storage, capacity, eviction, tmp_path):
    """Same images, counters, dropped counts, sample indices and samples as a device pool."""
    torch.manual_seed(3)  # "random" eviction draws its slots from the global generator
    ref = _pool("device", tmp_path, capacity, eviction)
    _fill(ref, _batches())
    torch.manual_seed(3)
    p = _pool(storage, tmp_path, capacity, eviction)
    _fill(p, _batches())
    assert p.storage == storage and ref.storage == "device"
    ref.flush()
    assert ref.dropped == 2 + 4  # two non-finite rows, one refused batch of 4
    assert len(ref) == (min(capacity, ref.seen) if capacity else ref.seen)
    _same(ref, p)
    ga, gb = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(ref.sample_indices(11, generator=ga), p.sample_indices(11, generator=gb))
    assert p.sample(4).device.type == "cpu"
    ref.close()
    p.close()


@pytest.mark.parametrize("storage", STORAGES)
def test_uniform_sampling_without_replacement(storage, tmp_path):
    p = _pool(storage, tmp_path)
    p.add(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous())
    g = torch.Generator().manual_seed(0)
    first = torch.cat([p.sample(5, generator=g) for _ in range(2)])
    assert sorted(round(v * 255) for v in first[:, 0, 0, 0].tolist()) == list(range(10))
    counts = torch.zeros(10)
    for _ in range(300):
        counts += torch.bincount((p.sample(3, generator=g)[:, 0, 0, 0] * 255).round().long(), minlength=10)
    assert counts.sum() == 900 and counts.min() >= 90 * 0.75 - 1 and counts.max() <= 90 * 1.25 + 1
    p.close()


@pytest.mark.parametrize("storage", STORAGES)
def test_init_images_sampled_with_the_pool(storage, tmp_path):
    ref, p = _pool("device", tmp_path), _pool(storage, tmp_path, name="p2")
    init = torch.full((3, 3, 5, 3), 250, dtype=torch.uint8)
    for q in (ref, p):
        q.set_init(init)
        _fill(q, _batches()[:2])
    _same(ref, p)
    with pytest.raises(ValueError, match="image shape"):
        p.add(torch.rand(2, 3, 4, 4))
    ref.close()
    p.close()


@pytest.mark.parametrize("capacity,eviction", [(None, "fifo"), (10, "random")])
@pytest.mark.parametrize("storage", STORAGES)
def test_state_dict_round_trip(storage, capacity, eviction, tmp_path):
    """A pool loaded from a state samples what the saved one would; a disk state keeps the
    index (not the images) and its load forgets the entries appended after it was saved."""
    torch.manual_seed(1)
    a = _pool(storage, tmp_path, capacity, eviction)
    batches = _batches()
    _fill(a, batches[:4])
    a.sample(3, generator=torch.Generator().manual_seed(1))
    st = a.state_dict()
    if storage == "disk":
        assert st["data"] is None and st["index"]["entries"] == 4
    else:
        assert st["index"] is None and st["data"].dtype == torch.uint8
    torch.manual_seed(1)
    ref = _pool("device", tmp_path, capacity, eviction, name="ref")
    _fill(ref, batches[:4])
    ref.sample(3, generator=torch.Generator().manual_seed(1))
    _fill(a, batches[4:])  # appended after the state was saved
    a.close()
    b = _pool(storage, tmp_path, capacity, eviction)  # disk: the same directory, reopened
    b.load_state_dict(st)
    _same(ref, b)
    torch.manual_seed(2)
    _fill(b, batches[4:])
    torch.manual_seed(2)
    _fill(ref, batches[4:])
    _same(ref, b)
    b.close()
    if storage != "disk":  # a memory state loads into the other memory storage
        c = _pool("cpu" if storage == "device" else "device", tmp_path, capacity, eviction)
        c.load_state_dict(st)
        assert len(c) == st["n"]
        c.close()


def test_disk_state_into_a_memory_pool_and_back_is_refused(tmp_path):
    d = _pool("disk", tmp_path)
    _fill(d, _batches()[:2])
    st = d.state_dict()
    with pytest.raises(ValueError, match="disk pool"):
        DataPool(storage="cpu").load_state_dict(st)
    m = DataPool(storage="cpu")
    _fill(m, _batches()[:2])
    with pytest.raises(ValueError, match="disk pool loads only"):
        DataPool(storage="disk", directory=str(tmp_path / "other")).load_state_dict(m.state_dict())
    d.close()


def test_disk_reopens_a_state_without_a_directory_argument(tmp_path):
    a = _pool("disk", tmp_path)
    _fill(a, _batches()[:3])
    st = a.state_dict()
    ref_images, ref_len = a.images().clone(), len(a)
    a.close()
    b = DataPool()  # automatic storage: the saved state names its directory
    b.load_state_dict(st)
    assert b.storage == "disk" and len(b) == ref_len and torch.equal(b.images(), ref_images)
    b.close()


_CHILD_PRELUDE = textwrap.dedent("""
    import os, sys, torch
    from fastsynth.synthesis import DataPool
    from fastsynth.synthesis import pool_store
    d, mode = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (5, 3, 4, 4), generator=g, dtype=torch.uint8) for _ in range(4)]
""")


def _child(code, *args):
    return subprocess.run([sys.executable, "-c", _CHILD_PRELUDE + textwrap.dedent(code), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _batches_child():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (5, 3, 4, 4), generator=g, dtype=torch.uint8) for _ in range(4)]


@pytest.mark.parametrize("capacity", [None, 12])
def test_disk_crash_between_shard_and_index_leaves_a_consistent_pool(tmp_path, capacity):
    """The process dies after writing the third batch's shard (fsynced, renamed) and before its
    index entry: the index names two complete shards; reopening gives the pool of two batches,
    and the next add overwrites the orphan shard."""
    d = str(tmp_path / "pool")
    r = _child("""
        cap = None if mode == "None" else int(mode)
        p = DataPool(capacity=cap, storage="disk", directory=d)
        p.add(batches[0]); p.add(batches[1])
        def die(e):
            os._exit(17)  # a crash: no cleanup, no atexit, no flush
        pool_store.DiskStore._after_shard_write = staticmethod(die)
        p.add(batches[2])
        print("not reached")
    """, d, str(capacity))
    assert r.returncode == 17, r.stderr
    with open(os.path.join(d, pool_store.INDEX)) as f:
        lines = [json.loads(ln) for ln in f if ln.strip()]
    assert len(lines) == 3 and [e["rows"] for e in lines[1:]] == [5, 5]  # header + two entries
    assert os.path.exists(os.path.join(d, "shard_000002.npy"))  # the orphan
    batches = _batches_child()
    p = DataPool(capacity=capacity, storage="disk", directory=d)
    assert len(p) == 10 and p.seen == 10
    assert torch.equal(p.images(), torch.cat(batches[:2]))
    p.add(batches[3])

    def ref():
        r = DataPool(capacity=capacity)
        for x in (batches[0], batches[1], batches[3]):
            r.add(x)
        return r
    _same(ref(), p)
    p.close()
    q = DataPool(capacity=capacity, storage="disk", directory=d)  # and once more from disk
    _same(ref(), q)
    q.close()


def test_disk_ignores_partial_files_and_checks_its_index(tmp_path):
    """A crash inside a write leaves only temporary files (a half-written shard or index),
    which reopening ignores; a shard that does not match its entry is a clear error."""
    d = tmp_path / "pool"
    p = DataPool(storage="disk", directory=str(d))
    x = _batches_child()
    p.add(x[0])
    p.close()
    (d / ".shard_000001.npy.tmp-4242").write_bytes(b"\x93NUMPY half")  # fastsynth/atomic_file.py's names
    (d / f".{pool_store.INDEX}.tmp-4242").write_bytes(b'{"rows": 5, "sta')
    q = DataPool(storage="disk", directory=str(d))
    assert len(q) == 5 and torch.equal(q.images(), x[0])
    q.add(x[1])
    assert torch.equal(q.images(), torch.cat(x[:2]))
    q.close()
    np.save(d / "shard_000001.npy", np.zeros((4, 3, 4, 4), np.uint8))  # damaged behind the index's back
    r = DataPool(storage="disk", directory=str(d))
    with pytest.raises(RuntimeError, match="index entry names"):
        r.images()
    r.close()


def test_disk_reopen_after_process_restart(tmp_path):
    d = str(tmp_path / "pool")
    r = _child("""
        p = DataPool(capacity=12, eviction="fifo", storage="disk", directory=d)
        for x in batches[:3]:
            p.add(x)
        p.add(batches[3].float().div(255).index_fill_(0, torch.tensor([2]), float("nan")))
        p.close()
    """, d, "-")
    assert r.returncode == 0, r.stderr
    batches = _batches_child()
    ref = DataPool(capacity=12, eviction="fifo")
    for x in batches[:3]:
        ref.add(x)
    ref.add(batches[3].float().div(255).index_fill_(0, torch.tensor([2]), float("nan")))
    p = DataPool(capacity=12, eviction="fifo", storage="disk", directory=d)
    assert p.dropped == 1 and p.seen == 19
    _same(ref, p)
    for q in (ref, p):
        q.add(batches[0])
    _same(ref, p)
    p.close()
    with pytest.raises(ValueError, match="capacity"):
        DataPool(capacity=13, storage="disk", directory=d)


def test_disk_directory_has_one_writer(tmp_path):
    a = DataPool(storage="disk", directory=str(tmp_path))
    with pytest.raises(RuntimeError, match="in use"):
        DataPool(storage="disk", directory=str(tmp_path))
    a.close()
    DataPool(storage="disk", directory=str(tmp_path)).close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="storage must be one of"):
        DataPool(storage="gpu")
    with pytest.raises(ValueError, match="storage='cuda'"):
        DataPool(storage="cuda", device="cpu")
    with pytest.raises(ValueError, match="needs directory="):
        DataPool(storage="disk")
    with pytest.raises(TypeError, match="directory must be"):
        DataPool(storage="disk", directory=3)
    with pytest.raises(ValueError, match="expected_images"):
        DataPool(expected_images=0)
    with pytest.raises(ValueError, match="save_dir and directory must differ"):
        DataPool(storage="disk", directory="/tmp/x", save_dir="/tmp/x/")


def test_automatic_choice():
    cifar = 50_000 * 3 * 32 * 32
    assert choose_storage(cifar, "cpu", None, None)[0] == "device"
    assert choose_storage(None, "cuda", 80 << 30, 100 << 30)[0] == "device"  # re-checked at each doubling
    assert choose_storage(cifar, "cuda", 80 << 30, 100 << 30)[0] == "device"
    imagenet = 412_000 * 3 * 224 * 224  # ~62 GB
    assert choose_storage(imagenet, "cuda", 80 << 30, 200 << 30)[0] == "cpu"
    assert choose_storage(imagenet, "cuda", 80 << 30, 100 << 30)[0] == "disk"
    p = DataPool()  # a CPU pool device: the pool is in host memory anyway
    assert p.storage == "device"


_MILLION = textwrap.dedent("""
    import os, sys, time, numpy as np, torch
    from fastsynth.synthesis import DataPool
    def rss(field="VmRSS"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    t0 = time.time()
    N, B = 1_000_000, 25_000
    p = DataPool(storage="disk", directory=sys.argv[1])
    ids = torch.arange(N, dtype=torch.int64)
    for lo in range(0, N, B):
        x = torch.zeros(B, 3, 32, 32, dtype=torch.uint8)
        i = ids[lo:lo + B]  # each image carries its number in its first three bytes
        for b in range(3):
            x[:, 0, 0, b] = ((i >> (8 * b)) & 255).to(torch.uint8)
        x[:, 1:] = (i % 251).to(torch.uint8).view(B, 1, 1, 1)
        p.add(x)
        del x
    t_write = time.time() - t0
    assert len(p) == N
    g = torch.Generator().manual_seed(0)
    counts = np.zeros(40, np.int64)
    draws = 0
    while draws < 50_000:
        y = p.sample(1000, generator=g).mul_(255).round_().to(torch.uint8)
        n = y[:, 0, 0, 0].long() | (y[:, 0, 0, 1].long() << 8) | (y[:, 0, 0, 2].long() << 16)
        assert bool((y[:, 1:] == (n % 251).to(torch.uint8).view(-1, 1, 1, 1)).all())  # whole images
        counts += np.bincount(n.numpy() // (N // 40), minlength=40)
        draws += 1000
    print(rss("VmRSS"), rss("VmHWM"), draws, ",".join(map(str, counts)), t_write, time.time() - t0)
    p.close()
""")


def test_disk_million_images_bounded_resident_memory(tmp_path):
    """One million 32x32 images (3 GB on disk) in a disk pool: writing them and sampling 50k
    whole images from every shard keeps the process's peak resident memory under 1 GB (VmHWM,
    torch included), and the samples are uniform over 40 buckets of the pool."""
    try:
        r = subprocess.run([sys.executable, "-c", _MILLION, str(tmp_path / "pool")], cwd=REPO, capture_output=True,
                           text=True, timeout=170)
    finally:
        shutil.rmtree(tmp_path / "pool", ignore_errors=True)  # 3 GB: not left for pytest's kept tmp dirs
    assert r.returncode == 0, r.stderr[-3000:]
    rss, hwm, draws, counts, t_write, t_all = r.stdout.split()
    counts = np.array([int(c) for c in counts.split(",")])
    assert counts.sum() == int(draws)
    assert int(hwm) < 1 << 30 and int(rss) < 1 << 30, (rss, hwm)
    # without replacement within a permutation: the counts vary less than a multinomial's, so
    # the chi-square bound of a multinomial (39 degrees of freedom, p = 1e-6: 96) is a safe one
    expected = int(draws) / 40
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 96 and counts.min() > 0, (chi2, counts)


def test_automatic_storage_reopens_a_disk_pool_and_logs_once(tmp_path, caplog):
    d = str(tmp_path / "pool")
    a = DataPool(storage="disk", directory=d)
    _fill(a, _batches()[:2])
    n = len(a)
    a.close()
    with caplog.at_level("INFO", logger="fastsynth.pool"):
        b = DataPool(directory=d)  # storage=None: the index there is reopened
        _fill(b, _batches()[2:4])
        b.sample(3)
    assert b.storage == "disk" and n == 7 and len(b) == n + 6  # of the next two, the second is refused
    lines = [r.getMessage() for r in caplog.records if r.name == "fastsynth.pool"]
    assert len(lines) == 1 and "storage='disk'" in lines[0] and "reopening" in lines[0], lines
    b.close()


def test_disk_pool_of_each_rank_in_its_own_directory(tmp_path, monkeypatch):
    """Under an initialised process group of several ranks, a disk pool lives in
    ``directory/rank{r:05d}``: the ranks' shards never share an index."""
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    pools = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, r=rank: r)
        p = DataPool(storage="disk", directory=str(tmp_path))
        p.add(torch.full((2, 1, 2, 2), rank, dtype=torch.uint8))
        pools.append(p)
    for rank, p in enumerate(pools):
        assert os.path.exists(tmp_path / f"rank{rank:05d}" / pool_store.INDEX)
        assert p.images().unique().tolist() == [rank]
        p.close()


class _Held(DataPool):
    """A pool whose batches stay in flight until something needs them (as on a GPU, where the
    asynchronous copies of several adds may not have arrived before a sample)."""
    hold = True

    def _resolve(self, wait):
        if self.hold and not wait:
            return
        super()._resolve(wait)


@pytest.mark.parametrize("capacity,eviction", [(None, "fifo"), (10, "fifo"), (10, "random")])
@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_host_store_writes_batches_in_flight_in_order(storage, capacity, eviction, tmp_path):
    """Several adds whose rows have not reached the host yet are written, in order, before the
    first read (sample, state_dict): the pool equals a device pool."""
    torch.manual_seed(4)
    ref = _pool("device", tmp_path, capacity, eviction)
    _fill(ref, _batches())
    torch.manual_seed(4)
    directory = str(tmp_path / "held") if storage == "disk" else None
    p = _Held(capacity=capacity, eviction=eviction, storage=storage, directory=directory)
    _fill(p, _batches())
    assert len(p._unresolved) == 6 and len(p._payloads) == 6  # nothing written yet
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(ref.sample(9, generator=ga), p.sample(9, generator=gb))
    assert not p._unresolved and not p._payloads
    torch.manual_seed(5)
    _fill(p, _batches(1)[:2])
    torch.manual_seed(5)
    _fill(ref, _batches(1)[:2])
    st = p.state_dict()  # waits for (writes) the two batches in flight
    assert st["n"] == ref.state_dict()["n"]
    _same(ref, p)
    p.close()


@pytest.mark.parametrize("storage", ["device", "cpu"])
def test_memory_state_is_deterministic(storage, tmp_path):
    """The saved rows past the kept ones are zeros on both memory storages (a checkpoint does
    not depend on what the memory held); the last row is the device store's trash row."""
    a, b = _pool(storage, tmp_path), _pool("device", tmp_path)
    for q in (a, b):
        _fill(q, _batches()[:2])
    sa, sb = a.state_dict(), b.state_dict()
    assert torch.equal(sa["data"][:-1], sb["data"][:-1]) and not sa["data"][len(a):-1].any()


@pytest.mark.parametrize("target", ["cpu", "disk"])
def test_automatic_device_pool_moves_off_the_gpu_when_it_outgrows_it(tmp_path, caplog, monkeypatch, target):
    """An automatic pool of unknown size starts on the device; at the doubling that no longer
    fits the free GPU memory it moves (once, logged) to host memory, or to disk when the host
    is short too, and goes on as the same pool."""
    from fastsynth.synthesis import pool as pool_mod
    free = {"dev": 1 << 40, "host": 1 << 40 if target == "cpu" else 1000}
    monkeypatch.setattr(pool_mod, "_free_host_bytes", lambda: free["host"])
    ref = DataPool(capacity=None)
    p = DataPool(directory=str(tmp_path / "pool") if target == "disk" else None)
    p._watch_growth = True  # as after an automatic "device" choice on a GPU
    p._free_device = lambda: free["dev"]
    p.set_init(torch.full((2, 3, 5, 3), 9, dtype=torch.uint8))
    ref.set_init(torch.full((2, 3, 5, 3), 9, dtype=torch.uint8))
    batches = _batches() * 14  # 300 images: doublings at 64, 128, 256
    with caplog.at_level("INFO", logger="fastsynth.pool"):
        for i, (x, valid) in enumerate(batches):
            if i == 20:
                free["dev"] = 0  # the next doubling does not fit
            p.add(x, valid=valid)
            ref.add(x, valid=valid)
            if i == 19:
                assert p.storage == "device"
    assert p.storage == target and len(p) == len(ref) > 128
    lines = [r.getMessage() for r in caplog.records if r.name == "fastsynth.pool"]
    assert len(lines) == 1 and "moved off the GPU" in lines[0] and f"storage={target!r}" in lines[0], lines
    _same(ref, p)
    p.close()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("capacity,eviction", [(None, "fifo"), (10, "fifo")])
@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_cuda_host_storage_matches_device(storage, capacity, eviction, tmp_path):
    """On a GPU: the batches travel to the host asynchronously and the samples come back to the
    device; same images and same samples (device generators) as a device pool."""
    ref = DataPool(capacity=capacity, eviction=eviction, device="cuda", storage="device")
    p = DataPool(capacity=capacity, eviction=eviction, device="cuda", storage=storage,
                 directory=str(tmp_path / "pool") if storage == "disk" else None)
    p.set_init(torch.full((2, 3, 5, 3), 9, dtype=torch.uint8))
    ref.set_init(torch.full((2, 3, 5, 3), 9, dtype=torch.uint8))
    for x, valid in _batches():
        for q in (ref, p):
            q.add(x.cuda(), valid=None if valid is None else valid.cuda())
    assert len(ref) == len(p) and ref.dropped == p.dropped and torch.equal(ref.images().cpu(), p.images().cpu())
    for k in range(4):
        ga = torch.Generator(device="cuda").manual_seed(k)
        gb = torch.Generator(device="cuda").manual_seed(k)
        a, b = ref.sample(7, generator=ga), p.sample(7, generator=gb)
        assert b.device.type == "cuda" and torch.equal(a, b)
    ref.close()
    p.close()


@needs_cuda
@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_cuda_gpu_memory_independent_of_pool_size(storage, tmp_path):
    """200 MB of images added to a host or disk pool on a GPU: the GPU memory allocated after
    the adds and a sample is that of a batch, not of the pool."""
    p = DataPool(device="cuda", storage=storage, directory=str(tmp_path / "pool") if storage == "disk" else None)
    x = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, device="cuda")
    p.add(x)
    p.sample(256)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for _ in range(16):
        p.add(x)
    p.sample(256)
    torch.cuda.synchronize()
    assert len(p) == 17 * 4096
    assert torch.cuda.memory_allocated() - base < 2 << 20  # the permutation (8 bytes per image) only
    p.close()
