"""Eager reference implementations of the upstream synthesis loops, in the upstream style
(forward hooks computing the BN loss, separate losses, ``.item()`` best tracking every step, a
fresh Adam per call, generator copies): the loops the equivalence tests compare fastsynth's
synthesizers with, and the loops the synthesis benchmarks time them against.

Augmentation is left out by default (the equivalence tests run the fastsynth synthesizers with
``augment=False``, so both sides draw the same random numbers in the same order); ``RefFast``
takes the upstream augmentation (``aug``, e.g. ``upstream_augment``) for the benchmarks.
``UpstreamNormalizer`` is upstream's normaliser (mean/std tensors built per call).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RefDeepInv", "RefFast", "RefFastMetaImageNet", "RefGenerative", "RefHook", "RefNayer", "ReturnFeatures",
           "UpstreamNormalizer", "max_rel_err", "ref_adv", "ref_reset_l0", "ref_total_loss", "ref_tv",
           "ref_update_mmt", "upstream_augment", "upstream_jsdiv", "upstream_kldiv"]


class RefHook:
    """DeepInversion BN hook, momentum variant included."""

    def __init__(self, module, mmt_rate):
        self.hook = module.register_forward_hook(self.hook_fn)
        self.mmt_rate = mmt_rate
        self.mmt = None
        self.tmp_val = None

    def hook_fn(self, module, inputs, output):
        a = inputs[0]
        nch = a.shape[1]
        mean = a.mean([0, 2, 3])
        var = a.permute(1, 0, 2, 3).contiguous().view(nch, -1).var(1, unbiased=False)
        if self.mmt is None:
            r = torch.norm(module.running_var - var, 2) + torch.norm(module.running_mean - mean, 2)
        else:
            mm, mv = self.mmt
            rho = self.mmt_rate
            r = torch.norm(module.running_var - (1 - rho) * var - rho * mv, 2) + \
                torch.norm(module.running_mean - (1 - rho) * mean - rho * mm, 2)
        self.r_feature = r
        self.tmp_val = (mean, var)

    def update_mmt(self):
        mean, var = self.tmp_val
        if self.mmt is None:
            self.mmt = (mean.data, var.data)
        else:
            mm, mv = self.mmt
            self.mmt = (self.mmt_rate * mm + (1 - self.mmt_rate) * mean.data,
                        self.mmt_rate * mv + (1 - self.mmt_rate) * var.data)

    def remove(self):
        self.hook.remove()


def upstream_kldiv(logits, targets, T=1.0, reduction="batchmean"):
    q = F.log_softmax(logits / T, dim=1)
    p = F.softmax(targets / T, dim=1)
    return F.kl_div(q, p, reduction=reduction) * (T * T)


def upstream_jsdiv(logits, targets, T=1.0, reduction="batchmean"):
    P = F.softmax(logits / T, dim=1)
    Q = F.softmax(targets / T, dim=1)
    M = 0.5 * (P + Q)
    P = torch.clamp(P, 0.01, 0.99)
    Q = torch.clamp(Q, 0.01, 0.99)
    M = torch.clamp(M, 0.01, 0.99)
    return 0.5 * F.kl_div(torch.log(P), M, reduction=reduction) + 0.5 * F.kl_div(torch.log(Q), M, reduction=reduction)


def ref_adv(s_out, t_out):
    mask = (s_out.max(1)[1] == t_out.max(1)[1]).float()
    return -(upstream_kldiv(s_out, t_out, reduction="none").sum(1) * mask).mean()


def ref_total_loss(ref, inputs_aug, t_out, loss_oh, adv_on):
    """The upstream total ``bn * L_BN + oh * L_oh + adv * L_adv`` of ``ref``'s last teacher forward
    (the student's forward only with ``adv_on``), recorded in ``ref.losses`` with ``.item()``.
    Returns ``(loss, loss_bn)``."""
    loss_bn = sum(h.r_feature for h in ref.hooks)
    loss_adv = ref_adv(ref.student(inputs_aug), t_out) if adv_on else loss_oh.new_zeros(1)
    loss = ref.bn * loss_bn + ref.oh * loss_oh + ref.adv * loss_adv
    ref.losses.append(loss.item())
    return loss, loss_bn


def ref_update_mmt(ref):
    """End of a round: the momentum statistics of ``ref``'s BN hooks, when ``ref.bn_mmt`` is set."""
    if ref.bn_mmt != 0:
        for h in ref.hooks:
            h.update_mmt()


class UpstreamNormalizer:
    """Upstream's ``Normalizer(mean, std)(x, reverse=False)``: the mean/std tensors built on every
    call."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, x, reverse=False):
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)[None, :, None, None]
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device)[None, :, None, None]
        return x * std + mean if reverse else (x - mean) / std


def upstream_augment(normalizer, pad=4):
    """Upstream's training augmentation as kornia computes it: RandomCrop(padding) +
    RandomHorizontalFlip (pad, then one affine warp of the batch), then ``normalizer``."""

    def aug(x):
        B, C, H, W = x.shape
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (B,), device=x.device).float()
        ox = torch.randint(0, 2 * pad + 1, (B,), device=x.device).float()
        flip = (torch.rand(B, device=x.device) < 0.5).float() * -2 + 1
        Hp, Wp = H + 2 * pad, W + 2 * pad
        theta = torch.zeros(B, 2, 3, device=x.device)
        theta[:, 0, 0] = flip * W / Wp
        theta[:, 1, 1] = H / Hp
        theta[:, 0, 2] = (2 * ox + W - Wp) / Wp
        theta[:, 1, 2] = (2 * oy + H - Hp) / Hp
        grid = F.affine_grid(theta, (B, C, H, W), align_corners=False)
        return normalizer(F.grid_sample(xp, grid, mode="bilinear", padding_mode="zeros", align_corners=False))

    return aug


def ref_reset_l0(model):
    for n, m in model.named_modules():
        if n == "l1.0" or n == "conv_blocks.0":
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.constant_(m.bias, 0)


class RefFast:
    """FastDFKD loop: meta=True is FastMetaSynthesizer (MAML / Reptile), meta=False FastSynthesizer.

    ``synthesize()`` is one round: ``begin()``, ``iterations`` times ``step()``, ``end()`` (the
    benchmarks time ``step()`` inside an open round). ``aug``: the augmentation + normalisation
    of the teacher's input (default ``normalizer``: no augmentation). ``device``: where z and the
    targets are drawn (default: the CPU generator, as the equivalence tests draw them)."""

    def __init__(self, teacher, student, generator, nz, num_classes, iterations, lr_g, lr_z, batch,
                 adv, bn, oh, normalizer, warmup, reset_l0=0, bn_mmt=0.0, is_maml=1, meta=True, aug=None,
                 device=None):
        self.teacher, self.student, self.generator = teacher, student, generator
        self.nz, self.num_classes, self.iterations = nz, num_classes, iterations
        self.lr_g, self.lr_z, self.batch = lr_g, lr_z, batch
        self.adv, self.bn, self.oh = adv, bn, oh
        self.normalizer, self.ep_start, self.reset_l0 = normalizer, warmup, reset_l0
        self.aug = normalizer if aug is None else aug
        self.bn_mmt, self.is_maml, self.meta, self.device = bn_mmt, is_maml, meta, device
        self.ep = 0
        self.hooks = [RefHook(m, bn_mmt) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        self.meta_optimizer = torch.optim.Adam(generator.parameters(), lr_g * iterations, betas=[0.5, 0.999])
        self.losses = []

    def begin(self):
        self.ep += 1
        self.student.eval()
        self.teacher.eval()
        self.best_cost, self.best_inputs, self.it = 1e6, None, 0
        if self.meta and self.ep == 120 + self.ep_start and self.reset_l0:
            ref_reset_l0(self.generator)
        self.z = torch.randn(size=(self.batch, self.nz), device=self.device).requires_grad_()
        self.targets = torch.randint(low=0, high=self.num_classes, size=(self.batch,), device=self.device)
        self.fast = copy.deepcopy(self.generator) if self.meta else self.generator
        self.opt = torch.optim.Adam([{"params": self.fast.parameters()}, {"params": [self.z], "lr": self.lr_z}],
                                    lr=self.lr_g, betas=[0.5, 0.999])

    def step(self):
        it = self.it
        inputs = self.fast(self.z)
        inputs_aug = self.aug(inputs)
        t_out = self.teacher(inputs_aug)
        loss_oh = F.cross_entropy(t_out, self.targets)
        loss, _ = ref_total_loss(self, inputs_aug, t_out, loss_oh, self.adv > 0 and self.ep >= self.ep_start)
        with torch.no_grad():
            if self.best_cost > loss.item() or self.best_inputs is None:
                self.best_cost = loss.item()
                self.best_inputs = inputs.data
        self.opt.zero_grad()
        loss.backward()
        if self.meta and self.is_maml:
            if it == 0:
                self.meta_optimizer.zero_grad()
            for p, q in zip(self.generator.parameters(), self.fast.parameters()):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.data.add_(q.grad.data)
            if it == self.iterations - 1:
                self.meta_optimizer.step()
        self.opt.step()
        self.it += 1

    def end(self):
        ref_update_mmt(self)
        if self.meta and not self.is_maml:
            self.meta_optimizer.zero_grad()
            for p, q in zip(self.generator.parameters(), self.fast.parameters()):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.data.add_(p.data - q.data, alpha=67)
            self.meta_optimizer.step()
        self.student.train()
        return self.best_inputs

    def synthesize(self):
        self.begin()
        for _ in range(self.iterations):
            self.step()
        return self.end()


class RefNayer:
    """NAYER loop; the student stays in eval() in every loop (fastsynth semantics,
    see fastsynth/synthesis/nayer.py)."""

    def __init__(self, teacher, student, generator, num_classes, g_steps, lr_g, batch, adv, bn, oh,
                 normalizer, warmup, bn_mmt, g_life, g_loops, gwp_loops):
        self.teacher, self.student, self.generator = teacher, student, generator
        self.num_classes, self.g_steps, self.lr_g, self.batch = num_classes, g_steps, lr_g, batch
        self.adv, self.bn, self.oh, self.normalizer = adv, bn, oh, normalizer
        self.ep_start, self.bn_mmt, self.g_life = warmup, bn_mmt, g_life
        self.g_loops, self.gwp_loops = g_loops, gwp_loops
        self.ep = 0
        self.hooks = [RefHook(m, bn_mmt) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        self.losses = []

    def targets(self):
        s = self.batch // self.num_classes
        v = self.batch % self.num_classes
        target = torch.randint(self.num_classes, (v,))
        for _ in range(s):
            target = torch.cat((torch.tensor(range(0, self.num_classes)), target))
        ys = torch.zeros(self.batch, self.num_classes)
        ys.scatter_(1, target.unsqueeze(1), 1.0)
        return target, ys

    def synthesize(self):
        self.student.eval()
        self.teacher.eval()
        best_cost, best_oh = 1e6, 1e6
        if (self.ep - self.ep_start) % self.g_life == 0 or self.ep % self.g_life == 0:
            self.generator = self.generator.reinit()
        loops = self.gwp_loops if self.ep < self.ep_start else self.g_loops
        self.ep += 1
        if loops == 0:
            return None, 0, 0, 0
        bi_list = []
        for _ in range(loops):
            best_inputs = None
            self.generator.re_init_le()
            targets, ys = self.targets()
            opt = torch.optim.Adam([{"params": self.generator.parameters()}], lr=self.lr_g, betas=[0.5, 0.999])
            for it in range(self.g_steps):
                inputs = self.generator(targets=targets)
                inputs_aug = self.normalizer(inputs)
                t_out = self.teacher(inputs_aug)
                loss_oh = torch.mean(torch.sum(-ys * t_out.log_softmax(dim=-1), dim=-1))
                loss, _ = ref_total_loss(self, inputs_aug, t_out, loss_oh, self.adv > 0 and self.ep > self.ep_start)
                if loss_oh.item() < best_oh:
                    best_oh = loss_oh
                with torch.no_grad():
                    if best_cost > loss.item() or best_inputs is None:
                        best_cost = loss.item()
                        best_inputs = inputs.data
                opt.zero_grad()
                loss.backward()
                opt.step()
            ref_update_mmt(self)
            bi_list.append(best_inputs)
        self.student.train()
        return {"synthetic": bi_list}, 0.0, best_cost, best_oh


def ref_tv(x):
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return (d1.abs() / 255.0).mean() * 255.0 + (d2.abs() / 255.0).mean() * 255.0 + \
        (d3.abs() / 255.0).mean() * 255.0 + (d4.abs() / 255.0).mean() * 255.0


class RefDeepInv:
    """DataFree DeepInversion loop without jitter (fastsynth is run with augment=False), with
    NVlabs' ImageNet options in NVlabs' form: ``first_bn_multiplier`` (the ``rescale`` list of
    the BN hooks), ``tv_l2`` and ``l2_scale`` (``get_image_prior_losses``' TV-L2 and the mean
    per-image norm), ``lowres_iterations`` (setting 0: ``AvgPool2d(2)`` of the images for the
    first iterations, a new Adam for full resolution) and ``adi_scale`` (``1 - clamp(JS, 0, 1)``);
    the best images are tracked afresh at full resolution."""

    def __init__(self, teacher, student, num_classes, img_size, iterations, lr_g, batch, adv, bn, oh, tv, l2,
                 normalizer, *, first_bn_multiplier=1.0, tv_l2=0.0, l2_scale=0.0, lowres_iterations=0,
                 adi_scale=0.0, device=None):
        self.device = device
        self.first_bn_multiplier, self.tv_l2, self.l2_scale = first_bn_multiplier, tv_l2, l2_scale
        self.lowres_iterations, self.adi_scale = lowres_iterations, adi_scale
        self.teacher, self.student = teacher, student
        self.num_classes, self.img_size, self.iterations, self.lr_g = num_classes, img_size, iterations, lr_g
        self.batch, self.adv, self.bn, self.oh, self.tv, self.l2 = batch, adv, bn, oh, tv, l2
        self.normalizer = normalizer
        self.hooks = [RefHook(m, 0) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        self.s_hooks = [RefHook(m, 0) for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
        self.losses = []

    def synthesize(self):
        self.student.eval()
        inputs = torch.randn(size=[self.batch, *self.img_size], device=self.device).requires_grad_()
        targets = torch.randint(low=0, high=self.num_classes, size=(self.batch,), device=self.device).sort()[0]
        opt = torch.optim.Adam([inputs], self.lr_g, betas=[0.5, 0.99])
        best_cost, best_inputs = 1e6, None
        mean = torch.tensor(self.normalizer.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.normalizer.std, device=self.device).view(1, -1, 1, 1)
        pooling = nn.AvgPool2d(kernel_size=2)
        for it in range(self.iterations):
            if it == self.lowres_iterations and it > 0:
                opt = torch.optim.Adam([inputs], self.lr_g, betas=[0.5, 0.99])
                best_cost, best_inputs = 1e6, None
            inputs_jit = pooling(inputs) if it < self.lowres_iterations else inputs
            t_out = self.teacher(inputs_jit)
            s_out = self.student(inputs_jit)
            js = upstream_jsdiv(s_out, t_out, T=3)
            loss_adv = -js
            rescale = [self.first_bn_multiplier] + [1.0] * (len(self.hooks) - 1)
            loss_bn = sum(h.r_feature * rescale[i] for i, h in enumerate(self.hooks)) - \
                0.001 * sum(h.r_feature for h in self.s_hooks)
            loss_oh = F.cross_entropy(t_out, targets)
            loss = self.bn * loss_bn + self.oh * loss_oh + self.adv * loss_adv + \
                self.tv * ref_tv(inputs) + self.l2 * torch.norm(inputs, 2)
            d1 = inputs_jit[:, :, :, :-1] - inputs_jit[:, :, :, 1:]
            d2 = inputs_jit[:, :, :-1, :] - inputs_jit[:, :, 1:, :]
            d3 = inputs_jit[:, :, 1:, :-1] - inputs_jit[:, :, :-1, 1:]
            d4 = inputs_jit[:, :, :-1, :-1] - inputs_jit[:, :, 1:, 1:]
            loss = loss + self.tv_l2 * (torch.norm(d1) + torch.norm(d2) + torch.norm(d3) + torch.norm(d4))
            loss = loss + self.l2_scale * torch.norm(inputs_jit.view(self.batch, -1), dim=1).mean()
            if self.adi_scale != 0:
                loss = loss + self.adi_scale * (1.0 - torch.clamp(js, 0.0, 1.0))
            self.losses.append(loss.item())
            if best_cost > loss.item() or best_inputs is None:
                best_cost = loss.item()
                best_inputs = inputs.detach().clone()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                inputs.data = torch.max(torch.min(inputs.data, (1 - mean) / std), -mean / std)
        self.student.train()
        return self.normalizer(best_inputs, True)


def max_rel_err(a, b):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-6)).max())



class ReturnFeatures(nn.Module):
    """A classifier with the upstream model zoo's ``forward(x, return_features=False)``: with
    ``return_features=True`` it returns ``(logits, features)``, the features being the input of
    its last ``nn.Linear`` (where the upstream ResNets / WRNs / VGGs take them). Wraps ``model``
    (same parameters and buffers)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]

    def forward(self, x, return_features=False):
        if not return_features:
            return self.model(x)
        seen = []
        h = self.fc.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
        try:
            out = self.model(x)
        finally:
            h.remove()
        return out, seen[-1]


class RefGenerative:
    """zju-vipa/Fast-Datafree ``GenerativeSynthesizer`` loop (DAFL / ZSKT / DFQ / DFAD settings):
    DeepInversion hooks (momentum 0) on every teacher BN, every loss term computed and scaled,
    one Adam(lr_g, (0.5, 0.999)) over the generator for the synthesizer's lifetime, teacher and
    student weights requiring grad as upstream leaves them. ``teacher`` must take
    ``return_features=True`` (wrap it in ``ReturnFeatures``)."""

    def __init__(self, teacher, student, generator, nz, iterations, lr_g, batch, sample_batch, adv, bn, oh, act,
                 balance, criterion, normalizer, device=None):
        self.teacher, self.student, self.generator = teacher, student, generator.train()
        self.nz, self.iterations, self.batch, self.sample_batch = nz, iterations, batch, sample_batch
        self.adv, self.bn, self.oh, self.act, self.balance = adv, bn, oh, act, balance
        self.criterion = criterion if criterion is not None else upstream_kldiv
        self.normalizer, self.device = normalizer, device
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=lr_g, betas=(0.5, 0.999))
        self.hooks = [RefHook(m, 0) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        self.losses = []

    def step(self):
        self.optimizer.zero_grad()
        z = torch.randn(size=(self.batch, self.nz), device=self.device)
        inputs = self.normalizer(self.generator(z))
        t_out, t_feat = self.teacher(inputs, return_features=True)
        loss_bn = sum([h.r_feature for h in self.hooks])
        loss_oh = F.cross_entropy(t_out, t_out.max(1)[1])
        loss_act = -t_feat.abs().mean()
        if self.adv > 0:
            s_out = self.student(inputs)
            loss_adv = -self.criterion(s_out, t_out)
        else:
            loss_adv = loss_oh.new_zeros(1)
        p = F.softmax(t_out, dim=1).mean(0)
        loss_balance = (p * torch.log(p)).sum()
        loss = self.bn * loss_bn + self.oh * loss_oh + self.adv * loss_adv + self.balance * loss_balance + \
            self.act * loss_act
        self.losses.append(loss.item())
        loss.backward()
        self.optimizer.step()
        return inputs

    def synthesize(self):
        self.student.eval()
        self.generator.train()
        self.teacher.eval()
        for _ in range(self.iterations):
            inputs = self.step()
        return {"synthetic": self.normalizer(inputs.detach(), reverse=True)}

    @torch.no_grad()
    def sample(self):
        z = torch.randn(size=(self.sample_batch, self.nz), device=self.device)
        return self.normalizer(self.generator(z))


class RefFastMetaImageNet:
    """Upstream's ImageNet FastMeta loop (zju-vipa/Fast-Datafree
    ``FastMetaSynthesizerForImageNet.synthesize``), written from its behaviour in the upstream style:
    BN forward hooks computing the loss on every teacher forward, separate losses, teacher/student
    weights that keep requires_grad, ``generator.clone()`` and fresh Adams per round, ``.item()``
    losses. Augmentation is left out (fastsynth runs with ``augment=False``: normalisation only).

    Where upstream does not run (see the fastsynth class docstring), the intended behaviour: a
    fast-generator parameter without a gradient (DeepGenerator's unused ``l1``) gives a zero meta
    gradient; z_meta's FOMAML gradient is the adapted z's gradient (``z_meta_grad="grad"``) or,
    as upstream writes it, the adapted z's value (``"value"``)."""

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
            loss_oh = F.cross_entropy(t_out, targets)
            loss, loss_bn = ref_total_loss(self, inputs_aug, t_out, loss_oh, self.adv > 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        ref_update_mmt(self)
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
