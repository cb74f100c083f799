"""Synthesizer state_dict()/load_state_dict(): k rounds, save, load into a fresh synthesizer, m
more rounds == k + m rounds without interruption, bit for bit (images, losses, pool, samples)."""
from __future__ import annotations

import io

import pytest
import torch

from fastsynth.synthesis import (NAYER, DeepInversionSynthesizer, FastMetaSynthesizer, FastSynthesizer,
                                 GenerativeSynthesizer, Normalizer)
from fastsynth.synthesis.cmi import CMISynthesizer
from fastsynth.synthesis.fast_meta_imagenet import FastMetaSynthesizerForImageNet

from test_synthesis import IMG, NORM, fast_gen, nl_gen, tiny_net


pytestmark = pytest.mark.usefixtures("one_thread")


def _norm():
    return Normalizer(*NORM)


def _pair():
    return tiny_net(6, seed=1), tiny_net(4, seed=2)


def make_fast_meta(seed=None, **kw):
    t, s = _pair()
    return FastMetaSynthesizer(t, s, fast_gen(8), 8, 10, (3, IMG, IMG), iterations=3, lr_g=0.01, lr_z=0.01,
                               synthesis_batch_size=5, sample_batch_size=4, adv=0.5, warmup=1, bn_mmt=0.9,
                               normalizer=_norm(), seed=seed, save_dir=None, **kw)


def make_fast(seed=3, **kw):
    t, s = _pair()
    return FastSynthesizer(t, s, fast_gen(8), 8, 10, (3, IMG, IMG), iterations=2, lr_g=0.01, lr_z=0.01,
                           synthesis_batch_size=5, sample_batch_size=4, adv=0.5, warmup=1,
                           normalizer=_norm(), seed=seed, pool_capacity=12, pool_eviction="random", **kw)


def make_nayer(seed=None, g_life=2, **kw):
    t, s = _pair()
    return NAYER(t, s, nl_gen(6), 10, (3, IMG, IMG), g_steps=2, lr_g=0.01, synthesis_batch_size=6,
                 sample_batch_size=4, adv=0.5, warmup=1, bn_mmt=0.9, g_life=g_life, g_loops=2, gwp_loops=1,
                 normalizer=_norm(), seed=seed, **kw)


def make_deepinv(seed=5, **kw):
    t, s = _pair()
    return DeepInversionSynthesizer(t, s, 10, (3, IMG, IMG), iterations=3, lr_g=0.05, synthesis_batch_size=4,
                                    sample_batch_size=3, adv=0.5, normalizer=_norm(), seed=seed,
                                    save_images="shard", **kw)


def make_generative(seed=None, **kw):
    kw.pop("save_dir")  # writes no images
    t, s = _pair()
    return GenerativeSynthesizer(t, s, fast_gen(8), 8, (3, IMG, IMG), iterations=2, synthesis_batch_size=5,
                                 sample_batch_size=4, adv=1.0, bn=1.0, oh=1.0, act=0.1, balance=5.0,
                                 normalizer=_norm(), seed=seed, **kw)


def make_cmi(seed=7, **kw):
    t, s = _pair()
    return CMISynthesizer(t, s, fast_gen(8), 8, 10, (3, IMG, IMG), bank_size=16, n_neg=8, head_dim=8,
                          iterations=2, synthesis_batch_size=6, sample_batch_size=4, adv=0.5, cr=0.8,
                          normalizer=_norm(), seed=seed, **kw)


def make_fast_meta_imagenet(seed=2, **kw):
    from test_fast_meta_imagenet import IMG as IMG32
    from test_fast_meta_imagenet import NZ
    from test_fast_meta_imagenet import gen as deep_gen

    t, s = _pair()
    return FastMetaSynthesizerForImageNet(t, s, deep_gen(), NZ, 10, (3, IMG32, IMG32), iterations=2,
                                          synthesis_batch_size=4, sample_batch_size=3, adv=0.5, start_kd=1,
                                          bn_mmt=0.9, normalizer=_norm(), seed=seed, **kw)


MAKERS = {
    "fast_meta": make_fast_meta, "fast": make_fast, "nayer": make_nayer, "deepinv": make_deepinv,
    # g_life=10: no generator re-initialisation after the resume, so the noisy layers' seed
    # buffer (not in the generator's state_dict) must come back from the state
    "nayer_no_reinit": lambda **kw: make_nayer(g_life=10, **kw),
    "generative": make_generative, "cmi": make_cmi, "fast_meta_imagenet": make_fast_meta_imagenet,
}


def _tensors(obj) -> list:
    """The tensors of what synthesize()/sample() returned (the seconds are left out)."""
    if torch.is_tensor(obj):
        return [obj.detach().clone()]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _round(synth) -> list:
    out = _tensors(synth.synthesize())
    for _ in range(2):
        out += _tensors(synth.sample())
    return out


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _pool(synth):
    p = synth.data_pool
    return p.images().clone() if len(p) else None


def _same(a, b, what):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype, (what, i)
        assert torch.equal(x, y), f"{what}[{i}] differs by {(x.float() - y.float()).abs().max()}"


@pytest.mark.parametrize("name", list(MAKERS))
def test_resume_is_bit_identical(name, tmp_path):
    make = MAKERS[name]
    k, m = 2, 2
    torch.manual_seed(0)
    full = make(save_dir=str(tmp_path / "a")) if name != "fast_meta" else make()
    full.log_losses = True
    outs_full = [_round(full) for _ in range(k + m)]

    torch.manual_seed(0)
    first = make(save_dir=str(tmp_path / "b")) if name != "fast_meta" else make()
    first.log_losses = True
    for _ in range(k):
        _round(first)
    state = _roundtrip(first.state_dict())
    losses_first = list(first.loss_log)
    # the first synthesizer runs on after state_dict(): the saved state must not follow it
    _round(first)

    torch.manual_seed(1234)  # the default generator is part of the state
    resumed = make(save_dir=str(tmp_path / "b")) if name != "fast_meta" else make()
    resumed.load_state_dict(state)
    resumed.log_losses = True
    outs_resumed = [_round(resumed) for _ in range(m)]

    for r in range(m):
        _same(outs_full[k + r], outs_resumed[r], f"{name} round {k + r} outputs")
    assert len(full.loss_log) > 0
    _same(full.loss_log, losses_first + resumed.loss_log, f"{name} losses")
    pa, pb = _pool(full), _pool(resumed)
    assert (pa is None) == (pb is None)
    if pa is not None:
        assert torch.equal(pa, pb)
        assert full.data_pool.seen == resumed.data_pool.seen
    for s in (full, first, resumed):
        s.close()
    if name == "deepinv":  # the resumed pool writes after the files already there, never over them
        assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [f"shard_{i:06d}.npy" for i in range(k + 1 + m)]


def test_state_is_plain_and_option_mismatch_is_named():
    synth = make_fast_meta(seed=1)
    synth.synthesize()
    state = synth.state_dict()
    assert state["options"]["lr_g"] == 0.01 and "device" not in state["options"]
    assert state["values"]["ep"] == 1
    other = make_fast_meta(seed=1, reset_l0=1)
    with pytest.raises(ValueError, match="reset_l0"):
        other.load_state_dict(_roundtrip(state))
    with pytest.raises(ValueError, match="NAYER"):
        make_nayer().load_state_dict(state)
    with pytest.raises(ValueError, match="state_dict"):
        synth.load_state_dict({"generator": {}})


def test_load_drops_compiled_functions():
    synth = make_fast(seed=1)
    synth.synthesize()
    synth._compiled["x"] = object()
    synth.load_state_dict(synth.state_dict())
    assert synth._compiled == {}


def test_pool_state_roundtrip_and_disk_numbering(tmp_path):
    from fastsynth.synthesis import DataPool

    a = DataPool(capacity=10, eviction="fifo", save_dir=str(tmp_path), save_format="shard")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        a.add(torch.rand(4, 3, 4, 4, generator=g))
    a.sample(3, generator=torch.Generator().manual_seed(1))
    st = _roundtrip(a.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shard_{i:06d}.npy" for i in range(3)]
    b = DataPool(capacity=10, eviction="fifo")
    b.load_state_dict(st)
    assert torch.equal(a.images(), b.images()) and b.seen == 12 and len(b) == 10
    ga, gb = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert torch.equal(a.sample(9, generator=ga), b.sample(9, generator=gb))
    with pytest.raises(ValueError, match="capacity"):
        DataPool(capacity=11).load_state_dict(st)
    a.close()
