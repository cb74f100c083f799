"""fastsynth.nn generators: shapes, clone(), batched noisy layers == K separate Linear layers,
upstream state_dict compatibility, re_init_le()."""
import math

import pytest
import torch
import torch.nn as nn

from fastsynth.bench.harness import AtenOpCounter
from fastsynth.nn import DeepGenerator, Generator, NLDeepGenerator, NLGenerator
from fastsynth.nn.generators import _conv_blocks_32


class UpstreamStyleNLGenerator(nn.Module):
    """Test oracle with NAYER's module layout (state_dict keys le1.{i}.weight ...) and its
    forward: a Python loop over K nn.Linear noisy layers on consecutive row blocks."""

    def __init__(self, ngf, img_size, nc, nl, label_emb, le_emb_size, le_size, sbz):
        super().__init__()
        self.label_emb, self.nl = label_emb, nl
        self.init_size = img_size // 4
        self.nle = int(math.ceil(sbz / nl))
        self.n1 = nn.BatchNorm1d(le_size)
        self.le1 = nn.ModuleList([nn.Linear(le_size, le_emb_size) for _ in range(self.nle)])
        self.l1 = nn.Sequential(nn.Linear(le_emb_size, ngf * 2 * self.init_size ** 2))
        self.conv_blocks = _conv_blocks_32(ngf, nc)

    def forward(self, targets):
        le = self.n1(self.label_emb[targets])
        parts = []
        for i in range(self.nle):
            sle = le[i * self.nl:] if (i + 1) * self.nl > le.shape[0] else le[i * self.nl:(i + 1) * self.nl]
            parts.append(self.le1[i](sle))
        out = self.l1(torch.cat(parts))
        return self.conv_blocks(out.view(out.shape[0], -1, self.init_size, self.init_size))


CFG = dict(ngf=4, img_size=8, nc=3, nl=10, le_emb_size=12, le_size=16, sbz=35)  # K = 4 noisy layers


def _pair(dtype=torch.float64):
    label_emb = torch.randn(10, CFG["le_size"], dtype=dtype)
    ours = NLGenerator(label_emb=label_emb, **CFG).to(dtype)
    ref = UpstreamStyleNLGenerator(label_emb=label_emb, **CFG).to(dtype)
    ours.re_init_le()
    ref.load_state_dict(ours.upstream_state_dict())
    return ours, ref


def test_generator_shapes_range_and_upstream_keys():
    g = Generator(nz=16, ngf=8, img_size=32, nc=3)
    x = g(torch.randn(5, 16))
    x = x.detach()
    assert x.shape == (5, 3, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
    keys = set(g.state_dict())
    assert {"l1.0.weight", "conv_blocks.0.running_mean", "conv_blocks.2.weight", "conv_blocks.6.weight",
            "conv_blocks.9.weight", "conv_blocks.9.bias"} <= keys


def test_generator_clone_copies_weights_and_is_independent():
    g = Generator(nz=8, ngf=4, img_size=8, nc=1).double().eval()
    g.conv_blocks[0].running_mean.add_(0.5)
    c = g.clone()
    assert type(c) is Generator and not c.training
    for (k, v), (k2, v2) in zip(g.state_dict().items(), c.state_dict().items()):
        assert k == k2 and v.dtype == v2.dtype and v.device == v2.device and torch.equal(v, v2)
    z = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(c(z), g(z), rtol=0, atol=0)
    with torch.no_grad():
        c.l1[0].weight.add_(1)
    assert not torch.equal(c.l1[0].weight, g.l1[0].weight)


def test_deep_generator_shapes():
    g = DeepGenerator(nz=8, ngf=4, img_size=64, nc=3)
    assert g(torch.randn(2, 8, 4, 4)).shape == (2, 3, 64, 64)
    assert g(torch.randn(2, 8)).shape == (2, 3, 64, 64)  # flat z spread over the s/16 grid
    assert torch.equal(g.clone().conv_blocks[0].weight, g.conv_blocks[0].weight)


@pytest.mark.parametrize("batch", [35, 40, 20, 7, 1, 12])
def test_batched_noisy_layers_equal_separate_linears(batch):
    """Outputs and all gradients equal those of K nn.Linear layers with the same weights
    (35: partial last block; 40: K*nl; 20, 12, 7, 1: smaller than sbz)."""
    ours, ref = _pair()
    targets = torch.randint(0, 10, (batch,))
    if batch == 1:
        ours.eval(), ref.eval()  # BatchNorm needs 2+ rows in train mode
    out, out_ref = ours(targets), ref(targets)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)  # grad_output != 1
    out.backward(grad)
    out_ref.backward(grad)
    used = -(-batch // CFG["nl"])
    for i in range(ref.nle):
        gw = ours.le1.weight.grad[i].t()
        gb = ours.le1.bias.grad[i]
        if i < used:
            torch.testing.assert_close(gw, ref.le1[i].weight.grad, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(gb, ref.le1[i].bias.grad, rtol=1e-12, atol=1e-12)
        else:  # unused layers get zero gradient (upstream: None)
            assert ref.le1[i].weight.grad is None or torch.all(ref.le1[i].weight.grad == 0)
            assert torch.all(gw == 0) and torch.all(gb == 0)
    for name in ("n1.weight", "n1.bias", "l1.0.weight", "conv_blocks.2.weight", "conv_blocks.9.bias"):
        torch.testing.assert_close(ours.get_parameter(name).grad, ref.get_parameter(name).grad, rtol=1e-10, atol=1e-12)


def test_batch_larger_than_noisy_rows_is_an_error():
    ours, _ = _pair()
    with pytest.raises(ValueError, match="exceeds"):
        ours(torch.randint(0, 10, (41,)))


def test_missing_label_emb_is_a_clear_error():
    g = NLGenerator(**CFG)
    with pytest.raises(ValueError, match="label_emb"):
        g(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="label_emb must be"):
        NLGenerator(label_emb=torch.randn(10, 7), **CFG)


def test_upstream_state_dict_loads_and_round_trips():
    label_emb = torch.randn(10, CFG["le_size"], dtype=torch.float64)
    ref = UpstreamStyleNLGenerator(label_emb=label_emb, **CFG).double()
    sd = ref.state_dict()
    assert "le1.0.weight" in sd and "le1.3.bias" in sd
    ours = NLGenerator(label_emb=label_emb, **CFG).double()
    ours.load_state_dict(sd)  # strict: every key consumed
    assert ours.le1.weight.shape == (4, CFG["le_size"], CFG["le_emb_size"])
    targets = torch.randint(0, 10, (35,))
    torch.testing.assert_close(ours(targets), ref(targets), rtol=1e-12, atol=1e-12)
    # our own state_dict round-trips, and converts back to the upstream layout
    twin = NLGenerator(label_emb=label_emb, **CFG).double()
    twin.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(v, twin.state_dict()[k])
    back = ours.upstream_state_dict()
    assert set(back) == set(sd)
    for k, v in sd.items():
        # the BatchNorm running statistics were updated by the two train-mode forwards, whose
        # noisy-layer outputs agree to rounding (different kernels), not bit for bit
        torch.testing.assert_close(back[k], v, rtol=1e-12, atol=1e-12, msg=k)


def test_re_init_le_is_one_fused_op_with_normal_weights_and_zero_bias():
    g = NLGenerator(label_emb=torch.randn(10, 64), ngf=4, img_size=8, nc=3, nl=10, le_emb_size=300,
                    le_size=64, sbz=400)  # 40 noisy layers
    seed0 = int(g.le1.seed)
    with AtenOpCounter() as counter:
        g.re_init_le()
    assert counter.counts["fastsynth.reinit_"] == 1 and counter.total == 2, counter.counts  # + seed.add_
    w1 = g.le1.weight.detach().clone()
    assert torch.all(g.le1.bias == 0)
    assert abs(float(w1.mean())) < 0.01 and abs(float(w1.std()) - 1) < 0.01
    assert int(g.le1.seed) == seed0 + 1
    g.re_init_le()
    assert not torch.equal(w1, g.le1.weight)


def test_reinit_returns_fresh_generator_of_same_configuration():
    label_emb = torch.randn(10, CFG["le_size"])
    g = NLGenerator(label_emb=label_emb, **CFG).double()
    fresh = g.reinit()
    assert type(fresh) is NLGenerator and fresh.params[:4] == g.params[:4]
    assert fresh.le1.weight.dtype == torch.float64 and fresh.label_emb is not None
    assert not torch.equal(fresh.l1[0].weight, g.l1[0].weight)
    assert fresh(torch.randint(0, 10, (35,))).shape == (35, 3, 8, 8)


def test_nl_deep_generator_shapes():
    g = NLDeepGenerator(ngf=4, img_size=32, nc=3, nl=5, label_emb=torch.randn(5, 8), le_emb_size=6, le_size=8, sbz=12)
    g.re_init_le()
    assert g(torch.randint(0, 5, (12,))).shape == (12, 3, 32, 32)
