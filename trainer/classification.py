"""Image classification on CIFAR-10/100: the workload of the ResNet experiments."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from data.cifar import DeviceBatches, ImageBatch, channel_stats, get_spec, load_cifar, take_subset
from trainer.workload import LossOutput, Workload, evaluate_batches

logger = logging.getLogger(__name__)


class ImageClassification(Workload):
    """Cross-entropy training and test-split evaluation of an image classifier.

    Reads ``cfg.dataset``: ``name``, ``root``, ``download``, ``train_subset``, ``test_subset``,
    ``subset_seed``, ``batch_size``, ``eval_batch_size`` and ``augment``. Normalisation uses
    the channel mean and standard deviation of the whole training split (before subsetting),
    so a subset run normalises like a full run.
    """

    def __init__(self, cfg: DictConfig, device: torch.device):
        super().__init__(cfg, device)
        data_cfg = cfg.dataset
        self.spec = get_spec(data_cfg.name)
        if data_cfg.get("num_classes") not in (None, self.spec.num_classes):
            raise ValueError(f"dataset.num_classes={data_cfg.num_classes} does not match "
                             f"{self.spec.title}, which has {self.spec.num_classes} classes")

        train_split, test_split = load_cifar(data_cfg.name, data_cfg.root, data_cfg.download)
        self.mean, self.std = channel_stats(train_split.images)
        self.root = str(data_cfg.root)
        self.full_sizes = {"train": len(train_split), "test": len(test_split)}

        train_split = take_subset(train_split, data_cfg.train_subset, data_cfg.subset_seed,
                                  "dataset.train_subset")
        test_split = take_subset(test_split, data_cfg.test_subset, data_cfg.subset_seed,
                                 "dataset.test_subset")
        self.classes = train_split.classes

        # The data order has its own generator, so that changing the model (and so the
        # number of draws made to initialise it) leaves the batches unchanged.
        self.generator = torch.Generator().manual_seed(int(cfg.seed))
        self.train_loader = DeviceBatches(train_split, data_cfg.batch_size, self.mean, self.std,
                                          device, shuffle=True, augment=data_cfg.augment,
                                          generator=self.generator)
        self.test_loader = DeviceBatches(test_split, data_cfg.eval_batch_size, self.mean,
                                         self.std, device, shuffle=False, augment=False)
        logger.info("%s: %d training and %d test images, %d steps per epoch", self.spec.title,
                    len(train_split), len(test_split), len(self.train_loader))

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def build_model(self) -> nn.Module:
        return instantiate(self.cfg.model, num_classes=self.num_classes)

    def train_batches(self) -> DeviceBatches:
        return self.train_loader

    def loss(self, model: nn.Module, batch: ImageBatch) -> LossOutput:
        logits = model(batch.inputs)   # (B, num_classes)

        # The loss is computed in float32 even when the forward pass ran under autocast.
        loss_sum = F.cross_entropy(logits.float(), batch.targets, reduction="sum")
        correct = (logits.argmax(1) == batch.targets).sum()
        return LossOutput(loss_sum, batch.targets.shape[0], {"accuracy": correct})

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_batches(self, model, self.test_loader, "test")

    def state_dict(self) -> dict:
        return {"train_loader": self.train_loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.train_loader.load_state_dict(state["train_loader"])

    def describe(self) -> dict:
        return {
            "name": self.cfg.dataset.name,
            "root": self.root,
            "train_images": len(self.train_loader.labels),
            "test_images": len(self.test_loader.labels),
            "full_train_images": self.full_sizes["train"],
            "full_test_images": self.full_sizes["test"],
            "normalisation_mean": self.mean.tolist(),
            "normalisation_std": self.std.tolist(),
        }
