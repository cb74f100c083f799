"""Hazards of the compiled and captured synthesis steps (issue 22 section 2, issue 18's pool
guard): random numbers under torch.compile, generator state across graph warm-up, settings
changed between rounds, buffers captured by address, graph memory pools, and non-finite batches
kept out of the pool. CPU tests run everywhere; ``needs_cuda`` tests check the graph paths."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from fastsynth.synthesis import NAYER, DataPool, DeepInvSyntheiszer, FastMetaSynthesizer, FastSynthesizer, Normalizer
from fastsynth.synthesis import augment as aug_mod
from fastsynth.synthesis.core import CudaGraphStep

from test_synthesis import IMG, NORM, fast_gen, nl_gen, pair

AOT = {"backend": "aot_eager"}  # dynamo tracing as compile=True does, without inductor's codegen time


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # dynamo keeps at most 8 compiled versions of a code object (each synthesizer instance and
    # each bn/oh/adv value is one); fullgraph=True turns the 9th into an error
    torch._dynamo.reset()


def make(cls, device="cpu", **kw):
    """A small synthesizer of ``cls`` (fresh models; the same weights every call)."""
    t, s = pair()
    t, s = t.to(device), s.to(device)
    norm = Normalizer(*NORM)
    if cls in (FastMetaSynthesizer, FastSynthesizer):
        base = dict(iterations=3, synthesis_batch_size=8, adv=1.0, normalizer=norm, warmup=0, device=device)
        base.update(kw)
        return cls(t, s, fast_gen().to(device), 8, 10, (3, IMG, IMG), **base)
    if cls is NAYER:
        base = dict(g_steps=3, synthesis_batch_size=10, adv=1.0, normalizer=norm, warmup=0, g_life=100,
                    g_loops=1, gwp_loops=1, device=device)
        base.update(kw)
        g = nl_gen(base["synthesis_batch_size"])
        g.label_emb = g.label_emb.to(device)
        return NAYER(t, s, g.to(device), 10, (3, IMG, IMG), **base)
    base = dict(iterations=3, synthesis_batch_size=8, adv=1.0, normalizer=norm, device=device)
    base.update(kw)
    return DeepInvSyntheiszer(t, s, 10, (3, IMG, IMG), **base)


def images(out):
    x = out[0]["synthetic"]
    return torch.cat(x) if isinstance(x, list) else x


SYNTHS = [FastMetaSynthesizer, FastSynthesizer, NAYER, DeepInvSyntheiszer]


# ------------------------------------------------------------ 1. compile x seed x augmentation
@pytest.mark.parametrize("cls", SYNTHS)
def test_compile_with_seed_and_augmentation_runs_and_matches_eager(cls):
    """A private generator (seed=) and the default augmentation under torch.compile: the random
    numbers are drawn outside the compiled forward, so the compiled run sees exactly the numbers
    of the eager run with the same seed."""
    runs = []
    for compile_arg in (False, AOT):
        m = make(cls, seed=5, compile=compile_arg, augment=True)
        m.log_losses = True
        outs = [images(m.synthesize()) for _ in range(2)]
        runs.append((outs, torch.stack(m.loss_log)))
    (eo, el), (co, cl) = runs
    torch.testing.assert_close(cl, el, rtol=1e-4, atol=1e-5)
    for a, b in zip(eo, co):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_augment_codes_decide_the_crop_and_are_checked_against_the_input():
    """Codes drawn beforehand decide the crop (same codes -> same output, other seeds -> other
    crops); codes drawn for another input size are refused."""
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    a = aug_mod.Augment(None, padding=2)
    codes = a.draw(2, (6, 6), "cpu", torch.Generator().manual_seed(1))
    assert codes[0].shape == (2,) and codes[1] == 5 * 5 * 2
    assert torch.equal(a(x, codes=codes), a(x, codes=(codes[0].clone(), codes[1])))
    outs = {tuple(a(x, codes=a.draw(2, (6, 6), "cpu", torch.Generator().manual_seed(s))).flatten().tolist())
            for s in range(6)}
    assert len(outs) > 1
    assert aug_mod.Augment(None, enabled=False).draw(2, (6, 6), "cpu") is None
    sized = aug_mod.Augment(None, padding=2, size=(6, 6))
    with pytest.raises(ValueError, match="codes"):
        sized(x, codes=sized.draw(2, (8, 8), "cpu"))
    with pytest.raises(ValueError, match="codes"):
        aug_mod.jitter_flip(x, codes=aug_mod.jitter_codes((16, 16), "cpu"))


def test_crop_flip_codes_cover_every_offset_and_flip():
    """Every one of the 2*(2p+1)^2 (offset, flip) crops is reachable from drawn codes."""
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).expand(400, 1, 4, 4).contiguous()
    a = aug_mod.Augment(None, padding=1)
    out = a(x, codes=a.draw(400, (4, 4), "cpu", torch.Generator().manual_seed(0)))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 2 * 3 * 3


# ------------------------------------------------------------ 2. generator state across warm-up
def test_warm_up_restores_generator_states_tensors_and_zeroes_new_state():
    """The warm-up runs the step (here: draws from a private and the default generator, updates
    a tensor, creates state) and undoes all of it: the generators are where they were."""
    g = torch.Generator().manual_seed(3)
    t = torch.zeros(4)
    created = []

    def step():
        t.add_(torch.rand(4, generator=g) + torch.rand(4))
        if not created:
            created.append(torch.ones(2))
        created[0].add_(1)

    step_obj = CudaGraphStep(step, lambda: [t] + created, warmup=3, rng=g, device="cpu")
    before = (g.get_state(), torch.default_generator.get_state())
    step_obj.warm_up()
    assert torch.equal(g.get_state(), before[0])
    assert torch.equal(torch.default_generator.get_state(), before[1])
    assert torch.equal(t, torch.zeros(4)) and torch.equal(created[0], torch.zeros(2))
    step_obj()  # the first run after the warm-up draws what an eager first step draws
    g2 = torch.Generator().manual_seed(3)
    torch.default_generator.set_state(before[1])
    torch.testing.assert_close(t, torch.rand(4, generator=g2) + torch.rand(4))


def force_graph_mode(m):
    """The graph code path (CudaGraphStep, keys, mutable lists) on the CPU: CudaGraphStep runs
    its warm-up and then the step eagerly there (see its docstring)."""
    m._graph_mode = True  # what every synthesizer's driver (SynthCore._run_steps) reads
    return m


def _eager_then_graph_rounds(build, rounds, graph_check):
    """The images of ``rounds`` synthesize() calls of ``build(graph)`` for graph False then True
    (same global seed before each); ``graph_check(m)`` runs on the graph-mode synthesizer."""
    runs = []
    for graph in (False, True):
        torch.manual_seed(0)
        m = build(graph)
        runs.append([images(m.synthesize()) for _ in range(rounds)])
        if graph:
            graph_check(m)
    return zip(*runs)


@pytest.mark.parametrize("cls", [FastMetaSynthesizer, FastSynthesizer, NAYER])
@pytest.mark.parametrize("seed", [11, None])
def test_graph_path_after_warm_up_equals_eager_with_the_same_seed(cls, seed):
    def build(graph):
        m = make(cls, seed=seed, augment=True)
        return force_graph_mode(m) if graph else m

    def check(m):
        assert m._graphs and all(isinstance(g, CudaGraphStep) for g in m._graphs.values())

    for a, b in _eager_then_graph_rounds(build, 2, check):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ 3. settings changed between rounds
def _run_changing(m, change, rounds=3):
    m.log_losses = True
    for r in range(rounds):
        if r == 1:
            change(m)
        m.synthesize()
    return torch.stack(m.loss_log)


CHANGES = {
    "bn": lambda m: setattr(m, "bn", 4.0),
    "oh": lambda m: setattr(m, "oh", 0.25),
    "adv": lambda m: setattr(m, "adv", 3.0),
    "lr_g": lambda m: setattr(m, "lr_g", 0.5),
}


def _change_all(m):
    for change in CHANGES.values():
        change(m)


@pytest.mark.parametrize("cls", [FastMetaSynthesizer, NAYER])
def test_settings_changed_between_rounds_take_effect_compiled(cls):
    """Compiled steps follow bn/oh/adv/lr changes made between rounds exactly as eager steps
    do (all four at once: one compile per class keeps the test short; a change a compiled step
    ignored makes its losses differ from the eager ones), and the change does change the
    losses (else the test could not fail)."""
    change = _change_all
    kw = dict(seed=2, augment=True)
    eager = _run_changing(make(cls, **kw), change)
    comp = _run_changing(make(cls, compile=AOT, **kw), change)
    unchanged = _run_changing(make(cls, **kw), lambda m: None)
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    n = len(eager) // 3
    torch.testing.assert_close(eager[:n], unchanged[:n])
    assert not torch.allclose(eager[n:], unchanged[n:])


def test_lr_z_change_reaches_the_inner_optimizer():
    m = make(FastMetaSynthesizer, seed=1)
    m.synthesize()
    m.lr_g, m.lr_z = 0.3, 0.07
    m.synthesize()
    assert [g["lr"] for g in m._optimizer.param_groups] == [0.3, 0.07]


@pytest.mark.parametrize("cls", [FastMetaSynthesizer, NAYER])
def test_graph_is_replaced_and_closed_when_a_setting_changes(cls, monkeypatch):
    closed = []
    monkeypatch.setattr(CudaGraphStep, "close", lambda self: closed.append(self))
    m = force_graph_mode(make(cls, seed=1))
    m.synthesize()
    (first,) = m._graphs.values()
    m.synthesize()
    assert list(m._graphs.values()) == [first] and not closed  # same settings: replayed
    for name, change in CHANGES.items():
        change(m)
        m.synthesize()
        (g,) = m._graphs.values()
        assert g is not first and closed[-1] is first, name
        first = g
    m.close()
    assert closed[-1] is first and not m._graphs


# ------------------------------------------------------------ 4. meta gradients owned
@pytest.mark.parametrize("graph", [False, True])
def test_meta_grads_survive_grads_set_to_none_between_rounds(graph):
    """The summed inner gradients live in buffers the synthesizer owns: setting the
    generator's grads to None (zero_grad's default) between rounds changes nothing."""
    runs = []
    for to_none in (False, True):
        m = make(FastMetaSynthesizer, seed=4, iterations=2)
        if graph:
            force_graph_mode(m)
        m.synthesize()
        bufs = [b.data_ptr() for b in m._meta_grads]
        for _ in range(2):
            if to_none:
                m.meta_optimizer.zero_grad(set_to_none=True)
                assert all(p.grad is None for p in m.generator.parameters())
            m.synthesize()
        assert [b.data_ptr() for b in m._meta_grads] == bufs
        assert all(p.grad is b for p, b in zip(m.generator.parameters(), m._meta_grads))
        runs.append([p.detach().clone() for p in m.generator.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a)


# ------------------------------------------------------------ 5. pools and the writer
def test_pool_wait_idle_waits_for_the_writer(tmp_path, monkeypatch):
    import time

    from fastsynth.synthesis import pool as pool_mod

    real = pool_mod.np.save
    monkeypatch.setattr(pool_mod.np, "save", lambda *a, **k: (time.sleep(0.3), real(*a, **k)))
    p = DataPool(device="cpu", save_dir=str(tmp_path))
    p.add(torch.rand(2, 3, 4, 4))
    p.wait_idle()
    assert len(list(tmp_path.glob("shard_*.npy"))) == 1
    p.close()


def test_close_frees_every_graph():
    m = force_graph_mode(make(NAYER, seed=1))
    m.synthesize()
    steps = list(m._graphs.values())
    assert steps and all(s._warmed for s in steps)
    m.close()
    assert not m._graphs and all(not s._warmed and s.graph is None for s in steps)


# ------------------------------------------------------------ 6. no bad batch enters the pool
class _Syncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts device-to-host reads (``_local_scalar_dense``: item(), bool(), int() of a tensor)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_pool_drops_non_finite_rows_and_invalid_batches_without_a_host_read():
    p = DataPool(device="cpu")
    x = torch.rand(6, 3, 4, 4)
    x[1, 0, 0, 0] = float("nan")
    x[4, 2, 3, 1] = float("inf")
    with _Syncs() as s:
        p.add(x)
        p.add(torch.rand(3, 3, 4, 4), valid=torch.tensor(False))  # e.g. images of a NaN loss
        p.add(torch.rand(2, 3, 4, 4), valid=torch.tensor(True))
        smp = p.sample(20)
    assert s.n == 0
    assert smp.shape[0] == 6 and torch.isfinite(smp).all()
    assert p.take_dropped() == 2 + 3
    assert len(p) == 4 + 2 and p.dropped == 5 and p.seen == 6
    from fastsynth.synthesis.png import to_uint8

    assert torch.equal(p.images()[:4], to_uint8(x[[0, 2, 3, 5]]))  # the good rows, in order
    assert p.take_dropped() == 0
    with pytest.raises(TypeError, match="valid"):
        p.add(x, valid=1.0)


def _poison(m, where):
    """From now on: NaN teacher logits (where="loss") or NaN images."""
    nan_out = lambda mod, i, out: out * float("nan")  # noqa: E731
    if where == "loss":
        m.teacher[-1].register_forward_hook(nan_out)
    elif isinstance(m, DeepInvSyntheiszer):  # no generator: poison the images it optimises
        real_randn = m._randn
        m._randn = lambda *shape: real_randn(*shape) * float("nan")
    else:  # the module the inner steps run (FastMeta: the fast copy of the generator)
        getattr(m, "_fast", m.generator).register_forward_hook(nan_out)


@pytest.mark.parametrize("cls", SYNTHS)
@pytest.mark.parametrize("where", ["images", "loss"])
def test_injected_nan_batch_never_enters_the_pool(cls, where):
    """A round whose images (NaN generator output / NaN images) or whose loss (NaN teacher
    logits) is non-finite adds nothing to the pool, is reported once, and sampling (what the
    student trains on) returns only the earlier, finite images."""
    m = make(cls, seed=6, fuse_teacher=False)
    m.synthesize()
    n_good = len(m.data_pool)
    assert n_good > 0 and m.last_dropped == 0
    _poison(m, where)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m.synthesize()
    msgs = [x for x in w if "did not enter the pool" in str(x.message)]
    assert len(msgs) == 1, [str(x.message) for x in w]
    assert len(m.data_pool) == n_good and m.data_pool.dropped == m.last_dropped == m.synthesis_batch_size
    assert torch.isfinite(m.sample()).all()


@pytest.mark.parametrize("cls", [FastMetaSynthesizer, FastSynthesizer, NAYER])
def test_injected_nan_loss_on_the_graph_path_never_enters_the_pool(cls):
    """The captured step's generic best tracking (first=None) keeps a NaN cost, so the pool
    refuses those images on the graph path too (run here through CudaGraphStep on the CPU)."""
    m = force_graph_mode(make(cls, seed=6, fuse_teacher=False))
    m.synthesize()
    n_good = len(m.data_pool)
    _poison(m, "loss")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m.synthesize()
    assert len([x for x in w if "did not enter the pool" in str(x.message)]) == 1
    assert len(m.data_pool) == n_good and m.last_dropped == m.synthesis_batch_size
    assert torch.isfinite(m.sample()).all()


# ------------------------------------------------------------ CUDA graphs (real capture)
@pytest.mark.needs_cuda
@pytest.mark.parametrize("cls", [FastMetaSynthesizer, FastSynthesizer, NAYER])
@pytest.mark.parametrize("seed", [11, None])
def test_cuda_graph_equals_eager_with_seed_and_augmentation(cls, seed):
    def check(m):
        assert all(g.graph is not None for g in m._graphs.values())

    build = lambda graph: make(cls, device="cuda", seed=seed, augment=True, cuda_graph=graph)  # noqa: E731
    for a, b in _eager_then_graph_rounds(build, 3, check):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("name", list(CHANGES))
@pytest.mark.parametrize("cls", [FastMetaSynthesizer, NAYER])
def test_cuda_graph_follows_settings_changed_between_rounds(cls, name):
    res = []
    for graph in (False, True):
        m = make(cls, device="cuda", seed=2, augment=True, cuda_graph=graph)
        outs = []
        for r in range(3):
            if r == 1:
                CHANGES[name](m)
            outs.append(images(m.synthesize()))
        res.append(outs)
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


@pytest.mark.needs_cuda
def test_cuda_graph_meta_grads_set_to_none_between_rounds():
    res = []
    for graph in (False, True):
        m = make(FastMetaSynthesizer, device="cuda", seed=4, cuda_graph=graph)
        for _ in range(3):
            m.meta_optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()  # freed grads would be handed out again at once
            m.synthesize()
        res.append([p.detach().clone() for p in m.generator.parameters()])
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


@pytest.mark.needs_cuda
def test_cuda_graph_pools_are_freed_on_replace_and_close():
    import gc

    m = make(FastSynthesizer, device="cuda", seed=1, cuda_graph=True, synthesis_batch_size=64)
    m.synthesize()
    gc.collect()
    torch.cuda.empty_cache()
    one = torch.cuda.memory_reserved()
    for k in range(4):  # four replaced graphs: the reserved memory does not grow with them
        m.bn = 1.0 + k
        m.synthesize()
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() <= one + 2**20
    m.close()
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() < one


@pytest.mark.needs_cuda
def test_cuda_graph_capture_while_the_pool_writer_is_busy(tmp_path):
    m = make(FastSynthesizer, device="cuda", seed=1, cuda_graph=True, save_images=True, save_dir=str(tmp_path))
    for _ in range(20):  # a queue of device batches the writer copies to the host meanwhile
        m.data_pool.add(torch.rand(256, 3, IMG, IMG, device="cuda"))
    out = images(m.synthesize())
    assert torch.isfinite(out).all()
    m.data_pool.flush()
    assert len(list(tmp_path.glob("shard_*.npy"))) == 21


@pytest.mark.needs_cuda
@pytest.mark.parametrize("cls", [FastMetaSynthesizer, NAYER])
def test_cuda_graph_nan_batch_never_enters_the_pool(cls):
    m = make(cls, device="cuda", seed=6, cuda_graph=True, fuse_teacher=False)
    m.synthesize()
    n_good = len(m.data_pool)
    _poison(m, "loss")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m.synthesize()  # no host sync: the drop is reported when its count has arrived ...
        assert torch.isfinite(m.sample()).all()  # ... and the student never sees it meanwhile
        assert len(m.data_pool) == n_good
        m.close()  # ... at the latest here
    assert len([x for x in w if "did not enter the pool" in str(x.message)]) == 1
    assert m.data_pool.dropped == m.synthesis_batch_size  # one round of one loop


class _NotYet:
    """A CUDA event stand-in whose copy has not arrived (the host must not wait for it)."""

    def query(self):
        return False

    def synchronize(self):
        pass


def _hold_counts(p):
    """Make the pool's counts look in flight, as on a busy GPU."""
    p._unresolved = [(h, _NotYet(), b) for h, _, b in p._unresolved]


@pytest.mark.parametrize("with_init", [False, True])
def test_pool_sampling_before_the_counts_arrive_returns_only_kept_images(with_init):
    """While the host does not know how many rows a batch kept, sample() maps the upper-bound
    indices onto kept (and init) images on the device: never a dropped row, no host read."""
    p = DataPool(device="cpu")
    good = torch.arange(1, 5, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    p.add(good)
    x = torch.full((4, 1, 2, 2), 200 / 255)
    x[1, 0, 0, 0] = float("nan")
    x[3, 0, 1, 1] = float("inf")
    p.add(x)
    if with_init:
        p.set_init(torch.full((2, 1, 2, 2), 7, dtype=torch.uint8))
    _hold_counts(p)
    allowed = {1, 2, 3, 4, 200} | ({7} if with_init else set())
    with _Syncs() as s:
        got = [p.sample(5) for _ in range(40)]
    assert s.n == 0 and p._n == 8  # the host still has the upper bound
    vals = {round(v * 255) for g in got for v in g[:, 0, 0, 0].tolist()}
    assert vals <= allowed and 200 in vals and 1 in vals, vals
    assert all(torch.equal(g, g[:, :, :1, :1].expand_as(g)) for g in got)  # whole kept images
    assert len(p) == 6 and p.take_dropped() == 2


class _Arrived(_NotYet):
    def query(self):
        return True


@pytest.mark.parametrize("with_init", [False, True])
def test_pool_sampling_while_the_counts_arrive_between_draws(with_init):
    """Counts that arrive between two draws of one permutation shrink the index range: the
    permutation drawn over the upper bound is dropped, no index past the kept images is used."""
    p = DataPool(device="cpu")
    x = torch.full((8, 1, 2, 2), 100 / 255)
    x[1:7, 0, 0, 0] = float("nan")
    p.add(x)
    if with_init:
        p.set_init(torch.full((1, 1, 2, 2), 7, dtype=torch.uint8))
    _hold_counts(p)
    first = p.sample(3)
    p._unresolved = [(h, _Arrived(), b) for h, _, b in p._unresolved]
    rest = p.sample(8)
    allowed = {100} | ({7} if with_init else set())
    for got in (first, rest):
        assert {round(v * 255) for v in got.flatten().tolist()} <= allowed
    assert rest.shape[0] == 2 + with_init and p.take_dropped() == 6


def _pool_reference(adds, cap):
    """The kept images of a FIFO pool fed only the finite rows of each batch (host model)."""
    data, ptr = [], 0
    for batch in adds:
        rows = [int(r[0, 0, 0] * 255) for r in batch if torch.isfinite(r).all()]
        free = min(len(rows), cap - len(data))
        data += rows[:free]
        for v in rows[free:][-cap:]:  # more new rows than the pool holds: the newest
            data[ptr] = v
            ptr = (ptr + 1) % cap
    return sorted(data)


def test_pool_capacity_fifo_with_dropped_rows_matches_a_pool_fed_only_finite_rows():
    gen = torch.Generator().manual_seed(0)
    p = DataPool(capacity=7, eviction="fifo", device="cpu")
    adds = []
    for b in [3, 5, 2, 9, 4, 1, 6, 16, 2]:
        x = (torch.randint(1, 250, (b, 1, 1, 1), generator=gen).float() / 255).expand(b, 1, 2, 2).clone()
        x[torch.rand(b, generator=gen) < 0.3, 0, 0, 0] = float("nan")
        adds.append(x)
        p.add(x)
        _hold_counts(p)
    assert sorted(p.images()[:, 0, 0, 0].tolist()) == _pool_reference(adds, 7)


def test_pool_writer_saves_only_kept_rows(tmp_path):
    import numpy as np

    p = DataPool(device="cpu", save_dir=str(tmp_path))
    x = torch.rand(4, 3, 2, 2)
    x[2, 1, 0, 0] = float("nan")
    p.add(x)
    p.add(torch.rand(3, 3, 2, 2), valid=torch.tensor(False))  # nothing kept: no file
    p.flush()
    files = sorted(tmp_path.glob("shard_*.npy"))
    assert len(files) == 1
    from fastsynth.synthesis.png import to_uint8

    np.testing.assert_array_equal(np.load(files[0]), to_uint8(x[[0, 1, 3]]).numpy())
    p.close()


# ------------------------------------------------------------ generative synthesizers (DAFL/ZSKT/DFQ/DFAD)
def make_generative(device="cpu", **kw):
    from test_generative import IMG as GIMG
    from test_generative import gen
    from test_synthesis import tiny_net

    from fastsynth.synthesis import GenerativeSynthesizer

    t, s = tiny_net(6, seed=1).to(device), tiny_net(4, seed=2).to(device)
    base = dict(iterations=3, synthesis_batch_size=6, adv=1.0, bn=1.0, oh=1.0, act=0.1, balance=5.0,
                normalizer=Normalizer(*NORM), seed=3, device=device)
    base.update(kw)
    return GenerativeSynthesizer(t, s, gen(8, True).to(device), 8, (3, GIMG, GIMG), **base)


GEN_CHANGES = {
    "bn": lambda m: setattr(m, "bn", 3.0),
    "act": lambda m: setattr(m, "act", 0.0),
    "balance": lambda m: setattr(m, "balance", 0.5),
    "adv": lambda m: setattr(m, "adv", 2.5),
    "lr": lambda m: m.optimizer.param_groups[0].update(lr=0.3),
}


def _gen_rounds(m, change):
    outs = []
    for r in range(3):
        if r == 1:
            change(m)
        outs.append(m.synthesize()[0]["synthetic"].clone())
    return outs


@pytest.mark.parametrize("name", list(GEN_CHANGES))
def test_generative_graph_is_replaced_when_a_setting_changes(name, monkeypatch):
    """GenerativeSynthesizer's captured step is keyed on its coefficients (act and balance
    included) and its optimizer's settings: a change between rounds closes the graph and
    captures a new one; the results follow the change as eager steps do."""
    real_close = CudaGraphStep.close
    closed = []
    monkeypatch.setattr(CudaGraphStep, "close", lambda self: (closed.append(self), real_close(self)))
    eager = _gen_rounds(make_generative(), GEN_CHANGES[name])
    unchanged = _gen_rounds(make_generative(), lambda m: None)
    m = make_generative()
    m._graph_mode = True  # the graph code path; CudaGraphStep runs the step eagerly on the CPU
    graph = _gen_rounds(m, GEN_CHANGES[name])
    assert len(closed) == 1 and len(m._graphs) == 1 and closed[0] not in m._graphs.values()
    for a, b in zip(eager, graph):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager[0], unchanged[0])
    assert not torch.allclose(eager[2], unchanged[2])


@pytest.mark.needs_cuda
@pytest.mark.parametrize("name", list(GEN_CHANGES))
def test_cuda_graph_generative_follows_settings_changed_between_rounds(name):
    res = [_gen_rounds(make_generative("cuda", cuda_graph=g), GEN_CHANGES[name]) for g in (False, True)]
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def test_backward_gives_gradients_their_parameters_strides():
    """torch's fused Adam pairs parameter and gradient elements by memory position: a
    channels_last gradient of a contiguous weight (autograd.grad returns what the op produced)
    must be given the weight's strides before the step, or the wrong elements are updated."""
    from fastsynth.synthesis.core import SynthCore, make_adam

    torch.manual_seed(0)
    w_cl = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    p_fast = torch.randn(8, 4, 3, 3, requires_grad=True)
    p_ref = p_fast.detach().clone().requires_grad_()
    opt = make_adam([p_fast], lr=0.1, betas=(0.9, 0.999), device="cpu")
    grads = SynthCore._backward((p_fast * w_cl).sum(), opt)
    assert p_fast.grad.stride() == p_fast.stride() and grads[0] is p_fast.grad
    opt.step()
    ref_opt = torch.optim.Adam([p_ref], lr=0.1, foreach=False)
    (p_ref * w_cl).sum().backward()
    ref_opt.step()
    torch.testing.assert_close(p_fast.detach(), p_ref.detach(), rtol=0, atol=1e-6)


# ------------------------------------------------------------ one inner-step driver
def _make_imagenet():
    from test_fast_meta_imagenet import NZ, gen as imagenet_gen
    from test_fast_meta_imagenet import IMG as IIMG
    from test_synthesis import tiny_net

    from fastsynth.synthesis.fast_meta_imagenet import FastMetaSynthesizerForImageNet

    t, s = tiny_net(6, seed=1), tiny_net(4, seed=2)
    return FastMetaSynthesizerForImageNet(t, s, imagenet_gen(), NZ, 10, (3, IIMG, IIMG), iterations=3,
                                          synthesis_batch_size=4, normalizer=Normalizer(*NORM), seed=1)


DRIVEN = {"fast_meta": lambda: make(FastMetaSynthesizer, seed=1), "fast": lambda: make(FastSynthesizer, seed=1),
          "nayer": lambda: make(NAYER, seed=1), "deepinv": lambda: make(DeepInvSyntheiszer, seed=1),
          "generative": lambda: make_generative(), "fast_meta_imagenet": _make_imagenet}


@pytest.mark.parametrize("name", sorted(DRIVEN))
@pytest.mark.parametrize("graph", [False, True])
def test_every_inner_loop_runs_through_the_one_driver(name, graph, monkeypatch):
    """Every synthesizer's inner steps go through SynthCore._run_steps (eager, or on the graph
    code path, which CudaGraphStep runs eagerly on the CPU): as many steps as asked, and a
    captured step only where the synthesizer captures one (DeepInversion never does)."""
    from fastsynth.synthesis.core import SynthCore

    calls = []
    real = SynthCore._run_steps

    def counting(self, n, step, *args, **kw):
        ran = []
        calls.append((n, ran))
        return real(self, n, lambda it: (ran.append(it), step(it))[1], *args, **kw)

    monkeypatch.setattr(SynthCore, "_run_steps", counting)
    m = DRIVEN[name]()
    captures = graph and name != "deepinv"
    if captures:
        m._graph_mode = True
    m.synthesize()
    assert calls, f"{name}: synthesize() did not use SynthCore._run_steps"
    for n, ran in calls:
        # a first capture also runs CudaGraphStep's warm-up steps (undone afterwards)
        warm = CudaGraphStep(lambda: None, list, device="cpu").warmup if captures else 0
        assert n > 0 and ran == ([None] * (n + warm) if captures else list(range(n)))
    assert bool(m._graphs) == captures
    if captures:
        assert all(isinstance(g, CudaGraphStep) for g in m._graphs.values())


def test_driver_needs_the_optimizer_of_a_captured_step():
    m = make(FastSynthesizer, seed=1)
    m._graph_mode = True
    with pytest.raises(ValueError, match="optimizer"):
        m._run_steps(1, lambda it: None, key="k")
