"""torch.distributed in the synthesizers: two gloo processes on the CPU (spawned once for the
whole file; each test checks what the workers recorded).

- the BN-statistics loss with global statistics over 2 ranks holding B1 + B2 images equals the
  one-process loss over the B images, and each rank's image gradient equals its slice of the
  one-process gradient (float64, fused and unfused BNCapture paths, unequal batches);
  bn_stats='per_rank' differs from it;
- ranks synthesize different images with the same seed; the jointly learned generators stay
  identical (broadcast at construction, gradients averaged); FastMeta, Fast, NAYER and the
  generative synthesizer run whole rounds under 2 processes;
- DeepInversion and CMI run under 2 processes (CMI's head stays identical); a DDP-wrapped
  generator, teacher and student work, and the DDP student trains after synthesis;
- state_dict() records rank and world size; loading into another world size raises.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastsynth import distributed as fdist
from fastsynth.synthesis import (NAYER, CMISynthesizer, DeepInversionSynthesizer, FastMetaSynthesizer, FastSynthesizer,
                                 GenerativeSynthesizer, Normalizer)
from fastsynth.synthesis import core
from fastsynth.synthesis.core import BNCapture, global_stats_hook

from test_synthesis import IMG, NORM, fast_gen, nl_gen, tiny_net

WORLD = 2
SPLIT = (3, 5)  # unequal per-rank batches: the merge weighs ranks by their counts
B = sum(SPLIT)


def _images():
    return torch.randn(B, 3, IMG, IMG, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 2 + 0.3


def _teacher():
    return tiny_net(6, seed=1).double().eval()


def _bn_loss(teacher, x, fuse, hook):
    """BN-statistics loss of teacher(x) and its gradient w.r.t. x through a BNCapture."""
    cap = BNCapture(teacher, fuse=fuse)
    cap.stats_hook = hook
    cap.activate()
    x = x.clone().requires_grad_()
    cap.teacher(x)
    loss = cap.loss(scale=0.7)
    (g,) = torch.autograd.grad(loss, x)
    cap.remove()
    return loss.detach(), g


def _pair():
    return tiny_net(6, seed=1), tiny_net(4, seed=2)


def _perturbed(gen, rank):
    # a different generator on every rank: the synthesizer must start from rank 0's
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.1 * rank)
    return gen


def _params(gen, skip=()):
    """The generator's parameters (its BatchNorm running buffers follow each rank's own batches,
    as with DDP without SyncBatchNorm; a generator in train mode does not read them)."""
    return {k: v.detach().clone() for k, v in gen.named_parameters() if not k.startswith(skip)}


def _worker(rank, world, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        res = {"rank": fdist.rank(), "world": fdist.world_size(), "is_dist": fdist.is_distributed(),
               "seed": fdist.rank_seed(5)}
        lo = sum(SPLIT[:rank])
        x = _images()[lo:lo + SPLIT[rank]]
        for fuse in (False, True):
            res[f"global_{fuse}"] = _bn_loss(_teacher(), x, fuse, global_stats_hook)
            res[f"per_rank_{fuse}"] = _bn_loss(_teacher(), x, fuse, None)

        norm = Normalizer(*NORM)
        t, s = _pair()
        fm = FastMetaSynthesizer(t, s, _perturbed(fast_gen(8), rank), 8, 10, (3, IMG, IMG), iterations=2, lr_g=0.01,
                                 lr_z=0.01, synthesis_batch_size=4, sample_batch_size=4, adv=0.5, warmup=1,
                                 bn_mmt=0.9, normalizer=norm, seed=0, save_dir=None)
        res["fm_gen_init"] = copy.deepcopy(fm.generator.state_dict())
        imgs = [fm.synthesize()[0]["synthetic"] for _ in range(2)]
        res["fm_imgs"] = imgs[-1]
        res["fm_gen"] = _params(fm.generator)
        res["fm_mmt"] = [m.clone() for m in fm.capture.mmt_means]
        res["fm_sample"] = fm.sample()
        st = fm.state_dict()
        res["fm_dist"] = st["dist"]
        st["dist"] = {"rank": 0, "world_size": 1}
        try:
            fm.load_state_dict(st)
            res["fm_load_error"] = None
        except ValueError as e:
            res["fm_load_error"] = str(e)
        fm.close()

        t, s = _pair()
        fs = FastSynthesizer(t, s, _perturbed(fast_gen(8), rank), 8, 10, (3, IMG, IMG), iterations=2, lr_g=0.01,
                             lr_z=0.01, synthesis_batch_size=4, sample_batch_size=4, adv=0.5, warmup=1,
                             normalizer=norm, seed=None, bn_stats="per_rank")
        fs.synthesize()
        res["fast_gen"] = _params(fs.generator)
        fs.close()

        # generator and student as torchrun scripts pass them: wrapped in DDP (reinit() and the
        # synthesis forwards use the wrapped modules)
        t, s = _pair()
        s = DDP(s)
        ny = NAYER(t, s, DDP(nl_gen(6)), 10, (3, IMG, IMG), g_steps=2, lr_g=0.01,
                   synthesis_batch_size=6, sample_batch_size=4, adv=0.5, warmup=1, bn_mmt=0.9, g_life=2, g_loops=1,
                   gwp_loops=1, normalizer=norm, seed=0)
        for _ in range(3):  # the third round re-initialises the generator (g_life=2)
            out = ny.synthesize()
        res["nayer_imgs"] = out[0]["synthetic"][-1]
        res["nayer_gen"] = _params(ny.generator, skip=("le1.",))  # the noisy layers are per rank
        ny.close()
        # the DDP student still trains: synthesis left no reduction pending in its reducer
        s.train()
        for _ in range(2):
            s(res["nayer_imgs"]).square().mean().backward()
        res["student_grad"] = [p.grad.clone() for p in s.parameters()]

        t, s = _pair()
        gs = GenerativeSynthesizer(t, s, _perturbed(fast_gen(8), rank), 8, (3, IMG, IMG), iterations=2,
                                   synthesis_batch_size=4, sample_batch_size=4, adv=1.0, bn=1.0, oh=1.0,
                                   normalizer=norm, seed=1)
        gs.synthesize()
        res["gen_gen"] = _params(gs.generator)
        res["gen_sample"] = gs.sample()[0]
        gs.close()

        # per-round images: global statistics of the teacher's and the student's BatchNorm inputs
        t, s = _pair()
        di = DeepInversionSynthesizer(DDP(t), s, 10, (3, IMG, IMG), iterations=2, lr_g=0.05, synthesis_batch_size=3,
                                      sample_batch_size=3, adv=0.5, normalizer=norm, seed=5)
        res["deepinv_imgs"] = di.synthesize()[0]["synthetic"]
        di.close()
        t, s = _pair()
        cm = CMISynthesizer(t, s, fast_gen(8), 8, 10, (3, IMG, IMG), bank_size=16, n_neg=8, head_dim=8,
                            iterations=2, synthesis_batch_size=4, sample_batch_size=4, adv=0.5, cr=0.8,
                            normalizer=norm, seed=7)
        for _ in range(2):  # the second round has negatives in the bank: the head trains
            res["cmi_imgs"] = cm.synthesize()[0]["synthetic"]
        res["cmi_head"] = _params(cm.head)
        cm.close()
        with pytest.warns(RuntimeWarning, match="compile=True with bn_stats='global'"):
            t, s = _pair()
            fc = FastSynthesizer(t, s, fast_gen(8), 8, 10, (3, IMG, IMG), iterations=1, synthesis_batch_size=4,
                                 normalizer=norm, compile=True)
        res["compile_kept"] = fc.compile
        fc.close()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(WORLD, str(d / "store"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------ helpers
def test_helpers_without_a_group():
    assert not fdist.is_distributed() and fdist.rank() == 0 and fdist.world_size() == 1
    assert fdist.rank_seed(7) == 7 and fdist.rank_seed(None) is None
    m, v = torch.randn(5), torch.rand(5)
    mg, vg = fdist.global_bn_stats(m, v, [4, 2], sizes=[3, 2])
    assert mg is m and vg is v  # no collective, no op
    with pytest.raises(ValueError, match="counts must have one entry per layer"):
        fdist.global_bn_stats(m, v, [4], sizes=[3, 2])
    with pytest.raises(TypeError, match="seed must be an int"):
        fdist.rank_seed(1.5)
    lin = nn.Linear(2, 2)
    assert fdist.unwrap(nn.DataParallel(lin)) is lin


def test_one_process_unchanged():
    """Without a process group a synthesizer installs no statistics hook and keeps its seed."""
    t, s = _pair()
    fm = FastMetaSynthesizer(t, s, fast_gen(8), 8, 10, (3, IMG, IMG), iterations=1, synthesis_batch_size=4,
                             sample_batch_size=4, normalizer=Normalizer(*NORM), seed=3, save_dir=None)
    assert fm.capture.stats_hook is None and not fm._dist
    assert torch.equal(fm._rng.get_state(), torch.Generator().manual_seed(3).get_state())
    assert fm.state_dict()["dist"] == {"rank": 0, "world_size": 1}
    state = fm.state_dict()
    state["dist"] = {"rank": 1, "world_size": 2}
    with pytest.raises(ValueError, match="saved with world size 2 .* world size 1"):
        fm.load_state_dict(state)
    core._WARNED.discard("distributed_no_group")
    with pytest.warns(RuntimeWarning, match="distributed=True, but no torch.distributed process group"):
        FastMetaSynthesizer(t, s, fast_gen(8), 8, 10, (3, IMG, IMG), iterations=1, synthesis_batch_size=4,
                            normalizer=Normalizer(*NORM), distributed=True).close()
    with pytest.raises(ValueError, match="bn_stats must be 'global'"):
        FastMetaSynthesizer(t, s, fast_gen(8), 8, 10, (3, IMG, IMG), iterations=1, synthesis_batch_size=4,
                            normalizer=Normalizer(*NORM), bn_stats="global_batch")
    fm.close()


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_pool_storage_options(tmp_path, storage):
    """pool_device / pool_dir reach the synthesizer's DataPool (storage / directory)."""
    t, s = _pair()
    fm = FastMetaSynthesizer(t, s, fast_gen(8), 8, 10, (3, IMG, IMG), iterations=1, synthesis_batch_size=4,
                             sample_batch_size=3, normalizer=Normalizer(*NORM), seed=3, save_dir=None,
                             pool_device=storage, pool_dir=str(tmp_path) if storage == "disk" else None)
    assert fm.data_pool.storage == storage
    fm.synthesize()
    assert fm.sample().shape == (3, 3, IMG, IMG)
    fm.close()


def test_group_seen(results):
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == WORLD and res["is_dist"]
        assert res["seed"] == 5 + r


# ------------------------------------------------------------------------ global statistics
@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_global_bn_loss_equals_one_process(results, fuse):
    x = _images()
    ref_loss, ref_grad = _bn_loss(_teacher(), x, fuse, None)
    lo = 0
    for r, res in enumerate(results):
        loss, grad = res[f"global_{fuse}"]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(grad, ref_grad[lo:lo + SPLIT[r]], rtol=1e-5, atol=1e-10)
        lo += SPLIT[r]
        # per-rank statistics are those of the rank's own images: a different loss
        per_loss, per_grad = res[f"per_rank_{fuse}"]
        assert (per_loss - ref_loss).abs() > 1e-3
        ref_r = _bn_loss(_teacher(), x[lo - SPLIT[r]:lo], fuse, None)
        torch.testing.assert_close(per_loss, ref_r[0], rtol=1e-10, atol=1e-12)


def test_global_bn_loss_grad_not_scaled(results):
    """The collective's backward passes this rank's row through: summing the identical per-rank
    gradients would double them (caught by the equality above; stated here by the ratio)."""
    x = _images()
    _, ref_grad = _bn_loss(_teacher(), x, False, None)
    g0 = results[0]["global_False"][1]
    ratio = (g0 * ref_grad[:SPLIT[0]]).sum() / (ref_grad[:SPLIT[0]] ** 2).sum()
    assert abs(float(ratio) - 1.0) < 1e-6


# ------------------------------------------------------------------------------ synthesizers
def test_fast_meta_ranks(results):
    a, b = results
    _assert_states_equal(a["fm_gen_init"], b["fm_gen_init"])  # rank 0's generator broadcast
    _assert_states_equal(a["fm_gen"], b["fm_gen"])  # meta gradients averaged
    assert not torch.allclose(a["fm_imgs"], b["fm_imgs"])  # seed 0 + rank: different images
    assert not torch.allclose(a["fm_sample"], b["fm_sample"])
    for ma, mb in zip(a["fm_mmt"], b["fm_mmt"]):  # global statistics: one momentum state
        torch.testing.assert_close(ma, mb, rtol=1e-6, atol=1e-7)


def test_fast_and_generative_generators_identical(results):
    a, b = results
    _assert_states_equal(a["fast_gen"], b["fast_gen"])
    _assert_states_equal(a["gen_gen"], b["gen_gen"])
    assert not torch.allclose(a["gen_sample"], b["gen_sample"])


def test_nayer_ranks(results):
    a, b = results
    for ga, gb in zip(a["student_grad"], b["student_grad"]):  # DDP averaged the student's gradients
        torch.testing.assert_close(ga, gb)
    _assert_states_equal(a["nayer_gen"], b["nayer_gen"])
    assert not torch.allclose(a["nayer_imgs"], b["nayer_imgs"])  # same labels, per-rank noisy layers


def test_per_round_synthesizers(results):
    a, b = results
    assert not torch.allclose(a["deepinv_imgs"], b["deepinv_imgs"])
    assert not torch.allclose(a["cmi_imgs"], b["cmi_imgs"])
    _assert_states_equal(a["cmi_head"], b["cmi_head"])  # the contrastive head is learned jointly
    assert not a["compile_kept"]  # the gather is not traced: eager steps, with a warning


def test_state_records_world(results):
    for r, res in enumerate(results):
        assert res["fm_dist"] == {"rank": r, "world_size": WORLD}
        err = res["fm_load_error"]
        assert err is not None and "world size 1" in err and f"world size {WORLD}" in err
