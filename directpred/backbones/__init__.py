"""Backbones: torchvision ResNets without the classifier, with CIFAR-stem and width options."""

from directpred.backbones.memory_format import resolve_channels_last, unsafe_channels_last_convs
from directpred.backbones.resnet import build_backbone, resnet

__all__ = ["build_backbone", "resnet", "resolve_channels_last", "unsafe_channels_last_convs"]
