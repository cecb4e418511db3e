"""Write a prepared copy of CIFAR-10 or CIFAR-100 for machines without internet access.

    python -m scripts.prepare_data cifar10 --root DIR

downloads the official files through torchvision (into DIR/downloads, or the folder
that --download-dir sets) and writes DIR/cifar10/train.npz and test.npz with the
arrays images (uint8, N x 32 x 32 x 3), labels (int64) and classes. Copy DIR to the other
machine and train with dataset.root=DIR.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data.cifar import CIFAR_DATASETS, load_torchvision_cifar, write_npz

logger = logging.getLogger("scripts.prepare_data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(CIFAR_DATASETS),
                        help="data set to prepare")
    parser.add_argument("--root", required=True, type=Path,
                        help="folder to write {dataset}/train.npz and test.npz into")
    parser.add_argument("--download-dir", type=Path, default=None,
                        help="folder for the official files (default: ROOT/downloads)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing .npz files")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    target = args.root / args.dataset
    paths = {"train": target / "train.npz", "test": target / "test.npz"}
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not args.overwrite:
        sys.exit(f"error: {', '.join(existing)} already exist; pass --overwrite to replace them")

    download_dir = args.download_dir or args.root / "downloads"
    train, test = load_torchvision_cifar(args.dataset, download_dir, download=True)
    for split_name, split in (("train", train), ("test", test)):
        write_npz(split, paths[split_name])
        logger.info("Wrote %s: %d images, %d classes", paths[split_name], len(split),
                    len(split.classes))


if __name__ == "__main__":
    main()
