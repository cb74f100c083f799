"""Eager reference of the upstream CMI loop (zju-vipa/Fast-Datafree and zju-vipa/CMI
``CMISynthesizer.synthesize``), written from its behaviour in the upstream style: forward hooks
computing the BN loss and the instance means on every teacher forward, the contrastive logits
as a full (N+N') x (N+N') matrix and ``F.cross_entropy(reduction='none')``, ``.item()`` best
tracking every step, a fresh Adam over the generator and z per call, a persistent Adam over the
head, a CPU memory bank sampled with Python's ``random``.

Augmentation is left out (fastsynth runs with ``augment=False``: both views are the normalised
images). The random numbers drawn here come from ``rng`` in the order fastsynth draws them (z,
then the generator's re-initialisation), so both sides start from the same z and weights.
One deliberate difference from the published code: when the bank has just filled
(``n_updates == max_size``) upstream's ``get_data`` returns no rows (see fastsynth/synthesis/cmi.py);
this reference uses the full bank then, which is the intended behaviour.
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from .reference_loops import RefHook, ref_adv


class RefInstanceMeanHook:
    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, inputs, output):
        self.instance_mean = torch.mean(inputs[0], dim=[2, 3])

    def remove(self):
        self.hook.remove()


class RefMemoryBank:
    def __init__(self, max_size, dim_feat):
        self.data = torch.randn(max_size, dim_feat)
        self._ptr = 0
        self.n_updates = 0
        self.max_size = max_size

    def add(self, feat):
        n = feat.shape[0]
        self.data[self._ptr:self._ptr + n] = feat.detach().cpu()
        self._ptr = (self._ptr + n) % self.max_size
        self.n_updates += n

    def get_data(self, k):
        n = self.max_size if self.n_updates >= self.max_size else self._ptr  # upstream: '>' (module docstring)
        if k >= n:
            # upstream draws a random permutation of all n rows; the loss does not depend on the
            # order of the negatives, so they are taken in order (reproducible float sums)
            return self.data[:n]
        return self.data[random.sample(list(range(n)), k=k)]


def ref_reset_model(model, rng):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.ConvTranspose2d, nn.Linear, nn.Conv2d)):
                m.weight.normal_(0.0, 0.02, generator=rng)
                if m.bias is not None:
                    m.bias.zero_()
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02, generator=rng)
                m.bias.zero_()


class RefCMI:
    """The upstream loop; ``feature_layers``: modules of ``teacher`` (None: its BatchNorm2d
    layers), ``head``: the projection head to start from (a copy of fastsynth's)."""

    def __init__(self, teacher, student, generator, head, nz, iterations, lr_g, batch, adv, bn, oh, cr, cr_T,
                 bank_size, n_neg, normalizer, seed, feature_layers=None, feature_reuse=False):
        self.teacher, self.student, self.generator, self.head = teacher, student, generator, head.train()
        self.nz, self.iterations, self.lr_g, self.batch = nz, iterations, lr_g, batch
        self.adv, self.bn, self.oh, self.cr, self.cr_T = adv, bn, oh, cr, cr_T
        self.n_neg, self.normalizer, self.feature_reuse = n_neg, normalizer, feature_reuse
        self.rng = torch.Generator().manual_seed(seed)
        layers = feature_layers if feature_layers is not None else \
            [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        self.cmi_hooks = [RefInstanceMeanHook(m) for m in layers]
        self.hooks = [RefHook(m, 0) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        with torch.no_grad():
            teacher.eval()
            teacher(torch.randn(1, 3, 8, 8))  # CMI dims (the tests use 8x8 images)
            dim = torch.cat([h.instance_mean for h in self.cmi_hooks], dim=1).shape[1]
        self.mem_bank = RefMemoryBank(bank_size, 2 * dim)
        self.optimizer_head = torch.optim.Adam(self.head.parameters(), lr=lr_g)
        self.losses = []

    def synthesize(self, targets):
        self.student.eval()
        self.teacher.eval()
        best_cost = 1e6
        best_inputs = None
        z = torch.randn(size=(self.batch, self.nz), generator=self.rng).requires_grad_()
        if not self.feature_reuse:
            ref_reset_model(self.generator, self.rng)
        optimizer = torch.optim.Adam([{"params": self.generator.parameters()}, {"params": [z]}], self.lr_g,
                                     betas=[0.5, 0.999])
        for _ in range(self.iterations):
            inputs = self.generator(z)
            global_view = self.normalizer(inputs)
            local_view = self.normalizer(inputs)
            t_out = self.teacher(global_view)
            loss_bn = sum([h.r_feature for h in self.hooks])
            loss_oh = F.cross_entropy(t_out, targets)
            if self.adv > 0:
                s_out = self.student(global_view)
                loss_adv = ref_adv(s_out, t_out)
            else:
                loss_adv = loss_oh.new_zeros(1)
            loss_inv = self.bn * loss_bn + self.oh * loss_oh + self.adv * loss_adv
            global_feature = torch.cat([h.instance_mean for h in self.cmi_hooks], dim=1)
            _ = self.teacher(local_view)
            local_feature = torch.cat([h.instance_mean for h in self.cmi_hooks], dim=1)
            cached_feature = self.mem_bank.get_data(self.n_neg)
            cached_local, cached_global = torch.chunk(cached_feature, chunks=2, dim=1)
            proj = self.head(torch.cat([local_feature, cached_local, global_feature, cached_global], dim=0))
            proj_local, proj_global = torch.chunk(proj, chunks=2, dim=0)
            cr_logits = torch.mm(proj_local, proj_global.detach().T) / self.cr_T
            cr_labels = torch.arange(start=0, end=len(cr_logits))
            loss_cr = F.cross_entropy(cr_logits, cr_labels, reduction="none")
            if self.mem_bank.n_updates > 0:
                loss_cr = loss_cr[:self.batch].mean() + loss_cr[self.batch:].mean()
            else:
                loss_cr = loss_cr.mean()
            loss = self.cr * loss_cr + loss_inv
            self.losses.append(loss.item())
            with torch.no_grad():
                if best_cost > loss.item() or best_inputs is None:
                    best_cost = loss.item()
                    best_inputs = inputs.data
                    best_features = torch.cat([local_feature.data, global_feature.data], dim=1).data
            optimizer.zero_grad()
            self.optimizer_head.zero_grad()
            loss.backward()
            optimizer.step()
            self.optimizer_head.step()
        self.student.train()
        self.mem_bank.add(best_features)
        return {"synthetic": best_inputs}
