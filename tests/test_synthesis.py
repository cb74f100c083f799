"""Synthesizers: drop-in API, semantics against eager reference loops, no waste, pool, augmentation."""
from __future__ import annotations

import copy
import inspect
import os
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastsynth.synthesis import (NAYER, BaseSynthesis, DataPool, DeepInversionSynthesizer, DeepInvSyntheiszer,
                                 FastMetaSynthesizer, FastSynthesizer, NayerSynthesizer, Normalizer, crop_flip,
                                 jitter_flip)
from fastsynth.nn import Generator, NLGenerator
from fastsynth.synthesis.png import encode_png

from fastsynth.bench.reference_loops import RefDeepInv, RefFast, RefNayer, max_rel_err

IMG = 8
NORM = ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(width=6, num_classes=10, seed=0):
    return randomise_(nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes)), seed)


def randomise_(net, seed=0):
    """In place: parameters N(0, 0.5^2), BatchNorm running means N(0, 0.3^2) and variances
    U(0.5, 1.5), drawn from ``seed``; returns the net in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def pair():
    return tiny_net(6, seed=1), tiny_net(4, seed=2)


def fast_gen(nz=8):
    torch.manual_seed(3)
    return Generator(nz=nz, ngf=4, img_size=IMG, nc=3)


def nl_gen(batch=13, le_size=6):
    torch.manual_seed(4)
    le = torch.randn(10, le_size)
    return NLGenerator(ngf=4, img_size=IMG, nc=3, nl=10, label_emb=le, le_emb_size=8, le_size=le_size,
                                 sbz=batch)


# ------------------------------------------------------------------------------------------ API
SPEC = {
    FastMetaSynthesizer: "teacher student generator nz num_classes img_size init_dataset=None iterations=100 lr_g=0.1 "
                         "synthesis_batch_size=128 sample_batch_size=128 adv=0.0 bn=1 oh=1 save_dir='run/fast' "
                         "transform=None autocast=None use_fp16=False normalizer=None device='cpu' distributed=False "
                         "lr_z=0.01 warmup=10 reset_l0=0 reset_bn=0 bn_mmt=0 is_maml=1",
    NAYER: "teacher student generator num_classes img_size init_dataset=None g_steps=100 lr_g=0.1 "
           "synthesis_batch_size=128 sample_batch_size=128 adv=0.0 bn=1 oh=1 save_dir='run/fast' transform=None "
           "autocast=None use_fp16=False normalizer=None device='cpu' distributed=False warmup=10 bn_mmt=0 bnt=30 "
           "oht=1.5 cr_loop=1 g_life=50 g_loops=1 gwp_loops=10 dataset='cifar10'",
    DeepInvSyntheiszer: "teacher student num_classes img_size iterations=1000 lr_g=0.1 progressive_scale=False "
                        "synthesis_batch_size=128 sample_batch_size=128 adv=0.0 bn=1 oh=1 tv=1e-05 l2=0.0 "
                        "save_dir='run/deepinversion' transform=None normalizer=None device='cpu'",
}
SPEC[FastSynthesizer] = SPEC[FastMetaSynthesizer]


@pytest.mark.parametrize("cls", list(SPEC), ids=lambda c: c.__name__)
def test_constructor_matches_upstream(cls):
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    expected = SPEC[cls].split()
    got = []
    for p in params[:len(expected)]:
        got.append(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}")
    assert got == expected
    # fastsynth's own keywords are keyword-only, after the upstream ones
    for p in params[len(expected):]:
        assert p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        if p.kind == p.POSITIONAL_OR_KEYWORD:  # DeepInv's trailing upstream extras
            assert p.name in ("autocast", "use_fp16", "distributed")
    assert issubclass(cls, BaseSynthesis)


def test_aliases():
    assert NayerSynthesizer is NAYER
    assert DeepInversionSynthesizer is DeepInvSyntheiszer


def test_return_tuples_and_sample():
    t, s = pair()
    norm = Normalizer(*NORM)
    fm = FastMetaSynthesizer(t, s, fast_gen(), 8, 10, (3, IMG, IMG), iterations=2, synthesis_batch_size=12,
                             sample_batch_size=5, adv=1.0, normalizer=norm, warmup=0, bn_mmt=0.9)
    out, sec = fm.synthesize()
    assert set(out) == {"synthetic"} and out["synthetic"].shape == (12, 3, IMG, IMG)
    assert 0 <= float(out["synthetic"].min()) and float(out["synthetic"].max()) <= 1 and isinstance(sec, float)
    assert fm.sample().shape == (5, 3, IMG, IMG)
    ny = NAYER(t, s, nl_gen(13), 10, (3, IMG, IMG), g_steps=2, synthesis_batch_size=13, sample_batch_size=7,
               adv=1.0, normalizer=norm, warmup=1, gwp_loops=2, g_loops=1)
    vis, sec, best_cost, best_oh = ny.synthesize()
    assert isinstance(vis["synthetic"], list) and len(vis["synthetic"]) == 2
    assert isinstance(best_cost, float) and torch.is_tensor(best_oh) and isinstance(sec, float)
    assert ny.sample().shape == (7, 3, IMG, IMG)
    ny0 = NAYER(t, s, nl_gen(13), 10, (3, IMG, IMG), g_steps=1, synthesis_batch_size=13, warmup=1, gwp_loops=0)
    assert ny0.synthesize() == (None, 0, 0, 0)
    di = DeepInvSyntheiszer(t, s, 10, (3, IMG, IMG), iterations=2, synthesis_batch_size=6, sample_batch_size=4,
                            adv=0.5, normalizer=norm)
    out, sec = di.synthesize()
    assert out["synthetic"].shape == (6, 3, IMG, IMG)
    assert di.sample().shape == (4, 3, IMG, IMG)


def test_normalizer_matches_upstream_formula():
    x = torch.rand(3, 3, 4, 4)
    n = Normalizer(*NORM)
    mean = torch.tensor(NORM[0]).view(1, 3, 1, 1)
    std = torch.tensor(NORM[1]).view(1, 3, 1, 1)
    torch.testing.assert_close(n(x), (x - mean) / std)
    torch.testing.assert_close(n(n(x), reverse=True), x)


# ------------------------------------------------------------------------------ no waste
class SyncCounter(TorchDispatchMode):
    """Counts ops that read a tensor value on the host (.item(), float(), bool(), equal)."""

    SYNC = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal")

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNC:
            self.n += 1
        return func(*args, **(kwargs or {}))


def host_syncs(*calls) -> int:
    """Host reads of device values (SyncCounter) while ``calls`` run in turn."""
    with SyncCounter() as c:
        for call in calls:
            call()
    return c.n


def test_no_grads_and_no_host_syncs():
    t, s = pair()
    for p in list(t.parameters()) + list(s.parameters()):
        p.requires_grad_(True)
    s.train()
    norm = Normalizer(*NORM)
    fm = FastMetaSynthesizer(t, s, fast_gen(), 8, 10, (3, IMG, IMG), iterations=3, synthesis_batch_size=12,
                             adv=1.0, normalizer=norm, warmup=0, bn_mmt=0.9)
    ny = NAYER(t, s, nl_gen(13), 10, (3, IMG, IMG), g_steps=3, synthesis_batch_size=13, adv=1.0,
               normalizer=norm, warmup=0, bn_mmt=0.9, g_loops=2)
    fm.synthesize()  # first round creates lazy state
    assert host_syncs(fm.synthesize, fm.sample) == 0, \
        "FastMetaSynthesizer.synthesize/sample read device values on the host"
    ny.synthesize()
    assert host_syncs(ny.synthesize, ny.sample) == 1, "NAYER must read only its final best_cost on the host"
    for p in list(t.parameters()) + list(s.parameters()):
        assert p.grad is None
        assert p.requires_grad  # restored
    assert s.training  # restored mode


def test_bn_capture_only_during_synthesis():
    t, s = pair()
    fm = FastMetaSynthesizer(t, s, fast_gen(), 8, 10, (3, IMG, IMG), iterations=1, synthesis_batch_size=8,
                             normalizer=Normalizer(*NORM))
    fm.synthesize()
    # outside synthesize(): no hooks on the teacher, so its forwards (student training) cost nothing extra
    assert all(len(m._forward_hooks) == 0 for m in t.modules())
    t(torch.randn(4, 3, IMG, IMG))
    assert fm.capture._features == []


# ------------------------------------------------------------------------------ equivalence
def _run_pair(ref, ours, rounds, seed=7):
    torch.manual_seed(seed)
    ref_out = [ref.synthesize() for _ in range(rounds)]
    torch.manual_seed(seed)
    ours.log_losses = True
    our_out = [ours.synthesize() for _ in range(rounds)]
    our_losses = torch.stack(ours.loss_log).tolist()
    return ref_out, our_out, our_losses


FAST_CASES = {
    "maml": dict(meta=True, is_maml=1, warmup=2, bn_mmt=0.9, reset_l0=0),
    "reptile": dict(meta=True, is_maml=0, warmup=1, bn_mmt=0.0, reset_l0=0),
    "reset_l0": dict(meta=True, is_maml=1, warmup=-117, bn_mmt=0.9, reset_l0=1),  # reset at ep == 3
    "fast": dict(meta=False, is_maml=1, warmup=2, bn_mmt=0.9, reset_l0=0),
}


@pytest.mark.parametrize("case", list(FAST_CASES))
def test_fast_matches_reference_loop(case):
    cfg = FAST_CASES[case]
    t, s = pair()
    g = fast_gen()
    norm = Normalizer(*NORM)
    kw = dict(iterations=3, lr_g=5e-3, lr_z=0.015, adv=1.33, bn=10.0, oh=0.5)
    ref = RefFast(copy.deepcopy(t), copy.deepcopy(s), copy.deepcopy(g), 8, 10, kw["iterations"], kw["lr_g"],
                  kw["lr_z"], 12, kw["adv"], kw["bn"], kw["oh"], norm, cfg["warmup"], cfg["reset_l0"],
                  cfg["bn_mmt"], cfg["is_maml"], meta=cfg["meta"])
    cls = FastMetaSynthesizer if cfg["meta"] else FastSynthesizer
    ours = cls(t, s, g, 8, 10, (3, IMG, IMG), synthesis_batch_size=12, normalizer=norm, warmup=cfg["warmup"],
               bn_mmt=cfg["bn_mmt"], is_maml=cfg["is_maml"], reset_l0=cfg["reset_l0"], augment=False, **kw)
    ref_out, our_out, our_losses = _run_pair(ref, ours, rounds=4)
    assert len(our_losses) == len(ref.losses) == 12
    assert max_rel_err(our_losses, ref.losses) < 2e-4
    for r, (o, _) in zip(ref_out, our_out):
        torch.testing.assert_close(o["synthetic"], r, rtol=1e-3, atol=1e-4)
    for p, q in zip(ours.generator.parameters(), ref.generator.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)


def test_nayer_matches_reference_loop():
    t, s = pair()
    g = nl_gen(13)
    norm = Normalizer(*NORM)
    kw = dict(g_steps=3, lr_g=4e-3, adv=1.33, bn=10.0, oh=0.5, warmup=2, bn_mmt=0.9, g_life=2, g_loops=2,
              gwp_loops=3)
    ref = RefNayer(copy.deepcopy(t), copy.deepcopy(s), copy.deepcopy(g), 10, kw["g_steps"], kw["lr_g"], 13,
                   kw["adv"], kw["bn"], kw["oh"], norm, kw["warmup"], kw["bn_mmt"], kw["g_life"], kw["g_loops"],
                   kw["gwp_loops"])
    ours = NAYER(t, s, g, 10, (3, IMG, IMG), synthesis_batch_size=13, normalizer=norm, augment=False, **kw)
    ref_out, our_out, our_losses = _run_pair(ref, ours, rounds=4)
    # loops: ep 0,1 warmup (3 each), ep 2,3 (2 each) -> 10 loops of 3 steps
    assert len(our_losses) == len(ref.losses) == 30
    assert max_rel_err(our_losses, ref.losses) < 2e-4
    for r, o in zip(ref_out, our_out):
        assert len(o[0]["synthetic"]) == len(r[0]["synthetic"])
        for a, b in zip(o[0]["synthetic"], r[0]["synthetic"]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
        assert abs(o[2] - r[2]) <= 2e-4 * abs(r[2])
        torch.testing.assert_close(o[3], r[3].detach(), rtol=2e-4, atol=1e-6)


def test_deepinversion_matches_reference_loop():
    t, s = pair()
    norm = Normalizer(*NORM)
    kw = dict(iterations=4, lr_g=0.1, adv=0.5, bn=1.0, oh=1.0, tv=1e-3, l2=1e-4)
    ref = RefDeepInv(copy.deepcopy(t), copy.deepcopy(s), 10, (3, IMG, IMG), kw["iterations"], kw["lr_g"], 6,
                     kw["adv"], kw["bn"], kw["oh"], kw["tv"], kw["l2"], norm)
    ours = DeepInvSyntheiszer(t, s, 10, (3, IMG, IMG), synthesis_batch_size=6, normalizer=norm, augment=False, **kw)
    ref_out, our_out, our_losses = _run_pair(ref, ours, rounds=2)
    assert max_rel_err(our_losses, ref.losses) < 2e-4
    for r, (o, _) in zip(ref_out, our_out):
        torch.testing.assert_close(o["synthetic"], r, rtol=1e-3, atol=1e-4)


DEEPINV_IMAGENET = {
    "first_bn": dict(first_bn_multiplier=10.0),
    "priors": dict(tv_l2=2e-3, l2_scale=3e-2),
    "lowres": dict(lowres_iterations=3),
    "adi": dict(adi_scale=0.7),
    "all": dict(first_bn_multiplier=10.0, tv_l2=2e-3, l2_scale=3e-2, lowres_iterations=2, adi_scale=0.7),
}


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("case", list(DEEPINV_IMAGENET))
def test_deepinversion_imagenet_options_match_reference_loop(case, fuse):
    """NVlabs' ImageNet options (first BN layer weight, TV-L2 and per-image L2 priors,
    multi-resolution warm-up, ADI competition) against the eager NVlabs-style loop; each option
    changes the losses (so the comparison could fail)."""
    t, s = pair()
    norm = Normalizer(*NORM)
    kw = dict(iterations=5, lr_g=0.1, adv=0.5, bn=1.0, oh=1.0, tv=1e-3, l2=1e-4)
    extra = DEEPINV_IMAGENET[case]
    ref = RefDeepInv(copy.deepcopy(t), copy.deepcopy(s), 10, (3, IMG, IMG), kw["iterations"], kw["lr_g"], 6,
                     kw["adv"], kw["bn"], kw["oh"], kw["tv"], kw["l2"], norm, **extra)
    ours = DeepInvSyntheiszer(copy.deepcopy(t), copy.deepcopy(s), 10, (3, IMG, IMG), synthesis_batch_size=6,
                              normalizer=norm, augment=False, fuse_teacher=fuse, **kw, **extra)
    ref_out, our_out, our_losses = _run_pair(ref, ours, rounds=2)
    assert max_rel_err(our_losses, ref.losses) < 2e-4
    for r, (o, _) in zip(ref_out, our_out):
        torch.testing.assert_close(o["synthetic"], r, rtol=1e-3, atol=1e-4)
    plain = DeepInvSyntheiszer(t, s, 10, (3, IMG, IMG), synthesis_batch_size=6, normalizer=norm, augment=False,
                               fuse_teacher=fuse, **kw)
    torch.manual_seed(7)
    plain.log_losses = True
    for _ in range(2):
        plain.synthesize()
    assert max_rel_err(our_losses, torch.stack(plain.loss_log).tolist()) > 1e-3


def test_deepinversion_imagenet_options_with_jitter_and_compile():
    """With the default jitter, the warm-up jitters the pooled images (codes drawn for the
    pooled size) and compile=True sees the same random numbers as eager."""
    t, s = pair()
    kw = dict(iterations=4, synthesis_batch_size=6, normalizer=Normalizer(*NORM), adv=0.5, seed=3,
              first_bn_multiplier=10.0, tv_l2=1e-3, l2_scale=1e-2, lowres_iterations=2, adi_scale=0.5)
    runs = []
    for comp in (False, {"backend": "aot_eager"}):
        torch._dynamo.reset()
        m = DeepInvSyntheiszer(copy.deepcopy(t), copy.deepcopy(s), 10, (3, IMG, IMG), compile=comp, **kw)
        m.log_losses = True
        out = m.synthesize()[0]["synthetic"]
        runs.append((out, torch.stack(m.loss_log)))
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, err", [
    (dict(lowres_iterations=5), ValueError), (dict(lowres_iterations=-1), ValueError),
    (dict(lowres_iterations=1.5), ValueError), (dict(first_bn_multiplier=float("nan")), TypeError),
    (dict(adi_scale="1"), TypeError), (dict(tv_l2=None), TypeError),
])
def test_deepinversion_imagenet_options_are_checked(bad, err):
    t, s = pair()
    name = next(iter(bad))
    with pytest.raises(err, match=name):
        DeepInvSyntheiszer(t, s, 10, (3, IMG, IMG), iterations=4, **bad)


# ------------------------------------------------------------------------------ augmentation
def test_crop_flip_is_a_padded_crop_or_its_mirror():
    torch.manual_seed(0)
    B, C, H, W, p = 64, 2, 5, 6, 2
    x = torch.rand(B, C, H, W) + 0.1  # no zeros, so padding is recognisable
    out = crop_flip(x, padding=p)
    assert out.shape == x.shape and out.is_contiguous()
    xp = torch.nn.functional.pad(x, (p, p, p, p))
    seen = set()
    for b in range(B):
        hits = [(oy, ox, f) for oy in range(2 * p + 1) for ox in range(2 * p + 1) for f in (0, 1)
                if torch.equal(out[b], (xp[b, :, oy:oy + H, ox:ox + W].flip(-1) if f else xp[b, :, oy:oy + H, ox:ox + W]))]
        assert hits, f"sample {b} is not a crop of its padded input"
        seen.update(hits)
    assert len({h[2] for h in seen}) == 2 and len({h[0] for h in seen}) > 2  # both flips, several offsets
    # gradient flows to the input (the crop is a gather)
    xg = x.clone().requires_grad_()
    crop_flip(xg, padding=p).sum().backward()
    assert xg.grad is not None and float(xg.grad.sum()) > 0


def test_crop_flip_disabled_paths():
    x = torch.rand(3, 1, 4, 4)
    assert crop_flip(x, padding=0, flip=False) is x
    y = crop_flip(x, padding=0, flip=True)
    for b in range(3):
        assert torch.equal(y[b], x[b]) or torch.equal(y[b], x[b].flip(-1))


def test_jitter_flip_matches_roll():
    torch.manual_seed(1)
    x = torch.rand(2, 3, 8, 8)
    out = jitter_flip(x)
    cands = [torch.roll(x, (a, b), (2, 3)) for a in range(-1, 2) for b in range(-1, 2)]
    cands += [c.flip(3) for c in cands]
    assert any(torch.equal(out, c) for c in cands)


# ------------------------------------------------------------------------------ pool
def test_pool_uniform_without_replacement():
    pool = DataPool()
    imgs = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    pool.add(imgs)
    idx = torch.cat([pool.sample_indices(5) for _ in range(2)])
    assert sorted(idx.tolist()) == list(range(10))  # one pass covers everything once
    assert pool.sample(20).shape[0] == 10  # at most all kept images (like the upstream loader)
    counts = torch.zeros(10)
    for _ in range(300):
        counts += torch.bincount(pool.sample_indices(3), minlength=10)
    assert counts.min() > 0.7 * counts.mean()  # uniform


@pytest.mark.parametrize("eviction", ["fifo", "random", None])
def test_pool_capacity(eviction):
    pool = DataPool(capacity=6, eviction=eviction)
    for k in range(4):
        pool.add(torch.full((3, 1, 2, 2), 10 * (k + 1), dtype=torch.uint8))
    assert len(pool) == 6 and pool.seen == 12
    vals = sorted(pool.images()[:, 0, 0, 0].tolist())
    if eviction == "fifo":
        assert vals == [30, 30, 30, 40, 40, 40]
    elif eviction is None:
        assert vals == [10, 10, 10, 20, 20, 20]
    else:
        assert vals.count(40) == 3 or 40 in vals


def test_pool_quantises_like_png_roundtrip():
    pool = DataPool()
    x = torch.rand(4, 3, 5, 5)
    pool.add(x)
    got = pool.sample(4)
    ref = (x.clamp(0, 1) * 255).to(torch.uint8).float() / 255
    assert sorted(got.sum((1, 2, 3)).tolist()) == pytest.approx(sorted(ref.sum((1, 2, 3)).tolist()))


def test_pool_background_saving(tmp_path):
    pool = DataPool(save_dir=str(tmp_path / "shards"), save_format="shard")
    x = torch.rand(4, 3, 5, 5)
    pool.add(x)
    pool.add(x)
    pool.flush()
    files = sorted(os.listdir(tmp_path / "shards"))
    assert files == ["shard_000000.npy", "shard_000001.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "shards" / files[0]), (x * 255).to(torch.uint8).numpy())
    pool.close()
    pp = DataPool(save_dir=str(tmp_path / "png"), save_format="png")
    pp.add(x[:2])
    pp.close()
    assert sorted(os.listdir(tmp_path / "png")) == ["0-0.png", "0-1.png"]


def test_png_encoder_roundtrip():
    img = (np.arange(4 * 5 * 3) % 256).astype(np.uint8).reshape(4, 5, 3)
    data = encode_png(img)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # parse IDAT back
    pos, idat = 8, b""
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        tag = data[pos + 4:pos + 8]
        if tag == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(4, 1 + 5 * 3)
    assert (raw[:, 0] == 0).all()
    np.testing.assert_array_equal(raw[:, 1:].reshape(4, 5, 3), img)


# ------------------------------------------------------------------------------ modes
def test_bf16_autocast_on_cpu_runs():
    t, s = pair()
    fm = FastMetaSynthesizer(t, s, fast_gen(), 8, 10, (3, IMG, IMG), iterations=2, synthesis_batch_size=8,
                             adv=1.0, normalizer=Normalizer(*NORM), warmup=0, use_fp16=True)
    out, _ = fm.synthesize()
    assert torch.isfinite(out["synthetic"]).all()


def test_cuda_graph_on_cpu_warns_and_runs_eagerly():
    t, s = pair()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        from fastsynth.synthesis import core

        core._WARNED.discard("cuda_graph_cpu")
        fm = FastMetaSynthesizer(t, s, fast_gen(), 8, 10, (3, IMG, IMG), iterations=2, synthesis_batch_size=8,
                                 normalizer=Normalizer(*NORM), cuda_graph=True)
    assert any("cuda_graph" in str(x.message) for x in w)
    assert fm.synthesize()[0]["synthetic"].shape == (8, 3, IMG, IMG)


@pytest.mark.parametrize("winograd_min_channels", [None, 1])
def test_compile_fullgraph_matches_eager(winograd_min_channels, monkeypatch):
    """The forward/loss of the inner step traces as ONE graph (fullgraph=True, no breaks); the
    aot_eager backend keeps the test fast (inductor code generation is what compile=True adds).
    With the Winograd threshold lowered the small models' 3x3 convolutions take that path, in
    the eager step and (weights prepared each round) in the compiled one."""
    from fastsynth import cpu

    prepared = []
    if winograd_min_channels is not None:
        real = cpu.prepare_winograd
        monkeypatch.setattr(cpu.config, "winograd_min_channels", winograd_min_channels)
        monkeypatch.setattr(cpu, "prepare_winograd", lambda m: prepared.append(real(m)))
    t, s = pair()
    g = fast_gen()
    norm = Normalizer(*NORM)
    kw = dict(iterations=2, synthesis_batch_size=8, adv=1.0, normalizer=norm, warmup=0, bn_mmt=0.9, augment=False)
    eager = FastMetaSynthesizer(copy.deepcopy(t), copy.deepcopy(s), copy.deepcopy(g), 8, 10, (3, IMG, IMG), **kw)
    comp = FastMetaSynthesizer(t, s, g, 8, 10, (3, IMG, IMG), compile={"backend": "aot_eager"}, **kw)
    for m in (eager, comp):
        m.log_losses = True
        torch.manual_seed(0)
        for _ in range(2):
            m.synthesize()
    a = torch.stack(eager.loss_log)
    b = torch.stack(comp.loss_log)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if winograd_min_channels is not None:  # teacher and student view, each of the two rounds
        assert len(prepared) == 4 and min(prepared) > 0, prepared


@pytest.mark.parametrize("compile_arg,expected", [
    (True, {"layout_optimization": False}),
    ({"options": {"layout_optimization": True, "max_autotune": False}},
     {"layout_optimization": True, "max_autotune": False}),
    ({"backend": "aot_eager"}, None),
    ({"mode": "reduce-overhead"}, None),
])
def test_cpu_compile_turns_inductor_layout_optimisation_off_unless_told(monkeypatch, compile_arg, expected):
    """On a CPU, compile=True asks inductor to keep the convolutions' NCHW layout (its
    channels_last switch is slower with oneDNN fp32 here); explicit options, another backend or a
    mode (which torch.compile does not combine with options) are passed through untouched."""
    seen = {}

    def fake_compile(fn, **kw):
        seen.update(kw)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    t, s = pair()
    syn = FastMetaSynthesizer(t, s, fast_gen(), 8, 10, (3, IMG, IMG), compile=compile_arg)
    fn = syn._compiled_fn("probe", lambda: 1)
    assert fn() == 1 and seen["fullgraph"] is True and seen["dynamic"] is False
    assert seen.get("options") == expected


# ------------------------------------------------------------------------------ GPU
@pytest.mark.needs_cuda
@pytest.mark.parametrize("cls", [FastMetaSynthesizer, FastSynthesizer])
def test_cuda_graph_matches_eager_fast(cls):
    t, s = pair()
    t, s = t.cuda(), s.cuda()
    g = fast_gen().cuda()
    norm = Normalizer(*NORM)
    kw = dict(iterations=3, synthesis_batch_size=12, adv=1.0, normalizer=norm, warmup=1, bn_mmt=0.9,
              augment=False, device="cuda")
    eager = cls(copy.deepcopy(t), copy.deepcopy(s), copy.deepcopy(g), 8, 10, (3, IMG, IMG), **kw)
    graph = cls(t, s, g, 8, 10, (3, IMG, IMG), cuda_graph=True, **kw)
    outs = []
    for m in (eager, graph):
        torch.manual_seed(0)
        outs.append([m.synthesize()[0]["synthetic"] for _ in range(3)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    for p, q in zip(eager.generator.parameters(), graph.generator.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)


@pytest.mark.needs_cuda
def test_cuda_graph_matches_eager_nayer():
    t, s = pair()
    t, s = t.cuda(), s.cuda()
    norm = Normalizer(*NORM)
    kw = dict(g_steps=3, synthesis_batch_size=13, adv=1.0, normalizer=norm, warmup=1, bn_mmt=0.9, g_life=3,
              g_loops=2, gwp_loops=2, augment=False, device="cuda")
    res = []
    for graph in (False, True):
        g = nl_gen(13)
        g.label_emb = g.label_emb.cuda()
        m = NAYER(copy.deepcopy(t), copy.deepcopy(s), g.cuda(), 10, (3, IMG, IMG), cuda_graph=graph, **kw)
        torch.manual_seed(0)
        res.append([m.synthesize() for _ in range(4)])
    for a, b in zip(*res):
        for x, y in zip(a[0]["synthetic"], b[0]["synthetic"]):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)


@pytest.mark.needs_cuda
def test_cuda_graph_replays_draw_fresh_augmentation():
    t, s = pair()
    m = FastSynthesizer(t.cuda(), s.cuda(), fast_gen().cuda(), 8, 10, (3, IMG, IMG), iterations=4,
                        synthesis_batch_size=8, normalizer=Normalizer(*NORM), device="cuda", cuda_graph=True)
    a = m.synthesize()[0]["synthetic"]
    b = m.synthesize()[0]["synthetic"]
    assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# sample(): the train transform, RandomResizedCrop included, for every pool-based synthesizer


class RandomResizedCrop:
    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio


class RandomCrop:
    def __init__(self, size, padding=None):
        self.size, self.padding = size, padding


class RandomHorizontalFlip:
    pass


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std


class ColorJitter:
    pass


class Compose:
    def __init__(self, ts):
        self.transforms = ts


def _pool_synthesizers(transform):
    t, s = pair()
    norm = Normalizer(*NORM)
    kw = dict(sample_batch_size=5, normalizer=norm, transform=transform, seed=7)
    return [
        FastMetaSynthesizer(t, s, fast_gen(), 8, 10, (3, IMG, IMG), iterations=1, synthesis_batch_size=4, **kw),
        FastSynthesizer(t, s, fast_gen(), 8, 10, (3, IMG, IMG), iterations=1, synthesis_batch_size=4, **kw),
        NAYER(t, s, nl_gen(13), 10, (3, IMG, IMG), g_steps=1, synthesis_batch_size=13, **kw),
        DeepInvSyntheiszer(t, s, 10, (3, IMG, IMG), iterations=1, synthesis_batch_size=4, **kw),
    ]


@pytest.mark.parametrize("index", range(4))
def test_sample_applies_random_resized_crop_of_the_transform(index, monkeypatch):
    """The ImageNet-style train transform: sample() resamples every pool image from its own box
    (RandomResizedCrop's size/scale/ratio), flips and normalises it, batched on the device."""
    from fastsynth.synthesis.resized_crop import ResizedCropAugment

    tf = Compose([RandomResizedCrop(6, scale=(0.3, 0.9), ratio=(0.5, 2.0)), RandomHorizontalFlip(),
                  Normalize(*NORM)])
    synth = _pool_synthesizers(tf)[index]
    aug = synth.sample_aug
    assert isinstance(aug, ResizedCropAugment), type(synth).__name__
    assert (aug.size, aug.scale, aug.ratio, aug.flip) == ((6, 6), (0.3, 0.9), (0.5, 2.0), True)
    pool_x = torch.rand(5, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(synth.data_pool, "sample", lambda n, generator=None: pool_x[:n])
    state = synth._rng.get_state()
    got = synth.sample()
    assert got.shape == (5, 3, 6, 6)
    # the same boxes drawn by hand: a box per image, then flip and Normalize
    g = torch.Generator().set_state(state)
    from fastsynth.synthesis.resized_crop import resized_crop_apply, resized_crop_theta

    theta = resized_crop_theta(torch.rand(5, 33, generator=g), (IMG, IMG), (0.3, 0.9), (0.5, 2.0), flip=True)
    want = Normalizer(*NORM)(resized_crop_apply(pool_x, theta, (6, 6)))
    torch.testing.assert_close(got, want)
    # not the identity: the images were resampled
    assert not torch.allclose(got, Normalizer(*NORM)(pool_x[:, :, 1:7, 1:7]))


@pytest.mark.parametrize("index", range(4))
def test_sample_applies_padded_crop_of_the_transform_and_warns_about_others(index):
    tf = Compose([RandomCrop(IMG, padding=2), ColorJitter(), Normalize(*NORM)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from fastsynth.synthesis import util

        util._WARNED.discard(("transform", "ColorJitter"))
        synth = _pool_synthesizers(tf)[index]
    aug = synth.sample_aug
    assert type(aug).__name__ == "Augment" and (aug.padding, aug.flip) == (2, False)
    assert any("ColorJitter" in str(w.message) for w in caught)


def test_profiled_steps_show_their_phases():
    """With ``_nvtx = "record"`` (what ``fastsynth profile`` sets on the CPU) every phase of the
    inner step is a torch.profiler range; by default the CPU step has no range ops at all."""
    t, s = pair()
    synth = FastMetaSynthesizer(t, s, fast_gen(), nz=8, num_classes=10, img_size=(3, 8, 8), iterations=2,
                                synthesis_batch_size=4, sample_batch_size=4, adv=1.0, warmup=0,
                                normalizer=Normalizer(*NORM), augment=True)
    assert synth._nvtx is False
    synth._nvtx = "record"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        synth.synthesize()
    names = {e.name for e in prof.events()}
    assert {"generator", "augment", "teacher", "losses", "student", "backward", "step"} <= names, names
