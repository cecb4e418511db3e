"""CIFAR loading, validation, subsets and the on-device augmentation."""

from __future__ import annotations

import math
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from data.cifar import (CROP_PADDING, DeviceBatches, ImageSplit, channel_stats, load_cifar,
                        read_npz, take_subset, write_npz)
from tests.conftest import make_synthetic_split, write_synthetic_cifar


def _write_arrays(path: Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def _valid_arrays(size: int = 8, num_classes: int = 10) -> dict:
    split = make_synthetic_split(size, num_classes, seed=1)
    return {"images": split.images.numpy(), "labels": split.labels.numpy(),
            "classes": np.array(split.classes)}


def _batches(split: ImageSplit, batch_size: int, shuffle: bool, augment: bool, seed: int = 0,
             mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> DeviceBatches:
    return DeviceBatches(split, batch_size, torch.tensor(mean), torch.tensor(std), "cpu",
                         shuffle=shuffle, augment=augment,
                         generator=torch.Generator().manual_seed(seed))


# Loading and the npz layout.

def test_npz_round_trip(tmp_path):
    root = write_synthetic_cifar(tmp_path, train_size=20, test_size=10)
    train, test = load_cifar("cifar10", root)
    expected = make_synthetic_split(20, 10, seed=0)

    assert torch.equal(train.images, expected.images)
    assert torch.equal(train.labels, expected.labels)
    assert train.labels.dtype == torch.int64
    assert train.classes == expected.classes
    assert len(test) == 10


def test_cifar100_layout_loads(tmp_path):
    root = write_synthetic_cifar(tmp_path, name="cifar100", train_size=200, test_size=100,
                                 num_classes=100)
    train, test = load_cifar("cifar100", root)
    assert len(train.classes) == 100
    assert int(train.labels.max()) == 99
    assert len(test) == 100


def test_unknown_dataset_lists_choices(tmp_path):
    with pytest.raises(ValueError, match="cifar10, cifar100"):
        load_cifar("cifar1000", tmp_path)


def test_missing_root_names_path_and_fixes(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_cifar("cifar10", missing)
    message = str(info.value)
    assert str(missing / "cifar10" / "train.npz") in message
    assert "cifar-10-batches-py" in message
    assert "dataset.download=true" in message
    assert "python -m scripts.prepare_data cifar10" in message


def test_missing_test_file_is_named(tmp_path):
    _write_arrays(tmp_path / "cifar10" / "train.npz", **_valid_arrays())
    with pytest.raises(FileNotFoundError, match="test.npz"):
        load_cifar("cifar10", tmp_path)


def test_corrupt_torchvision_folder_is_reported(tmp_path):
    # Real torchvision: an empty official folder fails its checksum test.
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match="missing or corrupt"):
        load_cifar("cifar10", tmp_path, download=False)


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "train.npz"
    path.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(ValueError, match=str(path)):
        read_npz(path, 10)


def test_npz_truncated(tmp_path):
    path = _write_arrays(tmp_path / "train.npz", **_valid_arrays())
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=str(path)):
        read_npz(path, 10)


def test_npz_corrupt_member_names_array(tmp_path):
    path = tmp_path / "train.npz"
    np.savez_compressed(path, **_valid_arrays(size=64))
    # Overwrite bytes inside the compressed images member; the zip directory stays valid.
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("images.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + 200
    data[start:start + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"array 'images'.*train.npz|train.npz.*'images'"):
        read_npz(path, 10)


def test_npy_instead_of_npz(tmp_path):
    path = tmp_path / "train.npz"
    with open(path, "wb") as file:
        np.save(file, np.zeros(3))
    with pytest.raises(ValueError, match="single .npy array"):
        read_npz(path, 10)


@pytest.mark.parametrize("missing", ["images", "labels", "classes"])
def test_npz_missing_array(tmp_path, missing):
    arrays = _valid_arrays()
    del arrays[missing]
    path = _write_arrays(tmp_path / "train.npz", **arrays)
    with pytest.raises(ValueError) as info:
        read_npz(path, 10)
    assert str(path) in str(info.value)
    assert missing in str(info.value)


@pytest.mark.parametrize("array, value, fragment", [
    ("images", np.zeros((8, 3, 32, 32), np.uint8), "array 'images'"),
    ("images", np.zeros((8, 32, 32, 3), np.float32), "array 'images'"),
    ("labels", np.zeros((7,), np.int64), "array 'labels'"),
    ("labels", np.zeros((8,), np.float32), "array 'labels'"),
    ("labels", np.full((8,), 10, np.int64), "values from 10 to 10"),
    ("labels", np.full((8,), -1, np.int64), "values from -1 to -1"),
    ("classes", np.array(["a", "b"]), "array 'classes'"),
])
def test_npz_wrong_array(tmp_path, array, value, fragment):
    arrays = _valid_arrays()
    arrays[array] = value
    path = _write_arrays(tmp_path / "train.npz", **arrays)
    with pytest.raises(ValueError) as info:
        read_npz(path, 10)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_split_from_torchvision_via_prepare_data(tmp_path, monkeypatch):
    # The download cannot run here, so a stand-in with the attributes of torchvision's
    # CIFAR10 (data, targets, classes) replaces the class. The conversion and the file
    # writing are the real code.
    import scripts.prepare_data as prepare_data
    import torchvision.datasets

    expected = {True: make_synthetic_split(30, 10, seed=2), False: make_synthetic_split(10, 10, 3)}

    def fake_cifar10(root, train, download):
        split = expected[train]
        return SimpleNamespace(data=split.images.numpy(), targets=split.labels.tolist(),
                               classes=split.classes)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    monkeypatch.setattr(sys, "argv", ["prepare_data", "cifar10", "--root", str(tmp_path)])
    prepare_data.main()

    train, test = load_cifar("cifar10", tmp_path)
    assert torch.equal(train.images, expected[True].images)
    assert torch.equal(test.labels, expected[False].labels)


# Subsets.

def test_subset_larger_than_split_is_error():
    split = make_synthetic_split(20, 10, seed=0)
    with pytest.raises(ValueError, match=r"dataset.train_subset=21 .* 20 images"):
        take_subset(split, 21, seed=0, option="dataset.train_subset")


@pytest.mark.parametrize("size", [0, -5, 2.5])
def test_subset_invalid_size(size):
    split = make_synthetic_split(20, 10, seed=0)
    with pytest.raises(ValueError, match="dataset.test_subset"):
        take_subset(split, size, seed=0, option="dataset.test_subset")


def test_subset_depends_on_seed_only():
    split = make_synthetic_split(100, 10, seed=0)
    first = take_subset(split, 30, seed=4, option="x")
    again = take_subset(split, 30, seed=4, option="x")
    other = take_subset(split, 30, seed=5, option="x")

    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.labels, other.labels) or not torch.equal(first.images,
                                                                           other.images)
    assert len(first) == 30
    assert take_subset(split, None, seed=0, option="x") is split


# Batches and augmentation.

def test_epoch_visits_every_index_once():
    split = make_synthetic_split(50, 10, seed=0)
    batches = _batches(split, 16, shuffle=True, augment=True)
    epoch = list(batches)

    assert len(batches) == math.ceil(50 / 16) == len(epoch)
    assert [len(batch.indices) for batch in epoch] == [16, 16, 16, 2]
    indices = torch.cat([batch.indices for batch in epoch])
    assert sorted(indices.tolist()) == list(range(50))
    for batch in epoch:
        assert torch.equal(batch.targets, split.labels[batch.indices])
        assert batch.indices.dtype == torch.int64


def test_shuffle_changes_between_epochs_and_replays():
    split = make_synthetic_split(50, 10, seed=0)
    batches = _batches(split, 50, shuffle=True, augment=True, seed=3)
    state = batches.state_dict()
    first = next(iter(batches))
    second = next(iter(batches))
    assert not torch.equal(first.indices, second.indices)

    batches.load_state_dict(state)
    replay = next(iter(batches))
    assert torch.equal(replay.indices, first.indices)
    assert torch.equal(replay.inputs, first.inputs)


def test_unaugmented_batches_are_normalised_images():
    split = make_synthetic_split(10, 10, seed=0)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    batch = next(iter(_batches(split, 10, shuffle=False, augment=False, mean=mean, std=std)))

    # Reference: torchvision's own conversion and normalisation, image by image.
    for position in range(10):
        image = split.images[position].permute(2, 0, 1)   # (3, 32, 32) uint8
        expected = TF.normalize(TF.convert_image_dtype(image, torch.float32), mean, std)
        torch.testing.assert_close(batch.inputs[position], expected, rtol=1e-5, atol=1e-5)


def test_augmentation_is_crop_and_flip():
    # Random pixels make every crop offset and flip give a different image.
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 32, 32, 3), dtype=torch.uint8, generator=generator)
    split = ImageSplit(images, torch.zeros(200, dtype=torch.int64), ["a"])
    batch = next(iter(_batches(split, 200, shuffle=False, augment=True, mean=(0, 0, 0),
                               std=(1, 1, 1))))
    assert batch.inputs.shape == (200, 3, 32, 32)
    assert batch.inputs.dtype == torch.float32

    flips = 0
    offsets = set()
    size = 32
    for position in range(200):
        original = TF.convert_image_dtype(images[position].permute(2, 0, 1), torch.float32)
        padded = TF.pad(original, [CROP_PADDING] * 4, fill=0)
        matches = [(top, left, flip)
                   for top in range(2 * CROP_PADDING + 1)
                   for left in range(2 * CROP_PADDING + 1)
                   for flip in (False, True)
                   if torch.allclose(batch.inputs[position],
                                     _crop(padded, top, left, size, flip), atol=1e-6)]
        assert len(matches) == 1, f"image {position} is no single crop/flip of its original"
        top, left, flip = matches[0]
        flips += flip
        offsets.add((top, left))

    # Fair coin: 200 flips land in [60, 140] with probability above 0.99999.
    assert 60 <= flips <= 140
    assert len(offsets) > 40
    assert {top for top, _ in offsets} == set(range(9))


def _crop(padded: torch.Tensor, top: int, left: int, size: int, flip: bool) -> torch.Tensor:
    crop = TF.crop(padded, top, left, size, size)
    return TF.hflip(crop) if flip else crop


def test_channel_stats_match_numpy():
    split = make_synthetic_split(40, 10, seed=5)
    mean, std = channel_stats(split.images)
    pixels = split.images.numpy().reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(mean.numpy(), pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), pixels.std(0), rtol=1e-5)


def test_normalised_training_set_has_zero_mean_unit_std():
    split = make_synthetic_split(120, 10, seed=6)
    mean, std = channel_stats(split.images)
    batches = DeviceBatches(split, 50, mean, std, "cpu", shuffle=False, augment=False)
    inputs = torch.cat([batch.inputs for batch in batches]).double()   # (120, 3, 32, 32)

    torch.testing.assert_close(inputs.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(inputs.std((0, 2, 3), correction=0),
                               torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)


def test_invalid_batch_size():
    split = make_synthetic_split(10, 10, seed=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        _batches(split, 0, shuffle=False, augment=False)


# The real CIFAR-10 copy.

def test_real_cifar10(real_data_dir):
    train, test = load_cifar("cifar10", real_data_dir)
    assert train.images.shape == (50000, 32, 32, 3)
    assert test.images.shape == (10000, 32, 32, 3)
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert train.classes[0] == "airplane"

    # Published CIFAR-10 channel statistics; the JPEG copy differs by a few grey levels.
    mean, std = channel_stats(train.images)
    torch.testing.assert_close(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.01, rtol=0)
    torch.testing.assert_close(std, torch.tensor([0.2470, 0.2435, 0.2616]), atol=0.01, rtol=0)
