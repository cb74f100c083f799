"""GenerativeSynthesizer (DAFL / ZSKT / DFQ / DFAD), its criteria and generators, against the
eager upstream loop of fastsynth/bench/reference_loops.py."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsynth import losses
from fastsynth.nn import DCGAN_Generator, Generator, LargeGenerator
from fastsynth.synthesis import GENERATIVE_METHODS, BaseSynthesis, GenerativeSynthesizer, Normalizer

from fastsynth.bench.reference_loops import RefGenerative, ReturnFeatures, max_rel_err, upstream_kldiv
from test_synthesis import NORM, host_syncs, tiny_net

IMG = 8
BATCH = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(nz, large=False):
    torch.manual_seed(3)
    g = LargeGenerator(nz=nz, ngf=4, img_size=IMG, nc=3) if large else Generator(nz=nz, ngf=4, img_size=IMG, nc=3)
    with torch.no_grad():  # non-trivial BN affine parameters
        for m in g.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return g


# every term on at comparable scales (the scripts' act=0.001 is below the loss tolerance)
ALL_TERMS = {
    "all_terms_kl": dict(nz=256, adv=1.0, criterion="KLDiv", bn=0.5, oh=1.0, act=0.5, balance=2.0),
    "all_terms_l1": dict(nz=256, adv=0.7, criterion="L1Loss", bn=0.5, oh=0.3, act=-0.4, balance=1.5),
}


def method_kwargs(method, ours: bool):
    cfg = dict(GENERATIVE_METHODS.get(method) or ALL_TERMS[method])
    nz = cfg.pop("nz") // 32  # the scripts' 512 / 256, scaled down for the tiny generator
    crit = cfg.pop("criterion")
    if crit == "L1Loss":
        cfg["criterion"] = nn.L1Loss()
    else:
        cfg["criterion"] = losses.KLDiv() if ours else upstream_kldiv
    return nz, cfg


# ------------------------------------------------------------------------------------ API
UPSTREAM = ("teacher student generator nz img_size iterations=1 lr_g=0.001 synthesis_batch_size=128 "
            "sample_batch_size=128 adv=0 bn=0 oh=0 act=0 balance=0 criterion=None normalizer=None device='cpu' "
            "autocast=None use_fp16=False distributed=False")


def test_constructor_matches_upstream():
    params = [p for p in inspect.signature(GenerativeSynthesizer.__init__).parameters.values() if p.name != "self"]
    expected = UPSTREAM.split()
    got = [p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
           for p in params[:len(expected)]]
    assert got == expected
    assert all(p.kind == p.KEYWORD_ONLY for p in params[len(expected):])
    assert issubclass(GenerativeSynthesizer, BaseSynthesis)


def test_script_settings_table():
    # datafree_kd.py + scripts/{dafl,zskt,dfq,dfad}_cifar.sh of zju-vipa/Fast-Datafree and zju-vipa/CMI
    assert GENERATIVE_METHODS["dafl"] == dict(nz=512, adv=0.0, criterion="KLDiv", bn=0.0, oh=1.0, act=0.001,
                                              balance=20.0)
    assert GENERATIVE_METHODS["dfq"]["bn"] == 1.0 and GENERATIVE_METHODS["dfq"]["balance"] == 20.0
    assert GENERATIVE_METHODS["dfad"]["criterion"] == "L1Loss"
    assert GENERATIVE_METHODS["zskt"]["criterion"] == "KLDiv" and GENERATIVE_METHODS["zskt"]["adv"] == 1.0


# ------------------------------------------------------------------------------------ equivalence
def _pair(method, large=False, student_is_teacher=False, iterations=2, **ours_kw):
    t, s = tiny_net(6, seed=1), tiny_net(4, seed=2)
    if student_is_teacher:
        s = t
    norm = Normalizer(*NORM)
    nz, cfg = method_kwargs(method, ours=False)
    g = gen(nz, large)
    rt = ReturnFeatures(copy.deepcopy(t))
    rs = rt if student_is_teacher else copy.deepcopy(s)
    ref = RefGenerative(rt, rs, copy.deepcopy(g), nz, iterations, 2e-2, BATCH, 6, cfg["adv"], cfg["bn"], cfg["oh"],
                        cfg["act"], cfg["balance"], cfg["criterion"], norm)
    _, ocfg = method_kwargs(method, ours=True)
    ours = GenerativeSynthesizer(t, s, g, nz, (3, IMG, IMG), iterations=iterations, lr_g=2e-2,
                                 synthesis_batch_size=BATCH, sample_batch_size=6, normalizer=norm, **ocfg, **ours_kw)
    return ref, ours


def _run(ref, ours, rounds=3, seed=11):
    outs = []
    for m in (ref, ours):
        torch.manual_seed(seed)
        if m is ours:
            m.log_losses = True
        res = []
        for _ in range(rounds):
            o = m.synthesize()
            sm = m.sample()
            res.append((o[0]["synthetic"] if isinstance(o, tuple) else o["synthetic"],
                        sm[0] if isinstance(sm, tuple) else sm))
        outs.append(res)
    return outs


@pytest.mark.parametrize("method", list(GENERATIVE_METHODS) + list(ALL_TERMS))
def test_matches_upstream_loop(method):
    ref, ours = _pair(method, large=(method in ("dfq", "dfad", "all_terms_l1")))
    ref_res, our_res = _run(ref, ours)
    our_losses = torch.stack(ours.loss_log).tolist()
    assert len(our_losses) == len(ref.losses) == 6
    assert max_rel_err(our_losses, ref.losses) < 2e-4, (our_losses, ref.losses)
    for (rx, rs), (ox, os_) in zip(ref_res, our_res):
        torch.testing.assert_close(ox, rx, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(os_, rs, rtol=1e-3, atol=1e-4)
    for p, q in zip(ours.generator.parameters(), ref.generator.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)
    for p, q in zip(ours.generator.buffers(), ref.generator.buffers()):  # sample() moved the BN statistics too
        torch.testing.assert_close(p.float(), q.float(), rtol=1e-3, atol=1e-5)


def test_losses_respond_to_the_generator():
    """The trajectory is not flat: each method's loss changes over the steps (a test that a
    constant loss could not pass)."""
    for method in GENERATIVE_METHODS:
        _, ours = _pair(method, large=True)
        ours.log_losses = True
        torch.manual_seed(0)
        for _ in range(2):
            ours.synthesize()
        ls = torch.stack(ours.loss_log)
        assert ls.std() > 0, method


def test_student_is_teacher_as_in_fast_datafree_script():
    """Fast-Datafree's datafree_kd.py passes student=teacher: the adversarial term is then
    identically zero, in the reference and here, and the trajectories still agree."""
    ref, ours = _pair("dfq", student_is_teacher=True)
    _run(ref, ours, rounds=2)
    assert max_rel_err(torch.stack(ours.loss_log).tolist(), ref.losses) < 2e-4


def test_return_values_and_sample():
    _, ours = _pair("dafl")
    out, sec = ours.synthesize()
    assert set(out) == {"synthetic"} and out["synthetic"].shape == (BATCH, 3, IMG, IMG)
    assert float(out["synthetic"].min()) >= 0 and float(out["synthetic"].max()) <= 1 and isinstance(sec, float)
    x, sec = ours.sample()
    assert x.shape == (6, 3, IMG, IMG) and isinstance(sec, float) and not x.requires_grad


def test_no_grads_no_host_syncs_no_hooks_left():
    t, s = tiny_net(6, seed=1), tiny_net(4, seed=2)
    for p in list(t.parameters()) + list(s.parameters()):
        p.requires_grad_(True)
    s.train()
    syn = GenerativeSynthesizer(t, s, gen(8, True), 8, (3, IMG, IMG), iterations=3, synthesis_batch_size=BATCH,
                                adv=1.0, bn=1.0, oh=1.0, act=0.1, balance=20.0, normalizer=Normalizer(*NORM))
    syn.synthesize()
    assert host_syncs(syn.synthesize, syn.sample) == 0, "synthesize/sample read device values on the host"
    for p in list(t.parameters()) + list(s.parameters()):
        assert p.grad is None and p.requires_grad
    assert s.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in t.modules())
    assert all(p.grad is not None for p in syn.generator.parameters())


@pytest.mark.parametrize("method", ["dafl", "dfq"])
def test_compile_fullgraph_matches_eager(method):
    ref_like, eager = _pair(method, large=True)
    _, comp = _pair(method, large=True, compile={"backend": "aot_eager"})
    for m in (eager, comp):
        m.log_losses = True
        torch.manual_seed(0)
        for _ in range(2):
            m.synthesize()
    torch.testing.assert_close(torch.stack(comp.loss_log), torch.stack(eager.loss_log), rtol=1e-4, atol=1e-5)
    assert comp._compiled  # the compiled function was used


def test_compile_inductor_runs():
    """compile=True (inductor) on the CPU: same losses as eager."""
    _, eager = _pair("dafl", iterations=1)
    _, comp = _pair("dafl", iterations=1, compile=True)
    for m in (eager, comp):
        m.log_losses = True
        torch.manual_seed(0)
        m.synthesize()
        m.synthesize()
    torch.testing.assert_close(torch.stack(comp.loss_log), torch.stack(eager.loss_log), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_argument():
    t, s = tiny_net(6, seed=1), tiny_net(4, seed=2)
    g = gen(8)
    with pytest.raises(ValueError, match="img_size"):
        GenerativeSynthesizer(t, s, g, 8, (3, 16, 16))
    with pytest.raises(ValueError, match="img_size"):
        GenerativeSynthesizer(t, s, g, 8, (3, IMG))
    with pytest.raises(ValueError, match="nz"):
        GenerativeSynthesizer(t, s, g, 9, (3, IMG, IMG))
    with pytest.raises(ValueError, match="synthesis_batch_size"):
        GenerativeSynthesizer(t, s, g, 8, (3, IMG, IMG), synthesis_batch_size=0)
    with pytest.raises(ValueError, match="iterations"):
        GenerativeSynthesizer(t, s, g, 8, (3, IMG, IMG), iterations=0)
    with pytest.raises(TypeError, match="criterion"):
        GenerativeSynthesizer(t, s, g, 8, (3, IMG, IMG), criterion="kl")
    with pytest.raises(TypeError, match="balance"):
        GenerativeSynthesizer(t, s, g, 8, (3, IMG, IMG), balance="20")
    no_fc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="act"):
        GenerativeSynthesizer(no_fc, s, g, 8, (3, IMG, IMG), act=0.1)
    with pytest.raises(ValueError, match="img_size"):
        Generator(8, 4, 10, 3)
    with pytest.raises(ValueError, match="img_size"):
        LargeGenerator(8, 4, 30, 3)
    with pytest.raises(ValueError, match="img_size"):
        DCGAN_Generator(8, 4, 3, img_size=40)
    with pytest.raises(ValueError, match="class_balance_loss"):
        losses.class_balance_loss(torch.randn(5))


# ------------------------------------------------------------------------------------ criteria
def test_criteria_match_upstream_float64_with_gradients():
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (7,))
    cases = [
        (lambda a: losses.cross_entropy(a, y), lambda a: F.cross_entropy(a, y)),
        (lambda a: losses.cross_entropy(a, y, reduction="sum"), lambda a: F.cross_entropy(a, y, reduction="sum")),
        (lambda a: losses.onehot_loss(a), lambda a: F.cross_entropy(a, a.max(1)[1])),
        (lambda a: losses.onehot_loss(a, y), lambda a: F.cross_entropy(a, y)),
        (lambda a: losses.class_balance_loss(a),
         lambda a: (F.softmax(a, 1).mean(0) * torch.log(F.softmax(a, 1).mean(0))).sum()),
    ]
    for ours, ref in cases:
        a = x.detach().clone().requires_grad_()
        b = x.detach().clone().requires_grad_()
        lo, lr = ours(a), ref(b)
        torch.testing.assert_close(lo, lr, rtol=1e-12, atol=1e-12)
        (ga,) = torch.autograd.grad(lo, a)
        (gb,) = torch.autograd.grad(lr, b)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(losses.class_balance_loss, (x,))
    xs = x.detach()[:, ::1].t().contiguous().t()  # non-contiguous
    torch.testing.assert_close(losses.class_balance_loss(xs), losses.class_balance_loss(x.detach().contiguous()))
    # segmentation-shaped logits, as upstream (softmax over dim 1, mean over the batch)
    seg = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    p = F.softmax(seg, 1).mean(0)
    torch.testing.assert_close(losses.class_balance_loss(seg), (p * torch.log(p)).sum())
    for dt, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        xd = x.detach().to(dt)
        torch.testing.assert_close(losses.onehot_loss(xd).double(), F.cross_entropy(x.detach(), x.detach().argmax(1)),
                                   rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------ generators
def _upstream_large(nz, ngf, img_size, nc):
    s = img_size // 4
    return nn.ModuleDict({
        "l1": nn.Sequential(nn.Linear(nz, ngf * 4 * s * s)),
        "conv_blocks": nn.Sequential(
            nn.BatchNorm2d(ngf * 4), nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 4, ngf * 2, 3, 1, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.LeakyReLU(0.2, True),
            nn.Upsample(scale_factor=2), nn.Conv2d(ngf * 2, ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, True), nn.Conv2d(ngf, nc, 3, 1, 1), nn.Sigmoid()),
    })


def test_large_generator_matches_upstream_float64():
    torch.manual_seed(0)
    ours = LargeGenerator(nz=6, ngf=4, img_size=12, nc=3).double()
    up = _upstream_large(6, 4, 12, 3).double()
    assert set(ours.state_dict()) == set(up.state_dict())
    up.load_state_dict(ours.state_dict())
    z = torch.randn(5, 6, dtype=torch.float64)
    ref = up["conv_blocks"](up["l1"](z).view(5, -1, 3, 3))
    torch.testing.assert_close(ours(z), ref, rtol=1e-10, atol=1e-12)
    twin = ours.clone()
    torch.testing.assert_close(twin(z), ours(z))


def test_dcgan_generator_matches_upstream_float64():
    torch.manual_seed(0)
    ours = DCGAN_Generator(nz=6, ngf=2, nc=3, img_size=(32, 16)).double()
    keys = set(ours.state_dict())
    assert "project.1.weight" in keys and "main.0.running_mean" in keys and "main.13.weight" in keys
    z = torch.randn(3, 6, dtype=torch.float64)
    x = ours(z)
    assert x.shape == (3, 3, 32, 16)
    # the same layers, applied one by one as upstream lists them
    h = ours.project[1](z.flatten(1)).view(3, -1, 2, 1)
    for m in ours.main:
        h = m(h)
    torch.testing.assert_close(x, h)
    assert DCGAN_Generator(img_size=64)(torch.randn(2, 100)).shape == (2, 3, 64, 64)


def test_generator_nayer_five_argument_form():
    g = Generator(16, 4, 8, 3, 10)
    assert g.params == (16, 4, 8, 3, 10)
    assert Generator(16, 4, 8, 3).params == (16, 4, 8, 3)
    z = torch.randn(3, 16)
    g.eval()
    torch.testing.assert_close(g(z, torch.zeros(3, dtype=torch.long)), g(z))
    c = g.clone()
    assert c.params == g.params
    torch.testing.assert_close(c.eval()(z), g(z))


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.needs_cuda
@pytest.mark.parametrize("method", list(GENERATIVE_METHODS))
def test_cuda_graph_matches_eager(method):
    t, s = tiny_net(6, seed=1).cuda(), tiny_net(4, seed=2).cuda()
    nz, cfg = method_kwargs(method, ours=True)
    res = []
    for graph in (False, True):
        g = gen(nz, large=True).cuda()
        m = GenerativeSynthesizer(copy.deepcopy(t), copy.deepcopy(s), g, nz, (3, IMG, IMG), iterations=3, lr_g=2e-2,
                                  synthesis_batch_size=BATCH, normalizer=Normalizer(*NORM), device="cuda",
                                  cuda_graph=graph, seed=5, **cfg)
        res.append(([m.synthesize()[0]["synthetic"] for _ in range(3)], [p.detach() for p in m.generator.parameters()]))
    for a, b in zip(res[0][0], res[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    for p, q in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)
