"""ResNetV1c backbones in the mmsegmentation key layout (the official TMANet checkpoints use it).

V1c = deep stem (three 3x3 convs instead of one 7x7) and the stride on the 3x3 conv of a bottleneck
("pytorch" style). Dilated stages use ``contract_dilation``: the first block of a dilated stage runs at half
the stage's dilation, as mmseg does.
"""
from __future__ import annotations

import torch
from torch import nn

from ..presets import OUTPUT_STRIDE_LAYOUT, RESNET_STAGE_BLOCKS


def conv3x3(cin, cout, stride=1, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)  # mmseg's BasicBlock: second conv undilated
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetV1c(nn.Module):
    """Returns the outputs of layer3 and layer4 (the auxiliary and the TMA head inputs)."""

    def __init__(self, depth=50, base_channels=64, output_stride=8):
        super().__init__()
        block = BasicBlock if depth < 50 else Bottleneck
        strides, dilations = OUTPUT_STRIDE_LAYOUT[output_stride]
        half = base_channels // 2
        self.stem = nn.Sequential(
            conv3x3(3, half, 2), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            conv3x3(half, half), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            conv3x3(half, base_channels), nn.BatchNorm2d(base_channels), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = base_channels
        for i, (n, s, d) in enumerate(zip(RESNET_STAGE_BLOCKS[depth], strides, dilations)):
            planes = base_channels * 2 ** i
            downsample = None
            if s != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride=s, bias=False),
                                           nn.BatchNorm2d(planes * block.expansion))
            first_dilation = d // 2 if d > 1 else d  # contract_dilation
            blocks = [block(inplanes, planes, s, first_dilation, downsample)]
            inplanes = planes * block.expansion
            blocks += [block(inplanes, planes, 1, d) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor):
        x = self.maxpool(self.stem(x))
        x = self.layer2(self.layer1(x))
        c3 = self.layer3(x)
        return c3, self.layer4(c3)
