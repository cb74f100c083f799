"""Workloads shared by the profiler and the Triton compile check: the CIFAR ResNet-34 teacher /
ResNet-18 student / FastDFKD generator configuration."""
from __future__ import annotations

import torch.nn as nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def fastdfkd_generator(nz: int = 256, ngf: int = 64, img_size: int = 32, nc: int = 3) -> nn.Module:
    from fastsynth.nn import Generator

    return Generator(nz=nz, ngf=ngf, img_size=img_size, nc=nc)


def cifar_config(nz: int = 256, num_classes: int = 10, teacher: str = "resnet34", student: str = "resnet18"):
    """(teacher, student, generator) of the CIFAR ResNet-34 -> ResNet-18 FastDFKD config
    (random weights: fine for timing and profiling)."""
    from fastsynth import models

    nets = {"resnet18": models.resnet18, "resnet34": models.resnet34}
    for role, name in (("teacher", teacher), ("student", student)):
        if name not in nets:
            raise ValueError(f"{role} must be one of {sorted(nets)}, got {name!r}")
    return nets[teacher](num_classes), nets[student](num_classes), fastdfkd_generator(nz=nz)
