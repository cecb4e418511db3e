"""CIFAR-10 and CIFAR-100: reading, validation, subsets and on-device batches.

Two on-disk sources are supported under one root directory:

* a prepared copy, ``{root}/{name}/train.npz`` and ``test.npz`` with the arrays ``images``
  (uint8, ``(N, 32, 32, 3)``, RGB), ``labels`` (integers in ``[0, num_classes)``) and
  ``classes`` (``num_classes`` strings), as ``python -m scripts.prepare_data`` writes it;
* the official Python-pickle files that torchvision reads and downloads
  (``{root}/cifar-10-batches-py`` or ``{root}/cifar-100-python``).

The prepared copy wins when both exist. Images stay uint8 on the training device, where
random crop, horizontal flip and normalisation run on whole batches (``DeviceBatches``).
The input pipeline therefore costs a few kernel launches per step and no CPU workers.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IMAGE_SHAPE = (32, 32, 3)

# Zero padding on each side before the random 32x32 crop.
CROP_PADDING = 4

NPZ_ARRAYS = ("images", "labels", "classes")


@dataclass(frozen=True)
class CifarSpec:
    """On-disk differences between CIFAR-10 and CIFAR-100."""

    title: str
    num_classes: int
    torchvision_class: str
    torchvision_folder: str


CIFAR_DATASETS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec("CIFAR-10", 10, "CIFAR10", "cifar-10-batches-py"),
    "cifar100": CifarSpec("CIFAR-100", 100, "CIFAR100", "cifar-100-python"),
}


@dataclass
class ImageSplit:
    """One split of an image data set, as stored: NHWC uint8 images and int64 labels."""

    images: torch.Tensor   # (N, 32, 32, 3) uint8
    labels: torch.Tensor   # (N,) int64
    classes: list[str]

    def __len__(self) -> int:
        return self.labels.shape[0]


def get_spec(name: str) -> CifarSpec:
    """Return the description of the CIFAR data set ``name``, or raise listing the valid names."""
    if name not in CIFAR_DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; valid names: "
                         f"{', '.join(CIFAR_DATASETS)}")
    return CIFAR_DATASETS[name]


def _prepare_hint(name: str) -> str:
    return (f"Set dataset.root to the folder that contains it, add dataset.download=true to "
            f"download the official files, or run `python -m scripts.prepare_data {name} "
            f"--root DIR` on a machine with internet access and copy DIR here")


def load_cifar(name: str, root: str | os.PathLike, download: bool = False
               ) -> tuple[ImageSplit, ImageSplit]:
    """Load the train and test splits of ``name`` (cifar10 or cifar100) from ``root``.

    Raises:
        ValueError: for an unknown name or a corrupt or wrongly shaped ``.npz`` file.
        FileNotFoundError: when neither source exists and ``download`` is false.
    """
    spec = get_spec(name)
    root = Path(root)
    npz_dir = root / name
    torchvision_dir = root / spec.torchvision_folder

    if npz_dir.is_dir():
        paths = [npz_dir / "train.npz", npz_dir / "test.npz"]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{spec.title} folder {npz_dir} lacks {', '.join(missing)}. "
                                    + _prepare_hint(name))
        logger.info("Reading %s from %s", spec.title, npz_dir)
        return read_npz(paths[0], spec.num_classes), read_npz(paths[1], spec.num_classes)

    if torchvision_dir.is_dir() or download:
        return load_torchvision_cifar(name, root, download)

    raise FileNotFoundError(
        f"{spec.title} not found under dataset.root={str(root)!r}: expected {npz_dir}/train.npz "
        f"and test.npz (a prepared copy) or {torchvision_dir} (the official files). "
        + _prepare_hint(name))


def load_torchvision_cifar(name: str, root: str | os.PathLike, download: bool
                           ) -> tuple[ImageSplit, ImageSplit]:
    """Load both splits of ``name`` from the official files through torchvision.

    With ``download`` torchvision fetches the archive into ``root`` when it is missing.
    """
    import torchvision.datasets

    spec = get_spec(name)
    dataset_class = getattr(torchvision.datasets, spec.torchvision_class)
    logger.info("Reading %s through torchvision from %s (download=%s)", spec.title, root,
                download)
    splits = []
    for train in (True, False):
        try:
            dataset = dataset_class(root=str(root), train=train, download=download)
        except RuntimeError as error:
            # torchvision raises RuntimeError when the files fail their checksum.
            raise FileNotFoundError(f"{spec.title} files under {root} are missing or corrupt "
                                    f"({error}). " + _prepare_hint(name)) from error
        splits.append(split_from_torchvision(dataset))
    return splits[0], splits[1]


def split_from_torchvision(dataset) -> ImageSplit:
    """Convert a torchvision CIFAR dataset (``data``, ``targets``, ``classes``) to an ImageSplit."""
    images = torch.from_numpy(np.ascontiguousarray(dataset.data, dtype=np.uint8))
    labels = torch.as_tensor(np.asarray(dataset.targets, dtype=np.int64))
    return ImageSplit(images, labels, [str(name) for name in dataset.classes])


def read_npz(path: str | os.PathLike, num_classes: int) -> ImageSplit:
    """Read and validate one split in the prepared ``.npz`` layout.

    Every error names the file and the array at fault.
    """
    path = Path(path)
    fix = "recreate it with `python -m scripts.prepare_data` or copy it again"
    arrays = {}
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"could not read {path} as an .npz archive ({error}); {fix}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} contains a single .npy array, not an .npz archive with the "
                         f"arrays {', '.join(NPZ_ARRAYS)}; {fix}")

    with archive:
        missing = [key for key in NPZ_ARRAYS if key not in archive.files]
        if missing:
            raise ValueError(f"{path} lacks the array(s) {', '.join(missing)} (found: "
                             f"{', '.join(archive.files) or 'none'}); expected "
                             f"{', '.join(NPZ_ARRAYS)}; {fix}")
        for key in NPZ_ARRAYS:
            try:
                arrays[key] = archive[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
                raise ValueError(f"could not read array {key!r} from {path} ({error}); "
                                 f"{fix}") from error

    images, labels, classes = arrays["images"], arrays["labels"], arrays["classes"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"array 'images' in {path} has dtype {images.dtype} and shape "
                         f"{images.shape}; expected uint8 (N, 32, 32, 3), height, width, RGB")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (images.shape[0],):
        raise ValueError(f"array 'labels' in {path} has dtype {labels.dtype} and shape "
                         f"{labels.shape}; expected integers of shape ({images.shape[0]},), "
                         "one per image")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"array 'labels' in {path} has values from {labels.min()} to "
                         f"{labels.max()}; expected 0 to {num_classes - 1}")
    if classes.ndim != 1 or classes.shape[0] != num_classes:
        raise ValueError(f"array 'classes' in {path} has shape {classes.shape}; expected "
                         f"({num_classes},), one name per class")

    return ImageSplit(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                      [str(name) for name in classes])


def write_npz(split: ImageSplit, path: str | os.PathLike) -> None:
    """Write ``split`` in the prepared layout, atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        np.savez_compressed(file, images=split.images.numpy(), labels=split.labels.numpy(),
                            classes=np.array(split.classes))
    os.replace(temporary, path)


def take_subset(split: ImageSplit, size: Optional[int], seed: int, option: str) -> ImageSplit:
    """Return ``size`` images of ``split`` drawn without replacement with ``seed``.

    The subset depends on ``seed`` only, not on the training seed, so runs that differ in
    their seed see the same images. The chosen images keep their original order.

    Args:
        option: the config key that set ``size``, named in errors.
    """
    if size is None:
        return split
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{option}={size!r} is invalid; use a positive number of images, or "
                         "null for all of them")
    if size > len(split):
        raise ValueError(f"{option}={size} is larger than the split, which has {len(split)} "
                         f"images; use at most {len(split)}, or null for all of them")

    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(split), generator=generator)[:size].sort().values
    return ImageSplit(split.images[chosen], split.labels[chosen], split.classes)


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the per-channel mean and standard deviation of uint8 NHWC images, scaled to [0, 1]."""
    pixels = images.reshape(-1, images.shape[-1])   # (N * H * W, C)

    # A 256-bin histogram per channel gives exact moments and is about ten times faster on
    # 50,000 images than converting every pixel to floating point.
    histograms = torch.stack([torch.bincount(pixels[:, channel], minlength=256)
                              for channel in range(pixels.shape[1])]).double()   # (C, 256)
    values = torch.arange(256, dtype=torch.float64)
    count = histograms.sum(1)

    mean = (histograms * values).sum(1) / count
    variance = (histograms * values.square()).sum(1) / count - mean.square()
    std = variance.clamp_min(0).sqrt()
    return (mean / 255.0).float(), (std / 255.0).float()


@dataclass
class ImageBatch:
    """One batch: normalised inputs, labels and each sample's index in its split."""

    inputs: torch.Tensor    # (B, 3, 32, 32) float32
    targets: torch.Tensor   # (B,) int64
    indices: torch.Tensor   # (B,) int64


class DeviceBatches:
    """Batches of one split, with the split kept as uint8 on ``device``.

    Each pass (``iter``) is one epoch. With ``shuffle`` the order is a fresh permutation per
    epoch. With ``augment`` every image gets a random 32x32 crop of its zero-padded copy
    (padding 4) and is flipped horizontally with probability 1/2. The last batch is smaller
    when ``batch_size`` does not divide the split; it is kept.

    All random draws come from ``generator`` (a CPU generator), so the sequence of batches
    depends only on its seed and state, on any device; ``state_dict`` saves that state.
    """

    def __init__(self, split: ImageSplit, batch_size: int, mean: torch.Tensor,
                 std: torch.Tensor, device: torch.device, shuffle: bool, augment: bool,
                 generator: Optional[torch.Generator] = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid; use a positive integer")
        if (shuffle or augment) and generator is None:
            raise ValueError("shuffle and augment need a torch.Generator for their random draws")

        self.device = torch.device(device)
        self.images = split.images.to(self.device)   # (N, 32, 32, 3) uint8
        self.labels = split.labels.to(self.device)   # (N,)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.generator = generator

        # Normalisation as one multiply-add on [0, 255] values: (x / 255 - mean) / std.
        std = std.to(torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(self.device)
        self._shift = (-mean.to(torch.float32) / std).view(1, -1, 1, 1).to(self.device)
        self._positions = torch.arange(IMAGE_SHAPE[0], device=self.device)

    def __len__(self) -> int:
        return math.ceil(self.labels.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[ImageBatch]:
        count = self.labels.shape[0]

        # Draw the whole epoch's randomness at once: one transfer to the device per epoch.
        if self.shuffle:
            order = torch.randperm(count, generator=self.generator).to(self.device)
        else:
            order = torch.arange(count, device=self.device)
        if self.augment:
            offsets = torch.randint(0, 2 * CROP_PADDING + 1, (count, 2),
                                    generator=self.generator).to(self.device)
            flips = (torch.rand(count, generator=self.generator) < 0.5).to(self.device)

        for start in range(0, count, self.batch_size):
            indices = order[start:start + self.batch_size]
            images = self.images[indices]   # (B, 32, 32, 3) uint8
            if self.augment:
                positions = slice(start, start + self.batch_size)
                images = self._crop_and_flip(images, offsets[positions], flips[positions])
            yield ImageBatch(self._normalise(images), self.labels[indices], indices)

    def _crop_and_flip(self, images: torch.Tensor, offsets: torch.Tensor,
                       flips: torch.Tensor) -> torch.Tensor:
        """Crop each padded image at its offset, reading columns backwards where flipped."""
        size = IMAGE_SHAPE[0]
        padded = F.pad(images, (0, 0) + (CROP_PADDING,) * 4)   # (B, 40, 40, 3)

        # A flip is a crop whose column index runs backwards, so both are one gather.
        rows = offsets[:, :1] + self._positions                       # (B, 32)
        forward_columns = self._positions.expand(len(images), size)
        columns = torch.where(flips[:, None], size - 1 - forward_columns, forward_columns)
        columns = offsets[:, 1:] + columns                             # (B, 32)

        batch = torch.arange(len(images), device=self.device)
        return padded[batch[:, None, None], rows[:, :, None], columns[:, None, :]]

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        inputs = images.permute(0, 3, 1, 2).to(torch.float32)   # (B, 3, 32, 32)
        return (inputs * self._scale + self._shift).contiguous()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
