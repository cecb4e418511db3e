"""Shared fixtures: real-data location, synthetic CIFAR folders and composed Hydra configs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from data.cifar import ImageSplit, write_npz

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPOSITORY_ROOT / "configs"


@pytest.fixture
def real_data_dir() -> Path:
    """The real-data folder from FNGD_DATA_DIR; tests that use it skip when it is unset."""
    value = os.environ.get("FNGD_DATA_DIR")
    if not value:
        pytest.skip("needs the real data: set FNGD_DATA_DIR to the folder holding "
                    "cifar10/ and multi30k/ (../shared/data on the project machines)")
    path = Path(value)
    if not path.is_absolute():
        path = REPOSITORY_ROOT / path
    if not path.is_dir():
        pytest.skip(f"FNGD_DATA_DIR={value} does not exist from {REPOSITORY_ROOT}; point it at "
                    "the real-data folder to run this test")
    return path


def make_synthetic_split(size: int, num_classes: int, seed: int) -> ImageSplit:
    """Return a learnable split: each class has its own mean colour, plus pixel noise."""
    generator = np.random.default_rng(seed)
    class_colours = generator.integers(40, 216, size=(num_classes, 3))
    labels = np.arange(size) % num_classes
    generator.shuffle(labels)
    noise = generator.integers(-40, 41, size=(size, 32, 32, 3))
    images = np.clip(class_colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    classes = [f"class{index}" for index in range(num_classes)]
    return ImageSplit(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), classes)


def write_synthetic_cifar(root: Path, name: str = "cifar10", train_size: int = 64,
                          test_size: int = 32, num_classes: int = 10) -> Path:
    """Write ``{root}/{name}/train.npz`` and ``test.npz`` with synthetic images; return root."""
    # The test split reuses the class colours of the training split (same seed for colours).
    write_npz(make_synthetic_split(train_size, num_classes, seed=0), root / name / "train.npz")
    test = make_synthetic_split(train_size + test_size, num_classes, seed=0)
    test = ImageSplit(test.images[train_size:], test.labels[train_size:], test.classes)
    write_npz(test, root / name / "test.npz")
    return root


@pytest.fixture
def synthetic_cifar_root(tmp_path: Path) -> Path:
    """A data root with a 64-image training and 32-image test split in the CIFAR-10 layout."""
    return write_synthetic_cifar(tmp_path / "data")


@pytest.fixture
def compose_config() -> Callable[..., DictConfig]:
    """Compose ``configs/config.yaml`` with the given overrides, as the command line would."""

    def _compose(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=overrides,
                           return_hydra_config=return_hydra_config)

    return _compose


def tiny_run_overrides(data_root: Path, epochs: int = 2) -> list[str]:
    """Overrides for a training run of a few seconds on the CPU: ResNet-8, batches of 16."""
    return [
        f"dataset.root={data_root}",
        "model=resnet8",
        "dataset.batch_size=16",
        "dataset.eval_batch_size=32",
        f"trainer.epochs={epochs}",
        "trainer.device=cpu",
        "trainer.progress=false",
        "logger.mode=disabled",
    ]
