"""CMISynthesizer (fastsynth/synthesis/cmi.py) against the eager upstream loop (fastsynth/bench/reference_cmi.py),
its parts (MemoryBank, MLPHead, InstanceMeanHook, the local-view augmentation) and its errors."""
import copy

import pytest
import torch
import torch.nn as nn

from fastsynth.nn import Generator
from fastsynth.synthesis import Normalizer
from fastsynth.synthesis.cmi import (CMISynthesizer, CMISynthesizerCMI, InstanceMeanHook, MemoryBank, MLPHead,
                                     resized_crop_flip)

from fastsynth.bench.reference_cmi import RefCMI
from reference_loops import max_rel_err
from test_synthesis import NORM, randomise_, tiny_net

IMG = 8
NZ = 8
BATCH = 6
LR = 2e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def gen():
    torch.manual_seed(3)
    return Generator(nz=NZ, ngf=4, img_size=IMG, nc=3)


class TinyRes(nn.Module):
    """A two-stage CIFAR-style ResNet (the blocks of fastsynth.models.cifar_resnet) whose stages,
    like ResNet-34's layer1..layer4 in the upstream scripts, are CMI's feature_layers."""

    def __init__(self, width=4, num_classes=10, seed=0):
        super().__init__()
        from fastsynth.models.cifar_resnet import BasicBlock

        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2))
        self.linear = nn.Linear(2 * width, num_classes)
        randomise_(self, seed)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        return self.linear(torch.nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


def _layers(net, idx):
    if idx is None:
        return None
    return [getattr(net, i) if isinstance(i, str) else net[i] for i in idx]


def _pair(adv=0.0, layer_idx=None, feature_reuse=False, iterations=4, bank_size=4 * BATCH, n_neg=4 * BATCH,
          bn=0.5, oh=1.0, cr=0.8, seed=5, res=False):
    if res:
        t, s, g = TinyRes(4, seed=1), tiny_net(4, seed=2), gen()
    else:
        t, s, g = tiny_net(6, seed=1), tiny_net(4, seed=2), gen()
    norm = Normalizer(*NORM)
    ot, os_, og = copy.deepcopy(t), copy.deepcopy(s), copy.deepcopy(g)
    ours = CMISynthesizer(ot, os_, og, NZ, 10, (3, IMG, IMG), feature_reuse=feature_reuse,
                          feature_layers=_layers(ot, layer_idx), bank_size=bank_size, n_neg=n_neg, head_dim=16,
                          iterations=iterations, lr_g=LR, synthesis_batch_size=BATCH, sample_batch_size=4,
                          adv=adv, bn=bn, oh=oh, cr=cr, cr_T=0.2, normalizer=norm, augment=False, seed=seed)
    ref = RefCMI(t, s, g, copy.deepcopy(ours.head), NZ, iterations, LR, BATCH, adv, bn, oh, cr, 0.2, bank_size,
                 n_neg, norm, seed, feature_layers=_layers(t, layer_idx), feature_reuse=feature_reuse)
    return ref, ours


def _targets(rounds):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 10, (BATCH,), generator=g).sort()[0] for _ in range(rounds)]


def _run(ref, ours, rounds=3):
    ours.log_losses = True
    outs = []
    for m in (ref, ours):
        torch.manual_seed(11)
        res = []
        for y in _targets(rounds):
            o = m.synthesize(y)
            res.append(o[0]["synthetic"] if isinstance(o, tuple) else o["synthetic"])
        outs.append(res)
    return outs


@pytest.mark.parametrize("adv,layer_idx,feature_reuse,res", [
    (0.0, None, False, False),
    (0.7, None, False, False),
    (0.7, (3, 6), True, False),   # the second convolution's and the pooling's inputs
    (0.5, ("layer1", "layer2"), False, True),  # residual stages (the ResNet-34 scripts' setting)
    (0.0, None, False, True),
])
def test_matches_upstream_loop(adv, layer_idx, feature_reuse, res):
    ref, ours = _pair(adv=adv, layer_idx=layer_idx, feature_reuse=feature_reuse, res=res)
    # every BatchNorm input hooked: the means come from the fused BatchNorm passes
    assert ours._fused_means == (layer_idx is None)
    ref_x, our_x = _run(ref, ours, rounds=3)
    our_losses = torch.stack(ours.loss_log).tolist()
    assert len(our_losses) == len(ref.losses) == 12
    # the bank is used from the second round on: a trajectory that ignored it would differ there
    assert ours.mem_bank.n_updates == ref.mem_bank.n_updates == 3 * BATCH
    assert max_rel_err(our_losses, ref.losses) < 2e-4, (our_losses, ref.losses)
    for a, b in zip(our_x, ref_x):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(ours.mem_bank.data[:3 * BATCH], ref.mem_bank.data[:3 * BATCH], rtol=1e-3, atol=1e-5)
    # the head as a function of the stored features (its raw parameters are not compared: Adam
    # turns rounding-level differences of a near-zero gradient, e.g. of a hidden unit at the
    # ReLU's kink, into steps of up to lr)
    feats = ref.mem_bank.data[:3 * BATCH]
    with torch.no_grad():
        for half in (feats[:, :ours.cmi_dim], feats[:, ours.cmi_dim:]):
            torch.testing.assert_close(ours.head(half), ref.head(half), rtol=1e-3, atol=1e-3)  # unit rows
    for p, q in zip(ours.generator.parameters(), ref.generator.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)


def test_contrastive_term_matters():
    """cr changes the trajectory (the test above would pass with a dead contrastive term otherwise)."""
    _, a = _pair(cr=0.8)
    _, b = _pair(cr=0.0)
    for m in (a, b):
        m.log_losses = True
        torch.manual_seed(11)
        for y in _targets(2):
            m.synthesize(y)
    la, lb = torch.stack(a.loss_log), torch.stack(b.loss_log)
    assert (la - lb).abs().max() > 1e-3
    assert b.mem_bank.n_updates == 0 and a.mem_bank.n_updates == 2 * BATCH


def test_returns_and_pool_with_augmentation():
    t, s = tiny_net(6, seed=1), tiny_net(4, seed=2)
    synth = CMISynthesizer(t, s, gen(), NZ, 10, (3, IMG, IMG), bank_size=4 * BATCH, n_neg=2 * BATCH, head_dim=8,
                           iterations=3, synthesis_batch_size=BATCH, sample_batch_size=4, adv=0.5,
                           normalizer=Normalizer(*NORM), seed=1)
    for _ in range(3):  # the third round samples n_neg of 2 * BATCH filled rows
        vis, secs = synth.synthesize()
        assert vis["synthetic"].shape == (BATCH, 3, IMG, IMG) and isinstance(secs, float)
        assert torch.isfinite(vis["synthetic"]).all()
    assert synth.mem_bank.n_updates == 3 * BATCH
    x = synth.sample()
    assert x.shape == (4, 3, IMG, IMG)
    assert all(not p.requires_grad or p.grad is None for p in t.parameters())


def test_cmi_repo_constructor_order():
    t, s = tiny_net(6, seed=1), tiny_net(4, seed=2)
    # zju-vipa/CMI: feature_layers is the 7th positional argument
    synth = CMISynthesizerCMI(t, s, gen(), NZ, 10, (3, IMG, IMG), [t[3]], 2 * BATCH, BATCH, 8,
                              iterations=1, synthesis_batch_size=BATCH)
    assert synth.cmi_dim == 6 and synth.feature_reuse is False and synth.n_neg == BATCH


def test_feature_layers_of_a_teacher_fused_before():
    """Stages hooked before fusion stay calls in the fused forward; a teacher fused earlier has
    traced through them, which is reported instead of producing empty features."""
    from fastsynth import fuse

    t = TinyRes(4, seed=1)
    synth = CMISynthesizer(t, tiny_net(4, seed=2), gen(), NZ, 10, (3, IMG, IMG), feature_layers=[t.layer1, t.layer2],
                           iterations=1, synthesis_batch_size=BATCH, bank_size=64, n_neg=8)
    assert synth.cmi_dim == 4 + 4 and fuse.fused_layers(t)
    t2 = fuse.fuse_teacher(TinyRes(4, seed=1))
    with pytest.raises(ValueError, match=r"feature_layers\[0\] \(Sequential\) is not run by the teacher's forward"):
        CMISynthesizer(t2, tiny_net(4, seed=2), gen(), NZ, 10, (3, IMG, IMG), feature_layers=[t2.layer1],
                       iterations=1, synthesis_batch_size=BATCH, bank_size=64, n_neg=8)


# ---------------------------------------------------------------------------------------------
# errors


def test_bad_arguments():
    t, s = tiny_net(6, seed=1), tiny_net(4, seed=2)
    other = tiny_net(6, seed=3)
    kw = dict(iterations=1, synthesis_batch_size=BATCH)
    with pytest.raises(ValueError, match=r"feature_layers\[1\] \(Conv2d\) is not a submodule of the teacher"):
        CMISynthesizer(t, s, gen(), NZ, 10, (3, IMG, IMG), feature_layers=[t[0], other[3]], **kw)
    with pytest.raises(TypeError, match=r"feature_layers\[0\] must be an nn.Module"):
        CMISynthesizer(t, s, gen(), NZ, 10, (3, IMG, IMG), feature_layers=["layer1"], **kw)
    with pytest.raises(ValueError, match="4-D"):  # the Linear's input is [B, C]
        CMISynthesizer(t, s, gen(), NZ, 10, (3, IMG, IMG), feature_layers=[t[8]], **kw)
    with pytest.raises(ValueError, match="n_neg=65 .* bank_size=64"):
        CMISynthesizer(t, s, gen(), NZ, 10, (3, IMG, IMG), bank_size=64, n_neg=65, **kw)
    with pytest.raises(ValueError, match=r"dim_feat=20;.* 2 \* 18 = 36"):
        CMISynthesizer(t, s, gen(), NZ, 10, (3, IMG, IMG), mem_bank=MemoryBank("cpu", 64, 20), n_neg=8, **kw)
    with pytest.raises(ValueError, match="head takes 7 features"):
        CMISynthesizer(t, s, gen(), NZ, 10, (3, IMG, IMG), head=MLPHead(7, 4), bank_size=64, n_neg=8, **kw)
    with pytest.raises(ValueError, match="cr_T"):
        CMISynthesizer(t, s, gen(), NZ, 10, (3, IMG, IMG), cr_T=0.0, **kw)
    synth = CMISynthesizer(t, s, gen(), NZ, 10, (3, IMG, IMG), bank_size=64, n_neg=8, **kw)
    with pytest.raises(ValueError, match=r"targets must be an integer tensor of shape \[synthesis_batch_size=6\]"):
        synth.synthesize(torch.zeros(BATCH + 1, dtype=torch.long))
    synth.mem_bank = MemoryBank("cpu", 64, 12)  # swapped after construction: checked on every call
    with pytest.raises(ValueError, match="dim_feat=12"):
        synth.synthesize()


# ---------------------------------------------------------------------------------------------
# parts


def test_memory_bank_ring_buffer():
    bank = MemoryBank("cpu", max_size=10, dim_feat=3)
    rows = torch.arange(45, dtype=torch.float32).view(15, 3)
    data, idx = bank.get_data(4)
    assert data.shape == (0, 3) and int(bank.n_filled) == 0
    bank.add(rows[:4])
    assert int(bank.n_filled) == 4 and not bank.settled(4)
    data, idx = bank.get_data(4)  # at most k filled: every filled row, in order (upstream's min(k, filled))
    torch.testing.assert_close(data, rows[:4])
    bank.add(rows[4:6])
    assert int(bank.n_filled) == 6 and bank.settled(4) and not bank.settled(6)
    g = torch.Generator().manual_seed(0)
    bank.generator = g
    seen = set()
    for _ in range(30):  # the fixed-shape draw over all 10 slots takes filled rows only
        data, idx = bank.get_data(4)
        assert idx.shape == (4,) and len(set(idx.tolist())) == 4 and int(idx.max()) < 6
        torch.testing.assert_close(data, bank.data[idx])
        seen.update(idx.tolist())
    assert seen == set(range(6))
    bank.add(rows[6:11])  # 11 rows in a bank of 10: wraps, row 10 overwrites slot 0
    assert bank.n_updates == 11 and bank._ptr == 1 and bank.filled == 10 and int(bank.n_filled) == 10
    assert bank.settled(10)  # the whole bank: all rows, whatever is added later
    torch.testing.assert_close(bank.data[0], rows[10])
    torch.testing.assert_close(bank.data[1:10], rows[1:10])
    seen = set()
    for _ in range(20):
        data, idx = bank.get_data(4)
        assert idx.shape == (4,) and len(set(idx.tolist())) == 4 and int(idx.max()) < 10
        torch.testing.assert_close(data, bank.data[idx])
        seen.update(idx.tolist())
    assert seen == set(range(10))
    with pytest.raises(ValueError, match="5 features per row, the bank holds dim_feat=3"):
        bank.add(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="do not fit"):
        bank.add(torch.zeros(11, 3))


def test_mlp_head_and_instance_mean_hook():
    head = MLPHead(5, 3)
    assert [type(m) for m in head.head] == [nn.Linear, nn.ReLU, nn.Linear]
    out = head(torch.randn(4, 5))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
    conv = nn.Conv2d(2, 3, 3)
    h = InstanceMeanHook(conv)
    x = torch.randn(4, 2, 5, 7)
    conv(x)
    torch.testing.assert_close(h.instance_mean, x.mean(dim=[2, 3]))
    h.remove()
    assert not conv._forward_pre_hooks


def test_resized_crop_flip():
    x = torch.randn(3, 2, 6, 10)
    # area fraction 1, aspect ratio 1 (log-ratio code 0.5), centred, no flip: the identity
    ident = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.9]]).expand(3, 5)
    torch.testing.assert_close(resized_crop_flip(x, ident), x, rtol=1e-5, atol=1e-5)
    flip = ident.clone()
    flip[:, 4] = 0.1
    torch.testing.assert_close(resized_crop_flip(x, flip), x.flip(3), rtol=1e-5, atol=1e-5)
    # a smaller box magnifies: a constant image stays constant, a varying one changes
    small = torch.tensor([[0.0, 0.5, 0.3, 0.7, 0.9]]).expand(3, 5)
    torch.testing.assert_close(resized_crop_flip(torch.ones(3, 2, 6, 10), small), torch.ones(3, 2, 6, 10))
    assert (resized_crop_flip(x, small) - x).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# compiled and CUDA steps


def _losses(compile=False, device="cpu", cuda_graph=False, rounds=2):
    t, s, g = tiny_net(6, seed=1), tiny_net(4, seed=2), gen()
    torch.manual_seed(1)  # the head's initialisation
    synth = CMISynthesizer(t, s, g, NZ, 10, (3, IMG, IMG), bank_size=4 * BATCH, n_neg=4 * BATCH, head_dim=16,
                           iterations=2, lr_g=LR, synthesis_batch_size=BATCH, adv=0.5,
                           normalizer=Normalizer(*NORM), augment=False, seed=5, compile=compile, device=device,
                           cuda_graph=cuda_graph)
    synth.log_losses = True
    for y in _targets(rounds):
        synth.synthesize(y.to(device))
    return torch.stack(synth.loss_log).cpu()


def test_compile_matches_eager():
    from torch._dynamo.utils import counters

    eager = _losses(rounds=3)
    before = counters["stats"]["unique_graphs"]
    compiled = _losses(compile={"backend": "aot_eager"}, rounds=3)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    # no graph per round: the bank rows (0, then BATCH, then 2 * BATCH) stay outside it; the
    # second graph is the one re-specialisation after Normalizer's coefficient cache is filled
    # by the first call (fastsynth/synthesis/base.py)
    assert counters["stats"]["unique_graphs"] - before == 2


@pytest.mark.needs_cuda
def test_cuda_runs_with_bank_on_device():
    """On a GPU: the bank is a device buffer, the loop runs and its losses track the CPU run's
    (different random streams per device: z and the re-initialisation differ, so only the scale
    is compared)."""
    cpu = _losses()
    cuda = _losses(device="cuda")
    assert cuda.shape == cpu.shape and torch.isfinite(cuda).all()
    assert (cuda / cpu).sub(1).abs().max() < 0.5


ROUNDS = 6


def _graph_run(graph: bool, device="cpu", augment=True, compile=False, after_call=None):
    """ROUNDS calls with a bank of 3 * BATCH + 2 rows and n_neg = BATCH + 1: no bank rows (call
    0), all 6 filled rows (call 1: eager steps), n_neg rows drawn from 12 and 18 filled rows
    (calls 2, 3: the captured step from here on), after the bank wrapped (calls 4, 5). Returns
    the synthesizer, the images of every call and the captured steps after every call.
    ``graph`` on the CPU: the cuda_graph=True code path, which CudaGraphStep runs eagerly there
    after its warm-up and restore."""
    t, s, g = tiny_net(6, seed=1), tiny_net(4, seed=2), gen()
    torch.manual_seed(1)  # the head's initialisation
    synth = CMISynthesizer(t.to(device), s.to(device), g.to(device), NZ, 10, (3, IMG, IMG), bank_size=3 * BATCH + 2,
                           n_neg=BATCH + 1, head_dim=16, iterations=3, lr_g=LR, synthesis_batch_size=BATCH, adv=0.5,
                           normalizer=Normalizer(*NORM), augment=augment, seed=5, device=device,
                           cuda_graph=graph and device != "cpu", compile=compile)
    if device == "cpu":
        synth._graph_mode = graph
    images, steps = [], []
    for _ in range(ROUNDS):
        images.append(synth.synthesize()[0]["synthetic"])
        steps.append([(c, c.graph) for c in synth._graphs.values()])
        if after_call is not None:
            after_call()
    return synth, images, steps


def _assert_graph_run_matches(eager, graph, rtol, atol, head_tol):
    (es, e_img, e_steps), (gs, g_img, g_steps) = eager, graph
    from fastsynth.synthesis.core import CudaGraphStep

    assert all(not s for s in e_steps)
    # eager steps while the bank holds at most n_neg rows, then one captured step, never rebuilt
    assert not g_steps[0] and not g_steps[1]
    (step, cuda_graph), = g_steps[2]
    assert isinstance(step, CudaGraphStep)
    assert all(len(s) == 1 and s[0][0] is step and s[0][1] is cuda_graph for s in g_steps[2:])
    assert gs.mem_bank.n_updates == ROUNDS * BATCH > gs.mem_bank.max_size  # wrapped
    for r, (a, b) in enumerate(zip(g_img, e_img)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"call {r}: {m}")
    torch.testing.assert_close(gs.mem_bank.data, es.mem_bank.data, rtol=rtol, atol=atol)
    # the head as a function of the stored features (see test_matches_upstream_loop)
    with torch.no_grad():
        for half in (es.mem_bank.data[:, :es.cmi_dim], es.mem_bank.data[:, es.cmi_dim:]):
            torch.testing.assert_close(gs.head(half), es.head(half), rtol=head_tol, atol=head_tol)
    # the calls differ from each other (a step replaying stale draws could not match the eager run)
    assert all((e_img[r] - e_img[r + 1]).abs().max() > 1e-2 for r in range(ROUNDS - 1))


@pytest.mark.parametrize("augment", [True, False])
def test_graph_code_path_matches_eager_on_cpu(augment):
    """The cuda_graph=True code path (static buffers, the fixed-shape bank draw, the step(None)
    best tracking, CudaGraphStep's warm-up and restore of both optimizers' state and of the
    private generator) equals the eager path over calls while the bank fills, once it holds more
    than n_neg rows and after it wraps; the step is built once."""
    _assert_graph_run_matches(_graph_run(False, augment=augment), _graph_run(True, augment=augment), 1e-6, 1e-7, 1e-6)


def test_graph_code_path_compiled_no_recompilation():
    """compile=True with the cuda_graph code path: the same numbers as the eager path, and no
    graph is compiled after the second call (the first call's re-specialisation, see
    test_compile_matches_eager): none when the step is built, none while the bank fills further
    and wraps (the bank draw stays outside the compiled forward and keeps its shapes)."""
    from torch._dynamo.utils import counters

    seen = []
    graph = _graph_run(True, compile={"backend": "aot_eager"},
                       after_call=lambda: seen.append(counters["stats"]["unique_graphs"]))
    assert seen[1:] == [seen[1]] * (ROUNDS - 1), seen
    _assert_graph_run_matches(_graph_run(False), graph, 1e-5, 1e-5, 1e-5)


def test_no_host_syncs():
    """No host read of a device value in synthesize() (eager and graph code paths): while the
    bank fills, once it is sampled and after it wraps."""
    from test_synthesis import host_syncs

    for graph in (False, True):
        synth = _graph_run(graph)[0]  # ROUNDS calls: the bank is full and has wrapped
        fresh = CMISynthesizer(tiny_net(6, seed=1), tiny_net(4, seed=2), gen(), NZ, 10, (3, IMG, IMG),
                               bank_size=3 * BATCH + 2, n_neg=BATCH + 1, head_dim=16, iterations=2,
                               synthesis_batch_size=BATCH, adv=0.5, normalizer=Normalizer(*NORM), seed=5)
        fresh._graph_mode = graph
        assert host_syncs(*[fresh.synthesize] * 4, synth.synthesize, synth.sample) == 0, graph


@pytest.mark.needs_cuda
def test_cuda_graph_matches_eager_on_cuda():
    """cuda_graph=True on a GPU equals cuda_graph=False (same seed, same device: the same random
    streams, bank draws and crops included) over calls while the bank fills (eager steps), once
    it holds more than n_neg rows (captured once and replayed: each replay draws fresh bank rows
    and crops) and after it wraps; no recapture. Tolerances allow the capturable Adams' device
    bias corrections and cuDNN's rounding, amplified by Adam; stale replays differ by far more."""
    _assert_graph_run_matches(_graph_run(False, "cuda"), _graph_run(True, "cuda"), 1e-3, 1e-4, 1e-3)


# ---------------------------------------------------------------------------------------------
# ATen-op economy of one call (deterministic dispatch count, no timing)


def _upstream_pair(batch=2):
    """The benchmark's CMI setting at a small batch (op counts do not depend on it): the
    upstream-style CIFAR ResNet-34 -> ResNet-18, feature layers layer1..layer4, both banks
    holding the same n_neg rows."""
    from fastsynth.models import upstream

    torch.manual_seed(0)
    teacher, student = upstream.resnet34(10), upstream.resnet18(10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in list(teacher.modules()) + list(student.modules()):
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    teacher.eval()
    torch.manual_seed(3)
    g32 = Generator(nz=16, ngf=8, img_size=32, nc=3)
    kw = dict(iterations=1, lr_g=1e-3, adv=0.5, bn=1.0, oh=0.5, cr=0.8, cr_T=0.2)
    t, s = copy.deepcopy(teacher), copy.deepcopy(student)
    ours = CMISynthesizer(t, s, copy.deepcopy(g32), 16, 10, (3, 32, 32),
                          feature_layers=[t.layer1, t.layer2, t.layer3, t.layer4], bank_size=64, n_neg=32,
                          head_dim=16, synthesis_batch_size=batch, normalizer=Normalizer(*NORM), augment=False,
                          seed=5, **kw)
    rt, rs = copy.deepcopy(teacher), copy.deepcopy(student)
    up = copy.deepcopy(g32)
    up.conv_blocks = nn.Sequential(*up.conv_blocks)  # upstream's plain Sequential (no fused upsample + conv)
    ref = RefCMI(rt, rs, up, copy.deepcopy(ours.head), 16, 1, kw["lr_g"], batch, kw["adv"], kw["bn"], kw["oh"],
                 kw["cr"], kw["cr_T"], 64, 32, Normalizer(*NORM), 5, feature_layers=[rt.layer1, rt.layer2, rt.layer3,
                                                                                     rt.layer4])
    fill = torch.randn(32, ref.mem_bank.data.shape[1], generator=torch.Generator().manual_seed(1))
    ref.mem_bank.add(fill)
    ours.mem_bank.add(fill)
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(7)).sort()[0]
    return ref, ours, y


def test_op_count_against_upstream_loop():
    """One synthesize() call (iterations=1: one inner step plus the call's own work) dispatches at
    most a quarter of the eager upstream loop's ATen ops (the issue's target; 822 of 3467 when this
    was written). The hooked residual stages are traced through: their blocks run fused (ReLUs folded into the BatchNorms, the residual add + ReLU as written),
    and the local view's forward stops at the last hooked input (fewer BatchNorm passes than two
    full forwards)."""
    from fastsynth import fuse
    from fastsynth.bench.harness import AtenOpCounter

    ref, ours, y = _upstream_pair()
    ref.synthesize(y)
    ours.synthesize(y)  # the first call builds the re-used z and Adam state
    counts = {}
    for name, fn in (("ref", lambda: ref.synthesize(y)), ("ours", lambda: ours.synthesize(y))):
        with AtenOpCounter() as c:
            fn()
        counts[name] = c
    r, o = counts["ref"], counts["ours"]
    assert o.total <= 0.25 * r.total, (o.total, r.total, o.counts.most_common(20))
    n_bn = len(fuse.fused_layers(ours.teacher))  # 36: every BatchNorm of ResNet-34
    # global forward: every layer; local forward: up to layer4's input (layer4 has 7 BatchNorms)
    assert o.counts["fastsynth.fused_bn_forward"] == n_bn + (n_bn - 7)
    # the only ReLUs left are the residual joins (the rest fold into the BatchNorms): the 16
    # teacher blocks in both forwards (13 of them before layer4 in the local one), the student's 8
    assert o.counts["aten.relu"] == 16 + 13 + 8
    # the generator's fresh Adam per call is one zeroing op, not 3 allocations per parameter
    assert o.counts["aten.zeros_like"] == 0 and o.counts["aten.zeros"] == 0
    # the hooked inputs are the stage inputs: the means equal the reference's
    torch.testing.assert_close(ours.mem_bank.data[32:32 + 2 * 2], ref.mem_bank.data[32:32 + 2 * 2],
                               rtol=1e-3, atol=1e-5)


def test_stage_hooks_move_to_the_first_convolution():
    """feature_layers=[stage]: the input is taken at a convolution receiving the very same tensor
    (the stage itself is traced through); a layer whose input no inner convolution receives
    keeps its own hook; hooks are removed with remove_hooks()."""
    t = TinyRes(4, seed=1)
    synth = CMISynthesizer(t, tiny_net(4, seed=2), gen(), NZ, 10, (3, IMG, IMG), feature_layers=[t.layer1, t.layer2],
                           iterations=1, synthesis_batch_size=BATCH, bank_size=64, n_neg=8)
    # the first block's conv1 (layer2's shortcut convolution also receives the input; both are
    # stride 2, so module order decides)
    assert [h.module for h in synth.cmi_hooks] == [t.layer1[0].conv1, t.layer2[0].conv1]
    assert not t.layer1._forward_pre_hooks and not t.layer2._forward_pre_hooks
    synth.remove_hooks()
    assert not t.layer1[0].conv1._forward_pre_hooks and not t.layer2[0].conv1._forward_pre_hooks
    # a 3x3 stride-1 conv1 (a geometry the CPU Winograd path serves unless hooked) gives way to
    # the 1x1 shortcut convolution
    from fastsynth.models.cifar_resnet import BasicBlock

    torch.manual_seed(0)
    widen = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), BasicBlock(4, 8, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    synth = CMISynthesizer(widen, tiny_net(4, seed=2), gen(), NZ, 10, (3, IMG, IMG), feature_layers=[widen[3]],
                           iterations=1, synthesis_batch_size=BATCH, bank_size=64, n_neg=8)
    assert [h.module for h in synth.cmi_hooks] == [widen[3].shortcut[0]] and synth.cmi_dim == 4
    net = tiny_net(6, seed=1)
    synth = CMISynthesizer(net, tiny_net(4, seed=2), gen(), NZ, 10, (3, IMG, IMG), feature_layers=[net[3], net[6]],
                           iterations=1, synthesis_batch_size=BATCH, bank_size=64, n_neg=8)
    assert [h.module for h in synth.cmi_hooks] == [net[3], net[6]]  # leaves: hooked as given


def test_bn_input_means_come_from_the_fused_passes():
    """feature_layers=None: the BatchNorm inputs' per-instance means are emitted by the fused
    BatchNorm passes (no separate reduction over the maps), equal the hooks' means, and are
    released after the call; remove_hooks() turns them off."""
    from fastsynth import fuse
    from fastsynth.bench.harness import AtenOpCounter

    ref, ours = _pair(iterations=1)
    y = _targets(1)[0]
    with AtenOpCounter() as c:
        ours.synthesize(y)
    assert c.counts["fastsynth.instance_mean_multi"] == 0
    assert c.counts["fastsynth.fused_bn_forward"] > 0
    assert all(m.last_inst_mean is None for m in fuse.fused_layers(ours.teacher))
    # the features of one forward equal one reduction over the BatchNorm inputs
    x = torch.randn(3, 3, IMG, IMG)
    for h in ours.cmi_hooks:
        h.input = None
    with torch.no_grad():
        ours.teacher(x)
        from fastsynth.ops.contrastive_loss import instance_mean_multi
        expected = instance_mean_multi([h.input for h in ours.cmi_hooks])
        torch.testing.assert_close(ours._feature_means(), expected, rtol=1e-5, atol=1e-6)
    ours.remove_hooks()
    assert not any(m.inst_means_enabled for m in fuse.fused_layers(ours.teacher))
