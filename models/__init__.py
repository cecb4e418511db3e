"""Models for the benchmark: CIFAR ResNets (and, next to them, the Transformer)."""

from models.resnet import RESNETS, build_resnet

__all__ = ["RESNETS", "build_resnet"]
