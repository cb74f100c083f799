"""Where the synthesizers get their fused ops and generators from.

Each name resolves to the fastsynth op/module when it exists in this installation and otherwise
to a small private eager version below, so the synthesizers run whatever parts of the library
are built. The eager versions compute the same math (spec sections 1-3) in a handful of
vectorised ops; they are only used until (or where) the fused ops are unavailable.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.bn_stat_loss import loss_from_stats


# --------------------------------------------------------------------------- BN-statistics loss
def _eager_bn_stat_loss_multi(features, running_means, running_vars, mmt_means=None, mmt_vars=None,
                              mmt_rate=0.0, weights=None, backend=None):
    means, variances = [], []
    for a in features:
        # biased variance, fp32 accumulation for half inputs (two-pass inside var_mean)
        var, mu = torch.var_mean(a.float() if a.dtype in (torch.float16, torch.bfloat16) else a,
                                 dim=(0, 2, 3), correction=0)
        means.append(mu)
        variances.append(var)
    loss = loss_from_stats(means, variances, running_means, running_vars, mmt_means, mmt_vars, mmt_rate, weights)
    return loss, means, variances


def bn_stat_loss_multi():
    from .. import ops

    op = getattr(ops, "bn_stat_loss_multi", None)
    if op is None:
        try:
            from ..ops import bn_stat_loss as mod

            op = getattr(mod, "bn_stat_loss_multi", None)
        except ImportError:  # pragma: no cover
            op = None
    return op if op is not None else _eager_bn_stat_loss_multi


# --------------------------------------------------------------------------- logit losses
def _eager_synthesis_logit_loss(teacher_logits, student_logits, targets, oh=1.0, adv=1.0):
    """oh * CE(t, y) + adv * L_adv, L_adv = -(1/N) sum_i 1[argmax s_i == argmax t_i] KL(p_t || p_s)_i."""
    loss_oh = F.cross_entropy(teacher_logits, targets)
    t = teacher_logits.float()
    s = student_logits.float()
    log_pt = F.log_softmax(t, dim=1)
    log_ps = F.log_softmax(s, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    mask = (s.argmax(1) == t.argmax(1)).to(kl.dtype)
    loss_adv = -(kl * mask).mean()
    return oh * loss_oh + adv * loss_adv, (loss_oh, loss_adv)


def synthesis_logit_loss():
    from .. import ops

    op = getattr(ops, "synthesis_logit_loss", None)
    return op if op is not None else _eager_synthesis_logit_loss


def _eager_kd_loss(student_logits, teacher_logits, T=1.0):
    """T^2 * KL(p_t(T) || p_s(T)), batchmean."""
    log_ps = F.log_softmax(student_logits / T, dim=1)
    log_pt = F.log_softmax(teacher_logits / T, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum() / student_logits.shape[0] * (T * T)


def kd_loss():
    from .. import ops

    op = getattr(ops, "kd_loss", None)
    return op if op is not None else _eager_kd_loss


def _eager_js_divergence(logits, targets, T=1.0):
    p = F.softmax(logits / T, dim=1)
    q = F.softmax(targets / T, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p = p.clamp(0.01, 0.99)
    q = q.clamp(0.01, 0.99)
    n = logits.shape[0]
    kl_mp = (m * (m.log() - p.log())).sum() / n
    kl_mq = (m * (m.log() - q.log())).sum() / n
    return 0.5 * kl_mp + 0.5 * kl_mq


def js_divergence():
    from .. import ops

    op = getattr(ops, "js_divergence", None)
    return op if op is not None else _eager_js_divergence


# --------------------------------------------------------------------------- generators
class _Generator(nn.Module):
    """FastDFKD generator (spec section 3)."""

    def __init__(self, nz=100, ngf=64, img_size=32, nc=3):
        super().__init__()
        self.params = (nz, ngf, img_size, nc)
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(nz, ngf * 2 * self.init_size ** 2))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(ngf * 2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z):
        out = self.l1(z)
        out = out.view(out.shape[0], -1, self.init_size, self.init_size)
        return self.conv_blocks(out)

    def clone(self):
        c = type(self)(*self.params)
        c.load_state_dict(self.state_dict())
        p = next(self.parameters())
        return c.to(p.device)


class _NLGenerator(nn.Module):
    """NAYER noisy-layer generator (spec section 3): label embedding -> BN1d -> per-block noisy
    Linear layers (one block of ``nl`` rows each) -> the FastDFKD conv stack."""

    def __init__(self, ngf=64, img_size=32, nc=3, nl=100, label_emb=None, le_emb_size=256, le_size=512, sbz=200):
        super().__init__()
        self.params = (ngf, img_size, nc, nl, label_emb, le_emb_size, le_size, sbz)
        self.label_emb = label_emb
        self.le_emb_size = le_emb_size
        self.le_size = le_size
        self.init_size = img_size // 4
        self.nl = nl
        self.nle = int(math.ceil(sbz / nl))
        self.sbz = sbz
        self.n1 = nn.BatchNorm1d(le_size)
        self.le1 = nn.ModuleList([nn.Linear(le_size, le_emb_size) for _ in range(self.nle)])
        self.l1 = nn.Sequential(nn.Linear(le_emb_size, ngf * 2 * self.init_size ** 2))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(ngf * 2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def re_init_le(self):
        with torch.no_grad():
            for layer in self.le1:
                layer.weight.normal_(0.0, 1.0)
                layer.bias.zero_()

    def forward(self, targets=None):
        le = self.n1(self.label_emb[targets])
        blocks = []
        for i in range(self.nle):
            blk = le[i * self.nl:(i + 1) * self.nl]
            if blk.shape[0] == 0:
                break
            blocks.append(self.le1[i](blk))
        v = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        out = self.l1(v).view(v.shape[0], -1, self.init_size, self.init_size)
        return self.conv_blocks(out)

    def reinit(self):
        p = next(self.parameters())
        return type(self)(*self.params).to(p.device)


def Generator():
    from .. import nn as fnn

    return getattr(fnn, "Generator", None) or _Generator


def NLGenerator():
    from .. import nn as fnn

    return getattr(fnn, "NLGenerator", None) or _NLGenerator


def fuse_module():
    """fastsynth.fuse when the fused teacher BatchNorm exists, else None."""
    try:
        from .. import fuse  # noqa: F401
    except ImportError:
        return None
    from .. import fuse as mod

    need = ("bn_statistics", "set_stats_enabled", "unfuse_teacher")
    if all(hasattr(mod, n) for n in need) and hasattr(mod, "fuse_teacher"):
        return mod
    return None


def as_list(x: Sequence) -> list:
    return list(x) if x is not None else None
