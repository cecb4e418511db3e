"""ResNets for 32x32 images.

Two families, as the benchmark's experiments use them:

* The CIFAR ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition",
  section 4.2): a 3x3 stem with 16 channels, three stages of ``n`` basic blocks with 16, 32
  and 64 channels, global average pooling and a linear classifier, depth ``6n + 2``.
  Shortcuts that change the shape subsample by 2 and zero-pad the new channels (the paper's
  option A), so they add no parameters: ResNet-32 has 0.46 M and ResNet-110 1.7 M.
* ResNet-18 and ResNet-34 (the ImageNet layout of the same paper, 64/128/256/512 channels)
  with the 7x7 stride-2 stem and the max-pool replaced by one 3x3 stride-1 convolution, the
  usual adaptation to 32x32 inputs. Shortcuts that change the shape are a 1x1 convolution
  followed by BatchNorm (option B).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Name -> (family, blocks per stage). The CIFAR family has depth 6n + 2 with n blocks per
# stage. ResNet-8 is not in the paper; it exists for fast tests and smoke runs.
RESNETS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet8": ("cifar", (1, 1, 1)),
    "resnet20": ("cifar", (3, 3, 3)),
    "resnet32": ("cifar", (5, 5, 5)),
    "resnet44": ("cifar", (7, 7, 7)),
    "resnet56": ("cifar", (9, 9, 9)),
    "resnet110": ("cifar", (18, 18, 18)),
    "resnet18": ("wide_stem", (2, 2, 2, 2)),
    "resnet34": ("wide_stem", (3, 4, 6, 3)),
}


def _conv3x3(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    # No bias: every convolution is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1,
                     bias=False)


class PadShortcut(nn.Module):
    """Parameter-free shortcut: subsample by ``stride`` and zero-pad the extra channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        # Pad the channel dimension on both sides, as the original CIFAR models do.
        before = self.extra_channels // 2
        after = self.extra_channels - before
        return F.pad(x, (0, 0, 0, 0, before, after))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, added to a shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)

        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "pad":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A stem convolution, stages of basic blocks, global average pooling and a classifier.

    Args:
        blocks_per_stage: number of basic blocks in each stage; the first block of every
            stage after the first halves the resolution.
        widths: output channels of each stage.
        stem_width: output channels of the 3x3 stem convolution.
        shortcut: ``"pad"`` for parameter-free zero-padding shortcuts, ``"conv"`` for 1x1
            convolution shortcuts where the shape changes.
        num_classes: size of the classifier output.
    """

    def __init__(self, blocks_per_stage: tuple[int, ...], widths: tuple[int, ...],
                 stem_width: int, shortcut: str, num_classes: int):
        super().__init__()
        if len(blocks_per_stage) != len(widths):
            raise ValueError(f"blocks_per_stage {blocks_per_stage} and widths {widths} must "
                             "have the same length, one entry per stage")
        if shortcut not in ("pad", "conv"):
            raise ValueError(f"shortcut={shortcut!r} is invalid; use 'pad' or 'conv'")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} is invalid; it must be at least 1")

        self.conv1 = _conv3x3(3, stem_width, 1)
        self.bn1 = nn.BatchNorm2d(stem_width)

        stages = []
        in_channels = stem_width
        for stage_index, (blocks, width) in enumerate(zip(blocks_per_stage, widths)):
            layers = []
            for block_index in range(blocks):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                layers.append(BasicBlock(in_channels, width, stride, shortcut))
                in_channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)

        self.fc = nn.Linear(in_channels, num_classes)
        self._initialise()

    def _initialise(self) -> None:
        # He initialisation for convolutions (He et al. 2015), as the ResNet paper used.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))   # (B, stem_width, 32, 32)
        x = self.stages(x)                    # (B, widths[-1], 32 / 2^(stages-1), ...)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)                     # (B, num_classes)


def build_resnet(name: str, num_classes: int) -> ResNet:
    """Build the ResNet called ``name`` (a key of ``RESNETS``) with ``num_classes`` outputs."""
    if name not in RESNETS:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(RESNETS)}")

    family, blocks_per_stage = RESNETS[name]
    if family == "cifar":
        return ResNet(blocks_per_stage, widths=(16, 32, 64), stem_width=16, shortcut="pad",
                      num_classes=num_classes)
    return ResNet(blocks_per_stage, widths=(64, 128, 256, 512), stem_width=64,
                  shortcut="conv", num_classes=num_classes)
