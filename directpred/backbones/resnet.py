"""torchvision ResNet-18/34/50 with a width option and the CIFAR stem, classifier removed.

The blocks, their initialisation and ``_make_layer`` are torchvision's; only the stage widths
(``width, 2w, 4w, 8w``; 64 is the standard network) and the stem are ours to choose.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from directpred.config import BackboneConfig

_SPECS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNetBackbone(ResNet):
    """A torchvision :class:`ResNet` whose stage widths scale with ``width`` and whose ``fc`` is the identity."""

    out_dim: int  # the feature size, 8 * width * block.expansion
    maxpool: nn.Module

    def __init__(
        self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], width: int, cifar_stem: bool
    ) -> None:
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        if cifar_stem:  # SimCLR-style stem for 32x32 inputs, as in the authors' CIFAR code
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.out_dim = 8 * width * block.expansion
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def resnet(name: str = "resnet18", *, width: int = 64, cifar_stem: bool = True) -> ResNetBackbone:
    """A ResNet feature extractor: images (B, 3, H, W) -> features (B, 8*width*expansion).

    Args:
        name: ``resnet18``, ``resnet34`` or ``resnet50``.
        width: base channel count (64 = the standard torchvision network; 512-d features for ResNet-18).
        cifar_stem: 3x3 stride-1 first convolution and no max-pool, for 32x32 images.

    Examples:
        >>> import torch
        >>> net = resnet("resnet18", width=16)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 128])
    """
    if name not in _SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_SPECS)}")
    block, layers = _SPECS[name]
    return ResNetBackbone(block, layers, width, cifar_stem)


def build_backbone(cfg: BackboneConfig) -> ResNetBackbone:
    """Backbone from a :class:`directpred.config.BackboneConfig`."""
    return resnet(cfg.name, width=cfg.width, cifar_stem=cfg.cifar_stem)


__all__ = ["ResNetBackbone", "resnet", "build_backbone"]
