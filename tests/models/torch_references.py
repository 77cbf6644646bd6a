"""PyTorch networks whose checkpoints oscqat_jax.convert reads, written after the real classes.

torchvision's wheels fail beside the test torch and timm needs torchvision, so the converter's
tests build these networks here, module for module: the same module names, registration
order, padding, BatchNorm settings and forward passes as

- ``ReferenceMobileNetV2``: the official reference's ``models/mobilenet_v2.py``
  (Qualcomm-AI-research/oscillations-qat, after tonylins/pytorch-mobilenet-v2);
- ``MobileNetV2``: torchvision ``models/mobilenetv2.py``;
- ``MobileNetV3``: torchvision ``models/mobilenetv3.py`` (with ``ops.SqueezeExcitation``);
- ``ResNet``: torchvision ``models/resnet.py`` (v1.5, stride on the 3x3 conv);
- ``EfficientNet``: timm ``efficientnet.py`` as ``_gen_efficientnet_lite`` builds it, with the
  ``DepthwiseSeparableConv`` and ``InvertedResidual`` of ``_efficientnet_blocks.py`` and
  ``BatchNormAct2d`` (BN and activation in one module, as timm's keys have them).

Left out: what these checkpoints never use (width multipliers, dilation, grouped convs other
than depth-wise, drop path, feature extraction, SE in EfficientNet-lite). Each network keeps
its library's weight initialisation. Parameter totals at 1000 classes equal the published
ones (``test_convert.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

MOBILENET_V2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
"""(expansion t, channels c, repeats n, first stride s), in both MobileNetV2 sources."""


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible`` and timm's ``make_divisible`` (round limit 0.9)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# --------------------------------------------------------------------------- official reference


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU6(inplace=True)
    )


def _conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU6(inplace=True)
    )


class _ReferenceInvertedResidual(nn.Module):
    """The reference's block: ``conv`` is one flat Sequential of (conv, BN, ReLU6) triples."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = self.stride == 1 and inp == oup
        pw = [
            nn.Conv2d(inp, hidden_dim, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU6(inplace=True),
        ]
        dw = [
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride, 1, groups=hidden_dim, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU6(inplace=True),
        ]
        pw_linear = [nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*([] if expand_ratio == 1 else pw), *dw, *pw_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class ReferenceMobileNetV2(nn.Module):
    """The reference's float MobileNetV2 at width 1.0 (its reduced widths truncate channels,
    ours round them as torchvision does, so only width 1.0 is shared). The fixed
    ``AvgPool2d(input_size // 32)`` is ``features.19``; its custom ``ReLU6`` (a clamp) is
    ``nn.ReLU6``."""

    def __init__(self, n_class: int = 1000, input_size: int = 224, dropout: float = 0.0):
        super().__init__()
        input_channel, self.last_channel = 32, 1280
        assert input_size % 32 == 0
        features: list[nn.Module] = [_conv_bn(3, input_channel, 2)]
        for t, c, n, s in MOBILENET_V2_SETTING:
            for i in range(n):
                features.append(_ReferenceInvertedResidual(input_channel, c, s if i == 0 else 1, t))
                input_channel = c
        features.append(_conv_1x1_bn(input_channel, self.last_channel))
        features.append(nn.AvgPool2d(input_size // 32))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, n_class))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x.squeeze(2).squeeze(2))


# --------------------------------------------------------------------------- torchvision


class Conv2dNormActivation(nn.Sequential):
    """``torchvision.ops.Conv2dNormActivation``: conv ``0``, norm ``1``, activation ``2``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] | None = nn.ReLU,
    ):
        padding = (kernel_size - 1) // 2
        layers = [
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
            ),
            norm_layer(out_channels),
        ]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


def _torchvision_init(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: ``conv`` = [expand CNA], depth-wise CNA, conv, BN."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(
                Conv2dNormActivation(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6)
            )
        layers.extend(
            [
                Conv2dNormActivation(
                    hidden_dim,
                    hidden_dim,
                    stride=stride,
                    groups=hidden_dim,
                    activation_layer=nn.ReLU6,
                ),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ``MobileNetV2`` at width 1.0."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        input_channel, self.last_channel = 32, 1280
        features: list[nn.Module] = [
            Conv2dNormActivation(3, input_channel, stride=2, activation_layer=nn.ReLU6)
        ]
        for t, c, n, s in MOBILENET_V2_SETTING:
            for i in range(n):
                features.append(InvertedResidual(input_channel, c, s if i == 0 else 1, t))
                input_channel = c
        features.append(
            Conv2dNormActivation(
                input_channel, self.last_channel, kernel_size=1, activation_layer=nn.ReLU6
            )
        )
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes)
        )
        _torchvision_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcitation(nn.Module):
    """``torchvision.ops.SqueezeExcitation`` with MobileNetV3's hard-sigmoid gate."""

    def __init__(self, input_channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


class InvertedResidualConfig(NamedTuple):
    """One MobileNetV3 block of torchvision's ``_mobilenet_v3_conf`` (width 1.0)."""

    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    activation: str  # "RE" (ReLU) or "HS" (hard-swish)
    stride: int

    @property
    def use_hs(self) -> bool:
        return self.activation == "HS"


class InvertedResidualV3(nn.Module):
    """torchvision's MobileNetV3 ``InvertedResidual``: ``block`` = [expand], depth-wise, [SE],
    project."""

    def __init__(self, cnf: InvertedResidualConfig, norm_layer: Callable[..., nn.Module]):
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers: list[nn.Module] = []
        activation_layer = nn.Hardswish if cnf.use_hs else nn.ReLU
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(
                Conv2dNormActivation(
                    cnf.input_channels,
                    cnf.expanded_channels,
                    kernel_size=1,
                    norm_layer=norm_layer,
                    activation_layer=activation_layer,
                )
            )
        layers.append(
            Conv2dNormActivation(
                cnf.expanded_channels,
                cnf.expanded_channels,
                kernel_size=cnf.kernel,
                stride=cnf.stride,
                groups=cnf.expanded_channels,
                norm_layer=norm_layer,
                activation_layer=activation_layer,
            )
        )
        if cnf.use_se:
            squeeze_channels = _make_divisible(cnf.expanded_channels // 4)
            layers.append(SqueezeExcitation(cnf.expanded_channels, squeeze_channels))
        layers.append(
            Conv2dNormActivation(
                cnf.expanded_channels,
                cnf.out_channels,
                kernel_size=1,
                norm_layer=norm_layer,
                activation_layer=None,
            )
        )
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        return result + x if self.use_res_connect else result


MOBILENET_V3_SETTINGS = {
    "large": (
        (16, 3, 16, 16, False, "RE", 1),
        (16, 3, 64, 24, False, "RE", 2),
        (24, 3, 72, 24, False, "RE", 1),
        (24, 5, 72, 40, True, "RE", 2),
        (40, 5, 120, 40, True, "RE", 1),
        (40, 5, 120, 40, True, "RE", 1),
        (40, 3, 240, 80, False, "HS", 2),
        (80, 3, 200, 80, False, "HS", 1),
        (80, 3, 184, 80, False, "HS", 1),
        (80, 3, 184, 80, False, "HS", 1),
        (80, 3, 480, 112, True, "HS", 1),
        (112, 3, 672, 112, True, "HS", 1),
        (112, 5, 672, 160, True, "HS", 2),
        (160, 5, 960, 160, True, "HS", 1),
        (160, 5, 960, 160, True, "HS", 1),
    ),
    "small": (
        (16, 3, 16, 16, True, "RE", 2),
        (16, 3, 72, 24, False, "RE", 2),
        (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1),
        (48, 5, 144, 48, True, "HS", 1),
        (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1),
        (96, 5, 576, 96, True, "HS", 1),
    ),
}
"""torchvision's ``_mobilenet_v3_conf``, rows of :class:`InvertedResidualConfig`."""
MOBILENET_V3_LAST_CHANNEL = {"large": 1280, "small": 1024}


class MobileNetV3(nn.Module):
    """torchvision's ``mobilenet_v3_large`` / ``mobilenet_v3_small`` (BN eps 1e-3, momentum
    0.01)."""

    def __init__(self, variant: str, num_classes: int = 1000):
        super().__init__()
        setting = [InvertedResidualConfig(*row) for row in MOBILENET_V3_SETTINGS[variant]]
        last_channel = MOBILENET_V3_LAST_CHANNEL[variant]
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers: list[nn.Module] = [
            Conv2dNormActivation(
                3,
                setting[0].input_channels,
                kernel_size=3,
                stride=2,
                norm_layer=norm_layer,
                activation_layer=nn.Hardswish,
            )
        ]
        layers.extend(InvertedResidualV3(cnf, norm_layer) for cnf in setting)
        lastconv_input_channels = setting[-1].out_channels
        lastconv_output_channels = 6 * lastconv_input_channels
        layers.append(
            Conv2dNormActivation(
                lastconv_input_channels,
                lastconv_output_channels,
                kernel_size=1,
                norm_layer=norm_layer,
                activation_layer=nn.Hardswish,
            )
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(lastconv_output_channels, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=0.2, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        _torchvision_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` (``resnet18``: BasicBlock (2, 2, 2, 2); ``resnet50``:
    Bottleneck (3, 4, 6, 3))."""

    def __init__(self, block: type[nn.Module], layers: tuple[int, ...], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- timm


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: BatchNorm (same keys) followed by its activation ``act``."""

    def __init__(self, num_features: int, apply_act: bool = True):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = nn.ReLU6(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _timm_conv(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1):
    """timm's ``create_conv2d`` with ``pad_type=''``: symmetric ``get_padding``, no bias."""
    padding = ((stride - 1) + (kernel_size - 1)) // 2
    return nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)


class DepthwiseSeparableConv(nn.Module):
    """timm's DS block (no SE, no point-wise activation): conv_dw, bn1, conv_pw, bn2."""

    def __init__(self, in_chs: int, out_chs: int, dw_kernel_size: int, stride: int):
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = _timm_conv(in_chs, in_chs, dw_kernel_size, stride, groups=in_chs)
        self.bn1 = BatchNormAct2d(in_chs)
        self.aa = nn.Identity()
        self.se = nn.Identity()
        self.conv_pw = _timm_conv(in_chs, out_chs, 1)
        self.bn2 = BatchNormAct2d(out_chs, apply_act=False)
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.se(self.aa(self.bn1(self.conv_dw(x))))
        x = self.bn2(self.conv_pw(x))
        return self.drop_path(x) + shortcut if self.has_skip else x


class InvertedResidualLite(nn.Module):
    """timm's ``InvertedResidual`` (no SE): conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3."""

    def __init__(self, in_chs: int, out_chs: int, dw_kernel_size: int, stride: int, exp_ratio: int):
        super().__init__()
        self.has_skip = in_chs == out_chs and stride == 1
        mid_chs = _make_divisible(in_chs * exp_ratio)
        self.conv_pw = _timm_conv(in_chs, mid_chs, 1)
        self.bn1 = BatchNormAct2d(mid_chs)
        self.conv_dw = _timm_conv(mid_chs, mid_chs, dw_kernel_size, stride, groups=mid_chs)
        self.bn2 = BatchNormAct2d(mid_chs)
        self.aa = nn.Identity()
        self.se = nn.Identity()
        self.conv_pwl = _timm_conv(mid_chs, out_chs, 1)
        self.bn3 = BatchNormAct2d(out_chs, apply_act=False)
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        x = self.bn3(self.conv_pwl(self.se(self.aa(x))))
        return self.drop_path(x) + shortcut if self.has_skip else x


EFFICIENTNET_LITE_ARCH = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
"""timm's ``_gen_efficientnet_lite`` arch_def (``ds_r1_k3_s1_e1_c16``, ...): (block, repeats,
kernel, first stride, expansion, channels)."""


class EfficientNet(nn.Module):
    """timm's ``efficientnet_lite0``: stem 32, head 1280, ReLU6, BN eps 1e-5, ``blocks.s.b``."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        stem_size, num_features = 32, 1280
        self.conv_stem = _timm_conv(3, stem_size, 3, stride=2)
        self.bn1 = BatchNormAct2d(stem_size)
        stages, in_chs = [], stem_size
        for kind, repeats, k, s, e, out_chs in EFFICIENTNET_LITE_ARCH:
            blocks = []
            for i in range(repeats):
                stride = s if i == 0 else 1
                if kind == "ds":
                    blocks.append(DepthwiseSeparableConv(in_chs, out_chs, k, stride))
                else:
                    blocks.append(InvertedResidualLite(in_chs, out_chs, k, stride, e))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _timm_conv(in_chs, num_features, 1)
        self.bn2 = BatchNormAct2d(num_features)
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():  # timm's _init_weight_goog
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1.0)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.weight.size(0))
                m.weight.data.uniform_(-init_range, init_range)
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(self.global_pool(x))


# --------------------------------------------------------------------------- registry


INPUT_SIZE = 64
"""Input height and width of the parity tests; sets only the reference's fixed pooling."""

NETWORKS: dict[tuple[str, str], Callable[[int], nn.Module]] = {
    ("mobilenet_v2", "reference"): partial(ReferenceMobileNetV2, input_size=INPUT_SIZE),
    ("mobilenet_v2", "torchvision"): MobileNetV2,
    ("mobilenet_v3_small", "torchvision"): partial(MobileNetV3, "small"),
    ("mobilenet_v3_large", "torchvision"): partial(MobileNetV3, "large"),
    ("efficientnet_lite0", "timm"): EfficientNet,
    ("resnet18", "torchvision"): partial(ResNet, BasicBlock, (2, 2, 2, 2)),
    ("resnet50", "torchvision"): partial(ResNet, Bottleneck, (3, 4, 6, 3)),
}
"""(our model name, checkpoint layout) -> the network's constructor, given ``num_classes``."""


def state_dict_shapes(name: str, layout: str, num_classes: int = 1000) -> dict[str, tuple]:
    """``{key: shape}`` of the network's state dict, in registration order (built on the meta
    device: no memory, no initialisation)."""
    with torch.device("meta"):
        net = NETWORKS[name, layout](num_classes)
    return {key: tuple(value.shape) for key, value in net.state_dict().items()}


def parameter_count(name: str, layout: str, num_classes: int = 1000) -> int:
    """Number of trainable parameters of the network (BN statistics not counted)."""
    with torch.device("meta"):
        net = NETWORKS[name, layout](num_classes)
    return sum(p.numel() for p in net.parameters())


def randomize_affine(net: nn.Module, generator: torch.Generator) -> None:
    """BN scales in [0.5, 1.5], BN shifts and conv/linear biases ~ N(0, 0.2): the libraries
    initialise them to 1 and 0, which would hide a scale/shift or a bias mix-up."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0.0, 0.2, generator=generator)
            elif isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.2, generator=generator)


def calibrate_batch_norm(net: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Sets every BN's running statistics to the average of its batch statistics over
    ``batches`` (train-mode passes with ``momentum=None``), so that eval-mode activations stay
    O(1) and the logits depend on the input; returns ``net`` in eval mode."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for batch in batches:
            net(batch)
    return net.eval()
