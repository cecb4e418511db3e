"""ResNet architectures: parameter counts, depth, resolution and shortcuts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.resnet import RESNETS, PadShortcut, build_resnet


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _expected_count(stem: int, widths: list[int], blocks: list[int], num_classes: int,
                    conv_shortcuts: bool) -> int:
    """Count parameters from the published layout, independently of the model code."""
    total = 3 * stem * 9 + 2 * stem                        # 3x3 stem conv + BatchNorm
    in_channels = stem
    for width, count in zip(widths, blocks):
        for _ in range(count):
            total += 9 * in_channels * width + 2 * width   # first 3x3 conv + BatchNorm
            total += 9 * width * width + 2 * width         # second 3x3 conv + BatchNorm
            if conv_shortcuts and in_channels != width:
                total += in_channels * width + 2 * width   # 1x1 conv + BatchNorm
            in_channels = width
    return total + in_channels * num_classes + num_classes


@pytest.mark.parametrize("name, num_classes, published_millions, digits", [
    ("resnet32", 10, 0.46, 2),
    ("resnet110", 10, 1.7, 1),
    ("resnet18", 100, 11.2, 1),
    ("resnet34", 100, 21.3, 1),
])
def test_parameter_count_matches_published(name, num_classes, published_millions, digits):
    model = build_resnet(name, num_classes)
    assert round(_count(model) / 1e6, digits) == published_millions


@pytest.mark.parametrize("name, num_classes, layout", [
    ("resnet32", 10, (16, [16, 32, 64], [5, 5, 5], False)),
    ("resnet110", 10, (16, [16, 32, 64], [18, 18, 18], False)),
    ("resnet18", 100, (64, [64, 128, 256, 512], [2, 2, 2, 2], True)),
    ("resnet34", 100, (64, [64, 128, 256, 512], [3, 4, 6, 3], True)),
])
def test_parameter_count_matches_layout(name, num_classes, layout):
    stem, widths, blocks, conv_shortcuts = layout
    expected = _expected_count(stem, widths, blocks, num_classes, conv_shortcuts)
    assert _count(build_resnet(name, num_classes)) == expected


@pytest.mark.parametrize("name, depth", [("resnet8", 8), ("resnet32", 32), ("resnet110", 110),
                                         ("resnet18", 18), ("resnet34", 34)])
def test_weighted_layers_equal_depth(name, depth):
    # The depth counts 3x3 convolutions and the classifier, not the 1x1 shortcut convolutions.
    model = build_resnet(name, 10)
    layers = [m for m in model.modules()
              if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))]
    assert len(layers) == depth


@pytest.mark.parametrize("name, final_size, final_channels", [
    ("resnet8", 8, 64), ("resnet18", 4, 512),
])
def test_resolution_and_output(name, final_size, final_channels):
    model = build_resnet(name, 7).eval()
    seen = {}
    model.stages.register_forward_hook(lambda module, args, output: seen.update(out=output))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))

    assert logits.shape == (2, 7)
    assert seen["out"].shape == (2, final_channels, final_size, final_size)


def test_wide_stem_without_max_pool():
    model = build_resnet("resnet18", 100)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)


def test_cifar_shortcuts_have_no_parameters():
    model = build_resnet("resnet32", 10)
    shortcuts = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert len(shortcuts) == 2
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())


def test_pad_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32, stride=2)(x)

    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, :8]) == 0
    assert torch.count_nonzero(out[:, 24:]) == 0


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError) as info:
        build_resnet("resnet99", 10)
    for name in RESNETS:
        assert name in str(info.value)


def test_invalid_num_classes():
    with pytest.raises(ValueError, match="num_classes=0"):
        build_resnet("resnet8", 0)


def test_seeded_initialisation_repeats():
    torch.manual_seed(3)
    first = build_resnet("resnet8", 10)
    torch.manual_seed(3)
    second = build_resnet("resnet8", 10)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["resnet8", "resnet18"])
def test_every_parameter_gets_a_gradient(name):
    model = build_resnet(name, 10)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)),
                                       torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.count_nonzero(parameter.grad) > 0, parameter_name
