"""Workloads shared by the profiler and the performance model: the CIFAR ResNet-34 teacher /
ResNet-18 student / FastDFKD generator configuration and one synthesis step of it."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def fastdfkd_generator(nz: int = 256, ngf: int = 64, img_size: int = 32, nc: int = 3) -> nn.Module:
    from fastsynth.nn import Generator

    return Generator(nz=nz, ngf=ngf, img_size=img_size, nc=nc)


@contextlib.contextmanager
def phase(name: str, device="cpu"):
    """A named phase: a ``record_function`` range in torch.profiler traces and, on a GPU, an
    NVTX range for Nsight Systems."""
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if on_gpu:
            torch.cuda.nvtx.range_pop()


class SynthesisStep:
    """One FastDFKD-style synthesis step written with fastsynth's ops where they exist:

    generator forward -> batched augmentation (flip) + normalisation -> teacher forward, BN
    inputs collected by hooks that only keep references -> BN-statistics loss (fused multi-layer
    op when available, else per-layer ``var_mean`` + ``loss_from_stats``) -> student forward ->
    logit losses (``synthesis_logit_loss`` when available, else eager CE + masked KL) ->
    backward -> Adam step. Teacher and student weights are frozen (no weight gradients).
    """

    def __init__(self, teacher, student, generator, *, batch: int, nz: int, num_classes: int,
                 device="cpu", bn=10.0, oh=0.5, adv=1.33, lr_g=5e-3, lr_z=0.015, seed: int = 0):
        self.device = torch.device(device)
        self.teacher = teacher.to(self.device).eval()
        self.student = student.to(self.device).eval()
        self.generator = generator.to(self.device).train()
        for p in list(self.teacher.parameters()) + list(self.student.parameters()):
            p.requires_grad_(False)
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.z = torch.randn(batch, nz, generator=g).to(self.device).requires_grad_(True)
        self.targets = torch.randint(num_classes, (batch,), generator=g).to(self.device)
        self.bn, self.oh, self.adv = bn, oh, adv
        self.bn_layers = [m for m in self.teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        self._feats: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._keep_input) for m in self.bn_layers]
        self.mean = torch.tensor(CIFAR_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(CIFAR_STD, device=self.device).view(1, 3, 1, 1)
        self.opt = torch.optim.Adam([{"params": self.generator.parameters()},
                                     {"params": [self.z], "lr": lr_z}], lr_g, betas=(0.5, 0.999))

    def _keep_input(self, module, inputs, output):
        self._feats.append(inputs[0])

    def remove(self):
        for h in self._handles:
            h.remove()

    def bn_loss(self) -> torch.Tensor:
        from fastsynth import ops

        feats, self._feats = self._feats, []
        rms = [m.running_mean for m in self.bn_layers]
        rvs = [m.running_var for m in self.bn_layers]
        loss, _means, _vars = ops.bn_stat_loss_multi(feats, rms, rvs)
        return loss

    def logit_loss(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        from fastsynth import ops

        loss, _parts = ops.synthesis_logit_loss(t, s, self.targets, oh=self.oh, adv=self.adv)
        return loss

    def __call__(self) -> torch.Tensor:
        dev = self.device
        with phase("generator", dev):
            x = self.generator(self.z)
        with phase("augment", dev):
            flip = torch.rand(x.shape[0], 1, 1, 1, device=dev) < 0.5
            x = torch.where(flip, x.flip(3), x)
            x = (x - self.mean) / self.std
        with phase("teacher", dev):
            t = self.teacher(x)
        with phase("bn_loss", dev):
            loss_bn = self.bn_loss()
        with phase("student", dev):
            s = self.student(x)
        with phase("logit_loss", dev):
            loss = self.bn * loss_bn + self.logit_loss(t, s)
        with phase("backward", dev):
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        with phase("step", dev):
            self.opt.step()
        return loss.detach()


def cifar_config(nz: int = 256, num_classes: int = 10, teacher: str = "resnet34", student: str = "resnet18"):
    """(teacher, student, generator) of the CIFAR ResNet-34 -> ResNet-18 FastDFKD config
    (random weights: fine for timing and profiling)."""
    from fastsynth import models

    nets = {"resnet18": models.resnet18, "resnet34": models.resnet34}
    for role, name in (("teacher", teacher), ("student", student)):
        if name not in nets:
            raise ValueError(f"{role} must be one of {sorted(nets)}, got {name!r}")
    return nets[teacher](num_classes), nets[student](num_classes), fastdfkd_generator(nz=nz)
