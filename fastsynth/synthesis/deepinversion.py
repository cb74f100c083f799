"""DeepInversion synthesizer of the DataFree toolbox (``DeepInvSyntheiszer``, sic); eager
reference: ``fastsynth/bench/reference_loops.py``.

One synthesize() call optimises the images themselves (normalised space), starting from
N(0, I), with Adam(lr_g, betas (0.5, 0.99)) for ``iterations`` steps of

    bn * (L_BN(teacher) - 0.001 * L_BN(student)) + oh * CE(t, y) + adv * (-JS_3(s, t))
      + tv * TV(x) + l2 * ||x||_2

on a batch-wide random jitter (roll by up to 1/8 of the size) and flip of the images; after
each step the images are clipped to the normalised image of [0, 1]. The lowest-loss images
(pre-step) are returned de-normalised: ``({"synthetic": x}, seconds)``.

The student's BN term needs a student forward, which runs only when ``adv > 0`` (as upstream;
with ``adv == 0`` upstream fails on an undefined name, here the term is simply absent). The
jitter offsets are drawn on the device (upstream: Python ``random``).

NVlabs' ImageNet options (NVlabs/DeepInversion ``DeepInversionClass``), keyword-only, all off by
default so the DataFree behaviour above is unchanged:

- ``first_bn_multiplier``: the first teacher BN layer's term is weighted by it (NVlabs: 10), the
  others by 1 (a per-layer weight vector of the fused BN loss);
- ``tv_l2``: + tv_l2 * sum over the 4 neighbour directions of ||difference||_2 (TV-L2 prior);
- ``l2_scale``: + l2_scale * mean over images of ||image||_2 (NVlabs' ``l2``; the DataFree ``l2``
  above is the norm of the whole batch);
- ``lowres_iterations``: multi-resolution warm-up (NVlabs setting 0): the first
  ``lowres_iterations`` of the ``iterations`` steps see the images average-pooled 2x2 (the jitter
  range scales with the pooled size); at the switch to full resolution the Adam state starts
  afresh (NVlabs builds a new optimizer per resolution) and the best-image tracking restarts
  (a low-resolution loss is no measure of the full-resolution images);
- ``adi_scale``: Adaptive DeepInversion's competition term + adi_scale * (1 - clamp(JS_3(s, t),
  0, 1)) with the student's logits on the same batch.

As NVlabs, the TV-L2 and per-image L2 priors and the competition term are computed on the batch
the teacher sees (pooled, jittered, flipped); the DataFree ``tv``/``l2`` terms stay on the images.
NVlabs' other settings (its cosine learning-rate schedule, setting 2's betas and no clipping,
fp16 via apex) are not options here.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.logit_losses import js_divergence
from .augment import jitter_codes, jitter_flip
from ..distributed import unwrap
from .core import BNCapture, SynthCore, global_stats_hook
from .util import make_adam, now, nvtx_range, warn_once
from .validate import check_synthesizer_args


def image_prior_tv_l2(x: torch.Tensor) -> torch.Tensor:
    """NVlabs' TV-L2 prior: the L2 norms of the differences over 4 neighbour directions, summed."""
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return torch.linalg.vector_norm(d1) + torch.linalg.vector_norm(d2) + torch.linalg.vector_norm(d3) + \
        torch.linalg.vector_norm(d4)


def image_prior_tv(x: torch.Tensor) -> torch.Tensor:
    """Upstream total variation: mean |difference| over 4 neighbour directions, summed."""
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return d1.abs().mean() + d2.abs().mean() + d3.abs().mean() + d4.abs().mean()


class DeepInvSyntheiszer(SynthCore):
    """Drop-in ``DeepInvSyntheiszer`` (the upstream spelling); alias ``DeepInversionSynthesizer``.

    A student without BatchNorm layers is accepted: its BN term is 0, as upstream (an empty sum).
    ``num_workers=`` (passed by upstream forks) is accepted and ignored. Raises at construction
    when ``iterations`` < 0 or ``num_classes`` exceeds the teacher's outputs."""

    def __init__(self, teacher, student, num_classes, img_size,
                 iterations=1000, lr_g=0.1, progressive_scale=False,
                 synthesis_batch_size=128, sample_batch_size=128,
                 adv=0.0, bn=1, oh=1, tv=1e-5, l2=0.0,
                 save_dir='run/deepinversion', transform=None,
                 normalizer=None, device='cpu',
                 autocast=None, use_fp16=False, distributed=False, *,
                 augment=True, pool_capacity=None, pool_eviction="fifo", save_images=False,
                 save_format="shard", fuse_teacher=True, seed=None, compile=False, cuda_graph=False,
                 aug_padding=4, aug_flip=None, num_workers=None,
                 first_bn_multiplier=1.0, tv_l2=0.0, l2_scale=0.0, lowres_iterations=0, adi_scale=0.0,
                 bn_stats="global", pool_device=None, pool_dir=None):
        super().__init__(teacher, student)
        # upstream runs 0 iterations too (it returns the initial noise)
        img_size = check_synthesizer_args(
            type(self).__name__, teacher=teacher, num_classes=num_classes, img_size=img_size,
            steps=("iterations", iterations, 0), batch=synthesis_batch_size)
        self.iterations = iterations
        self.lr_g = lr_g
        self.progressive_scale = progressive_scale
        self.synthesis_batch_size = synthesis_batch_size
        self.sample_batch_size = sample_batch_size
        self.adv = adv
        self.bn = bn
        self.oh = oh
        self.tv = tv
        self.l2 = l2
        self.num_classes = num_classes
        self.distributed = distributed
        for name, v in (("first_bn_multiplier", first_bn_multiplier), ("tv_l2", tv_l2), ("l2_scale", l2_scale),
                        ("adi_scale", adi_scale)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"{type(self).__name__}: {name} must be a finite number, got {v!r}")
        if isinstance(lowres_iterations, bool) or not isinstance(lowres_iterations, int) or \
                not 0 <= lowres_iterations <= iterations:
            raise ValueError(f"{type(self).__name__}: lowres_iterations must be an int in [0, iterations="
                             f"{iterations}], got {lowres_iterations!r}")
        if lowres_iterations and min(img_size[-2:]) < 2:
            raise ValueError(f"{type(self).__name__}: lowres_iterations needs images of at least 2x2 "
                             f"(2x2 average pooling), got img_size {tuple(img_size)}")
        self.tv_l2 = float(tv_l2)
        self.l2_scale = float(l2_scale)
        self.lowres_iterations = lowres_iterations
        self.adi_scale = float(adi_scale)
        self.first_bn_multiplier = float(first_bn_multiplier)
        bn_weights = None
        if self.first_bn_multiplier != 1.0:
            # one weight per teacher BN layer, in module order (the order of the fused BN loss)
            n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in teacher.modules())
            bn_weights = [self.first_bn_multiplier] + [1.0] * (n_bn - 1) if n_bn else None
        if cuda_graph:
            # the images are re-bound each call and clipped in place; the loop stays eager
            warn_once("deepinv_cuda_graph", "fastsynth: DeepInvSyntheiszer does not capture CUDA graphs "
                      "(its images are re-bound every call); cuda_graph=True runs the loop eagerly")
            cuda_graph = False
        self._setup_core(img_size=img_size, normalizer=normalizer, device=device, bn_mmt=0,
                         transform=transform, autocast=autocast, use_fp16=use_fp16, save_dir=save_dir,
                         save_images=save_images, save_format=save_format, pool_capacity=pool_capacity,
                         pool_eviction=pool_eviction, augment=augment, fuse_teacher=fuse_teacher, seed=seed,
                         compile=compile, cuda_graph=False, aug_padding=aug_padding,
                         aug_flip=True if aug_flip is None else aug_flip, bn_weights=bn_weights,
                         bn_stats=bn_stats, pool_device=pool_device, pool_dir=pool_dir)
        # the student's BN term (-0.001 * its BN loss); without BatchNorm layers the term is 0,
        # as upstream's empty sum over student hooks
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.student.modules())
        self.s_capture = BNCapture(unwrap(self.student), fuse=False) if has_bn else None
        if self.s_capture is not None and self._global_stats:
            self.s_capture.stats_hook = global_stats_hook
        self._augment_on = augment
        self._js = js_divergence
        if normalizer is not None:
            mean = torch.as_tensor(normalizer.mean, dtype=torch.float32)
            std = torch.as_tensor(normalizer.std, dtype=torch.float32)
            self._lo = (-mean / std).view(1, -1, 1, 1).to(self.device)
            self._hi = ((1 - mean) / std).view(1, -1, 1, 1).to(self.device)
        else:
            self._lo = self._hi = None

    def _forward(self, inputs, targets, adv_on, aug_codes=None, lowres=False):
        x = F.avg_pool2d(inputs, 2) if lowres else inputs
        x_aug = jitter_flip(x, generator=self._rng, codes=aug_codes) if self._augment_on else x
        adi_on = self.adi_scale != 0
        with nvtx_range("teacher", self._nvtx):
            t_out = self.teacher(x_aug)
        with nvtx_range("losses", self._nvtx):
            loss_bn = self.capture.loss()
            if adv_on or adi_on:
                with nvtx_range("student", self._nvtx):
                    s_out = unwrap(self.student)(x_aug)  # never a DDP wrapper's forward
                js = self._js(s_out, t_out, T=3)
            if adv_on and self.s_capture is not None:
                loss_bn = loss_bn - 0.001 * self.s_capture.loss()
            loss_oh = F.cross_entropy(t_out, targets)
            loss = self.bn * loss_bn + self.oh * loss_oh
            if adv_on:
                loss = loss + self.adv * (-js)
            if adi_on:
                loss = loss + self.adi_scale * (1.0 - js.clamp(0.0, 1.0))
            if self.tv != 0:
                loss = loss + self.tv * image_prior_tv(inputs)
            if self.l2 != 0:
                loss = loss + self.l2 * torch.norm(inputs, 2)
            if self.tv_l2 != 0:
                loss = loss + self.tv_l2 * image_prior_tv_l2(x_aug)
            if self.l2_scale != 0:
                loss = loss + self.l2_scale * torch.linalg.vector_norm(x_aug.flatten(1), dim=1).mean()
        return loss

    def synthesize(self, targets=None):
        start = now()
        inputs = self._randn(self.synthesis_batch_size, *self.img_size).requires_grad_()
        if targets is None:
            targets = self._randint(self.num_classes, (self.synthesis_batch_size,))
            targets = targets.sort()[0]
        targets = targets.to(self.device)
        adv_on = self.adv > 0
        opt = [make_adam([inputs], self.lr_g, (0.5, 0.99), self.device)]
        best_cost = torch.full((), float("inf"), device=self.device)
        best_x = inputs.detach().clone()
        fwd = self._maybe_compiled(("fwd", adv_on), self._forward)
        H, W = self.img_size[-2:]

        def step(it):
            lowres = it < self.lowres_iterations
            if it == self.lowres_iterations and it > 0:
                # full resolution after the warm-up: fresh Adam state (NVlabs builds a new
                # optimizer per resolution), best tracking restarts below (first=True)
                opt[0] = make_adam([inputs], self.lr_g, (0.5, 0.99), self.device)
            # the jitter's random code is drawn outside the compiled forward
            aug_codes = jitter_codes((H // 2, W // 2) if lowres else (H, W), self.device, self._rng) \
                if self._augment_on else None
            with self._autocast_ctx():
                loss = fwd(inputs, targets, adv_on, aug_codes, lowres)
            with torch.no_grad():
                self._log(loss)
                self._track_best(loss, inputs, best_cost, best_x, first=(it == 0 or it == self.lowres_iterations))
            with nvtx_range("backward", self._nvtx):
                self._backward(loss, opt[0])
            with nvtx_range("step", self._nvtx):
                opt[0].step()
            if self._lo is not None:
                with torch.no_grad():
                    torch.maximum(inputs, self._lo, out=inputs)
                    torch.minimum(inputs, self._hi, out=inputs)

        with self._synthesis_mode():
            if adv_on and self.s_capture is not None:
                self.s_capture.activate()
            try:
                # eager steps (cuda_graph is off: the images are re-bound every call)
                self._run_steps(self.iterations, step)
            finally:
                if self.s_capture is not None:
                    self.s_capture.deactivate()
        if self.normalizer is not None:
            best_x = self.normalizer(best_x, True)
        self._sync()
        end = now()
        self._add_to_pool([(best_x, best_cost)])
        return {"synthetic": best_x}, end - start


DeepInversionSynthesizer = DeepInvSyntheiszer
