"""Eager reference of upstream's ImageNet FastMeta loop (zju-vipa/Fast-Datafree
``FastMetaSynthesizerForImageNet.synthesize``), written from its behaviour in the upstream style:
BN forward hooks computing the loss on every teacher forward, separate losses, teacher/student
weights that keep requires_grad, ``generator.clone()`` and fresh Adams per round, ``.item()``
losses. Augmentation is left out (fastsynth runs with ``augment=False``: normalisation only).

Where upstream does not run (see the fastsynth class docstring), the intended behaviour: a
fast-generator parameter without a gradient (DeepGenerator's unused ``l1``) gives a zero meta
gradient; z_meta's FOMAML gradient is the adapted z's gradient (``z_meta_grad="grad"``) or,
as upstream writes it, the adapted z's value (``"value"``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from reference_loops import RefHook, ref_adv


class RefFastMetaImageNet:
    def __init__(self, teacher, student, generator, nz, num_classes, img_size, iterations, lr_g, lr_z,
                 lr_g_meta, lr_z_meta, batch, adv, bn, oh, normalizer, rng, reinit=0, bn_mmt=0.0, is_maml=1,
                 z_meta_grad="grad"):
        self.teacher, self.student, self.generator = teacher, student, generator
        self.nz, self.num_classes, self.img_size = nz, num_classes, img_size
        self.iterations, self.lr_g, self.lr_z = iterations, lr_g, lr_z
        self.lr_g_meta, self.lr_z_meta = lr_g_meta, lr_z_meta
        self.batch, self.adv, self.bn, self.oh = batch, adv, bn, oh
        self.normalizer, self.rng = normalizer, rng
        self.reinit, self.bn_mmt, self.ismaml, self.z_meta_grad = reinit, bn_mmt, is_maml, z_meta_grad
        self.hooks = [RefHook(m, bn_mmt) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        self.ep = 0
        self.losses = []
        self._new_meta()

    def _new_meta(self):
        shape = (self.batch, self.nz, self.img_size[-2] // 16, self.img_size[-1] // 16)
        self.z = torch.randn(shape, generator=self.rng).requires_grad_()
        self.meta_optimizer = torch.optim.Adam([{"params": self.generator.parameters()},
                                                {"params": [self.z], "lr": self.lr_z_meta}],
                                               lr=self.lr_g_meta, betas=[0.5, 0.999])

    def synthesize(self, targets):
        self.ep += 1
        self.student.eval()
        self.teacher.eval()
        self.generator.train()
        if self.reinit > 0 and self.ep % self.reinit == 0:
            self._new_meta()
        z = self.z.detach().requires_grad_()  # shares self.z's storage: the inner steps move z_meta too
        fast = self.generator.clone().train()
        optimizer = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": self.lr_z}],
                                     lr=self.lr_g, betas=[0.5, 0.999])
        for it in range(self.iterations):
            inputs = fast(z)
            inputs_aug = self.normalizer(inputs)
            if it == 0:
                meta = inputs
            t_out = self.teacher(inputs_aug)
            loss_bn = sum(h.r_feature for h in self.hooks)
            loss_oh = F.cross_entropy(t_out, targets)
            if self.adv > 0:
                loss_adv = ref_adv(self.student(inputs_aug), t_out)
            else:
                loss_adv = loss_oh.new_zeros(1)
            loss = self.bn * loss_bn + self.oh * loss_oh + self.adv * loss_adv
            self.losses.append(float(loss.detach()))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if self.bn_mmt != 0:
            for h in self.hooks:
                h.update_mmt()
        self.meta_optimizer.zero_grad()
        if self.ismaml:
            for p, q in zip(self.generator.parameters(), fast.parameters()):
                p.grad = torch.zeros_like(p) if q.grad is None else q.grad.clone()
            self.z.grad = (z.grad if self.z_meta_grad == "grad" else z.data).clone()
        else:
            for p, q in zip(self.generator.parameters(), fast.parameters()):
                p.grad = p.data - q.data
            self.z.grad = self.z.data - z.data
        self.meta_optimizer.step()
        self.fast = fast
        return ({"synthetic": inputs.detach(), "meta": meta.detach()},
                {"loss_bn": float(loss_bn.detach()), "loss_oh": float(loss_oh.detach())})
