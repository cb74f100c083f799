"""VGG with BatchNorm for 32x32 inputs (the CIFAR variant of the DFKD toolboxes: conv3x3-BN-ReLU
stacks with 2x2 max-pooling, then a single linear classifier on the 512-d feature)."""
from __future__ import annotations

import torch
import torch.nn as nn

_CONFIGS = {
    "vgg8": [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg: list, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg8_bn(num_classes: int = 10) -> VGG:
    return VGG(_CONFIGS["vgg8"], num_classes)


def vgg11_bn(num_classes: int = 10) -> VGG:
    return VGG(_CONFIGS["vgg11"], num_classes)


def vgg13_bn(num_classes: int = 10) -> VGG:
    return VGG(_CONFIGS["vgg13"], num_classes)
