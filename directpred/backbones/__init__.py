"""Backbones: torchvision ResNets without the classifier, with CIFAR-stem and width options."""

from directpred.backbones.resnet import build_backbone, resnet

__all__ = ["build_backbone", "resnet"]
