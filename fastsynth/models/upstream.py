"""Classifiers with the module structure, signatures and shapes of the upstream DFKD registries
(zju-vipa/Fast-Datafree, tmtuan1307/nayer, zju-vipa/CMI: ``datafree/models/classifiers``), written
here so that fastsynth's fusion can be tested and benchmarked on what their users run.

What matters for the fusion and is reproduced: ``forward(self, x, return_features=False)``
returning ``(logits, features)`` when asked; in-place residual adds (``out += shortcut``) followed
by ``F.relu``; ReLU modules shared within a block; the pre-activation Wide ResNet blocks with their
``equalInOut`` branch and ``torch.add`` join; VGG stages whose last ReLU is applied outside the
``nn.Sequential`` and an extra pooling chosen by the input size (``if h == 64``); MobileNetV2's
ReLU6 and conditional residual; ShuffleNetV2's channel split computed with ``int()`` from a
runtime size and its tuple-returning last blocks; torchvision's ImageNet ResNets (7x7 stem,
max-pool, ``_forward_impl``). Weights are randomly initialised as upstream initialises them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cifar_resnet import BasicBlock, CifarResNet

__all__ = ["cifar_resnet8", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "cifar_resnet110",
           "resnet18", "resnet34", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8_bn", "vgg11_bn",
           "vgg13_bn", "mobilenet_v2", "shufflenet_v2", "resnet18_imagenet", "resnet50_imagenet", "UPSTREAM_MODELS"]


def _features_or_logits(logits, features, return_features):
    return (logits, features) if return_features else logits


# ---------------------------------------------------------------------------------------------
# CIFAR ResNet-8/20/32/56/110 (registry: resnet8 ... resnet110; widths 16/16/32/64)

class _BasicBlock(nn.Module):
    """conv3x3-BN, ReLU, conv3x3-BN and an optional downsample, declared as torchvision's BasicBlock
    and the CIFAR ResNet-8...110 blocks declare them (one nn.ReLU module); the forward passes differ."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample


def _tv_join(block, out, x):
    """torchvision's residual join: the downsample after the main path, ``out += identity``, the
    block's ReLU module."""
    identity = x if block.downsample is None else block.downsample(x)
    out += identity
    return block.relu(out)


class _TinyBlock(_BasicBlock):
    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += residual
        return F.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, depth: int, widths=(16, 16, 32, 64), num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[1], n, 1)
        self.layer2 = self._make_layer(widths[2], n, 2)
        self.layer3 = self._make_layer(widths[3], n, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes, blocks, stride):
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [_TinyBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [_TinyBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x, return_features=False):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        features = x.view(x.size(0), -1)
        return _features_or_logits(self.fc(features), features, return_features)


def cifar_resnet8(num_classes=10):
    return TinyResNet(8, num_classes=num_classes)


def cifar_resnet20(num_classes=10):
    return TinyResNet(20, num_classes=num_classes)


def cifar_resnet32(num_classes=10):
    return TinyResNet(32, num_classes=num_classes)


def cifar_resnet56(num_classes=10):
    return TinyResNet(56, num_classes=num_classes)


def cifar_resnet110(num_classes=10):
    return TinyResNet(110, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# CIFAR ResNet-18/34 (registry: resnet18, resnet34; the DAFL ResNets, 64..512 channels)

class _DaflBlock(BasicBlock):
    """fastsynth.models' BasicBlock with upstream's in-place residual add."""

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class DaflResNet(CifarResNet):
    """fastsynth.models' CifarResNet (same modules, same initialisation) with upstream's blocks
    and ``forward(x, return_features=False)``."""

    block = _DaflBlock

    def forward(self, x, return_features=False):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, (1, 1))
        feature = out.view(out.size(0), -1)
        return _features_or_logits(self.linear(feature), feature, return_features)


def resnet18(num_classes=10):
    return DaflResNet([2, 2, 2, 2], num_classes)


def resnet34(num_classes=10):
    return DaflResNet([3, 4, 6, 3], num_classes)


# ---------------------------------------------------------------------------------------------
# Wide ResNets (registry: wrn16_1 ... wrn40_2)

class _WideBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, dropout_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout_rate)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        if self.equalInOut:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))  # the activated input also feeds the projection
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(self.dropout(out))
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class _WideStage(nn.Module):
    def __init__(self, n, in_planes, out_planes, stride, dropout_rate):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBlock(in_planes if i == 0 else out_planes, out_planes,
                                                stride if i == 0 else 1, dropout_rate) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, num_classes=10, widen_factor=1, dropout_rate=0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = _WideStage(n, ch[0], ch[1], 1, dropout_rate)
        self.block2 = _WideStage(n, ch[1], ch[2], 2, dropout_rate)
        self.block3 = _WideStage(n, ch[2], ch[3], 2, dropout_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x, return_features=False):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, (1, 1))
        features = out.view(-1, self.nChannels)
        return _features_or_logits(self.fc(features), features, return_features)


def wrn_16_1(num_classes=10, dropout_rate=0.0):
    return WideResNet(16, num_classes, 1, dropout_rate)


def wrn_16_2(num_classes=10, dropout_rate=0.0):
    return WideResNet(16, num_classes, 2, dropout_rate)


def wrn_40_1(num_classes=10, dropout_rate=0.0):
    return WideResNet(40, num_classes, 1, dropout_rate)


def wrn_40_2(num_classes=10, dropout_rate=0.0):
    return WideResNet(40, num_classes, 2, dropout_rate)


# ---------------------------------------------------------------------------------------------
# VGG with BatchNorm (registry: vgg8, vgg11, vgg13 -> *_bn)

_VGG_CFG = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


class VGG(nn.Module):
    def __init__(self, cfg, num_classes=10):
        super().__init__()
        chans = [3] + [stage[-1] for stage in cfg]
        for i, stage in enumerate(cfg):
            setattr(self, f"block{i}", self._stage(stage, chans[i]))
        for i in range(4):
            setattr(self, f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    @staticmethod
    def _stage(widths, c):
        layers = []
        for v in widths:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
        return nn.Sequential(*layers[:-1])  # the stage's last ReLU is applied by forward()

    def forward(self, x, return_features=False):
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if h == 64:  # 64x64 inputs get one more pooling (shape-dependent control flow)
            x = self.pool3(x)
        x = self.pool4(F.relu(self.block4(x)))
        features = x.view(x.size(0), -1)
        return _features_or_logits(self.classifier(features), features, return_features)


def vgg8_bn(num_classes=10):
    return VGG(_VGG_CFG["S"], num_classes)


def vgg11_bn(num_classes=10):
    return VGG(_VGG_CFG["A"], num_classes)


def vgg13_bn(num_classes=10):
    return VGG(_VGG_CFG["B"], num_classes)


# ---------------------------------------------------------------------------------------------
# MobileNetV2 (registry: mobilenetv2; torchvision's module layout, ReLU6, forward(x) only)

def _divisible(v, d=8):
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, k=3, stride=1, groups=1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [_ConvBNReLU(inp, hidden, k=1)] if expand_ratio != 1 else []
        layers += [_ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
               [6, 320, 1, 1]]

    def __init__(self, num_classes=1000, width_mult=1.0):
        super().__init__()
        cin = _divisible(32 * width_mult)
        self.last_channel = _divisible(1280 * max(1.0, width_mult))
        features = [_ConvBNReLU(3, cin, stride=2)]
        for t, c, n, s in self.SETTING:
            cout = _divisible(c * width_mult)
            for i in range(n):
                features.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(_ConvBNReLU(cin, self.last_channel, k=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _forward_impl(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1)).reshape(x.shape[0], -1)
        return self.classifier(x)

    def forward(self, x):
        return self._forward_impl(x)


def mobilenet_v2(num_classes=1000, width_mult=1.0):
    return MobileNetV2(num_classes, width_mult)


# ---------------------------------------------------------------------------------------------
# ShuffleNetV2 (registry: shufflenetv2, net_size 1)

class _Shuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.size()
        return x.view(n, 2, c // 2, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class _Split(nn.Module):
    def __init__(self, ratio):
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        c = int(x.size(1) * self.ratio)  # int() of a runtime size
        return x[:, :c, :, :], x[:, c:, :, :]


class _ShuffleBlock(nn.Module):
    def __init__(self, in_channels, split_ratio=0.5, is_last=False):
        super().__init__()
        self.is_last = is_last
        self.split = _Split(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.shuffle = _Shuffle()

    def forward(self, x):
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        preact = self.bn3(self.conv3(out))
        out = F.relu(preact)
        preact = torch.cat([x1, preact], 1)
        out = self.shuffle(torch.cat([x1, out], 1))
        return (out, preact) if self.is_last else out


class _ShuffleDown(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.BatchNorm2d(cin)
        self.conv2, self.bn2 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.shuffle = _Shuffle()

    def forward(self, x):
        out1 = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        out2 = F.relu(self.bn3(self.conv3(x)))
        out2 = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(out2)))))
        return self.shuffle(torch.cat([out1, out2], 1))


class ShuffleNetV2(nn.Module):
    def __init__(self, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, cout, n):
        layers = [_ShuffleDown(self.in_channels, cout)]
        layers += [_ShuffleBlock(cout, is_last=(i == n - 1)) for i in range(n)]
        self.in_channels = cout
        return nn.Sequential(*layers)

    def forward(self, x, return_features=False):
        out = F.relu(self.bn1(self.conv1(x)))
        out, _ = self.layer1(out)
        out, _ = self.layer2(out)
        out, _ = self.layer3(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4)
        features = out.view(out.size(0), -1)
        return _features_or_logits(self.linear(features), features, return_features)


def shufflenet_v2(num_classes=10):
    return ShuffleNetV2(num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# torchvision ResNets for ImageNet (registry: resnet18_imagenet, resnet50_imagenet)

class _TVBasic(_BasicBlock):
    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))  # the ReLU module used twice: here and after the join
        return _tv_join(self, self.bn2(self.conv2(out)), x)


class _TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return _tv_join(self, self.bn3(self.conv3(out)), x)


class ImageNetResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride=1):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _forward_impl(self, x, return_features):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        feat = torch.flatten(self.avgpool(x), 1)
        x = self.fc(feat)
        if return_features:
            return x, feat
        return x

    def forward(self, x, return_features=False):
        return self._forward_impl(x, return_features=return_features)


def resnet18_imagenet(num_classes=1000):
    return ImageNetResNet(_TVBasic, [2, 2, 2, 2], num_classes)


def resnet50_imagenet(num_classes=1000):
    return ImageNetResNet(_TVBottleneck, [3, 4, 6, 3], num_classes)


# name -> (constructor, input shape (C, H, W) the registry uses it at)
UPSTREAM_MODELS = {
    "resnet8": (cifar_resnet8, (3, 32, 32)),
    "resnet20": (cifar_resnet20, (3, 32, 32)),
    "resnet32": (cifar_resnet32, (3, 32, 32)),
    "resnet56": (cifar_resnet56, (3, 32, 32)),
    "resnet110": (cifar_resnet110, (3, 32, 32)),
    "resnet18": (resnet18, (3, 32, 32)),
    "resnet34": (resnet34, (3, 32, 32)),
    "wrn16_1": (wrn_16_1, (3, 32, 32)),
    "wrn16_2": (wrn_16_2, (3, 32, 32)),
    "wrn40_1": (wrn_40_1, (3, 32, 32)),
    "wrn40_2": (wrn_40_2, (3, 32, 32)),
    "vgg8": (vgg8_bn, (3, 32, 32)),
    "vgg11": (vgg11_bn, (3, 32, 32)),
    "vgg13": (vgg13_bn, (3, 32, 32)),
    "mobilenetv2": (mobilenet_v2, (3, 32, 32)),
    "shufflenetv2": (shufflenet_v2, (3, 32, 32)),
    "resnet18_imagenet": (resnet18_imagenet, (3, 224, 224)),
    "resnet50_imagenet": (resnet50_imagenet, (3, 224, 224)),
}
