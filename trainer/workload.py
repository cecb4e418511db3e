"""The workload interface: what the shared training loop needs from a task.

A workload owns its data, builds its model and computes its loss and evaluation metrics.
The loop in ``trainer.train`` owns everything else (optimizer, schedule, timing, metrics
files, checkpoints, loggers), so image classification and translation share it. The dataset
config selects the workload class by its import path in ``dataset.workload``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, Sized

import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from torch import nn


class Batch(Protocol):
    """Training batch fields that the loop reads; the workload defines the others."""

    indices: torch.Tensor   # (B,) int64 dataset index of each sample, on the training device


class Batches(Sized, Iterable[Batch], Protocol):
    """An epoch of batches: ``len`` is the number of optimizer steps in one pass."""


@dataclass
class LossOutput:
    """A batch's loss as sums, so that means over an epoch are exact for any batch sizes.

    Attributes:
        loss_sum: the loss summed over the valid examples (tokens for translation), a scalar
            attached to the autograd graph.
        count: the number of valid examples in the batch.
        sums: further per-example totals, such as the number of correct predictions under
            ``"accuracy"``. The loop reports ``train_<key>`` as the epoch's total divided by
            the epoch's total count.
    """

    loss_sum: torch.Tensor
    count: int | torch.Tensor
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


class Workload(abc.ABC):
    """A training task: data, model, loss and evaluation.

    Subclasses are constructed as ``cls(cfg, device)`` with the whole run config, load their
    data in ``__init__`` and must keep the number of batches fixed across epochs, because
    optimizers such as FNGD count steps per epoch.
    """

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.cfg = cfg
        self.device = device

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """Instantiate ``cfg.model`` with values that come from the data (classes, vocabularies)."""

    @abc.abstractmethod
    def train_batches(self) -> Batches:
        """Return the training batches; each iteration over them is one shuffled epoch."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Run the forward pass on a training batch and return the summed loss."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Compute the evaluation metrics, keyed by name (``test_loss``, ``test_accuracy``...).

        The loop calls this with the model in eval mode and gradients disabled.
        """

    def state_dict(self) -> dict:
        """Return the random state of the data pipeline, saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    def describe(self) -> dict:
        """Return facts about the data for ``run.json`` (sizes, sources, normalisation)."""
        return {}

    def save_artifacts(self, run_dir: Path) -> None:
        """Write files that evaluation of this run needs later, such as vocabularies."""


class EpochTotals:
    """Running sums of ``LossOutput`` values over an epoch, kept on the device.

    Adding does not synchronise with the device; ``means`` does, once.
    """

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, output: LossOutput) -> None:
        self.loss += output.loss_sum.detach().double()
        self.count += output.count.detach().double() if torch.is_tensor(output.count) \
            else float(output.count)
        for key, value in output.sums.items():
            if key not in self.sums:
                self.sums[key] = torch.zeros_like(self.loss)
            self.sums[key] += value.detach().double()

    def means(self, prefix: str) -> dict[str, float]:
        """Return ``{prefix}_loss`` and ``{prefix}_<key>`` for every extra sum."""
        count = self.count.item()
        if count == 0:
            raise ValueError(f"no {prefix} examples were seen, so no {prefix} mean exists")
        metrics = {f"{prefix}_loss": self.loss.item() / count}
        for key, value in self.sums.items():
            metrics[f"{prefix}_{key}"] = value.item() / count
        return metrics


def evaluate_batches(workload: Workload, model: nn.Module, batches: Iterable[Batch],
                     prefix: str) -> dict[str, float]:
    """Average ``workload.loss`` over ``batches`` into ``{prefix}_loss`` and ``{prefix}_<key>``."""
    totals = EpochTotals(workload.device)
    for batch in batches:
        totals.add(workload.loss(model, batch))
    return totals.means(prefix)


def build_workload(cfg: DictConfig, device: torch.device) -> Workload:
    """Construct the workload class named by ``cfg.dataset.workload``."""
    path = cfg.dataset.get("workload")
    if not path:
        raise ValueError("the dataset config has no 'workload' key; set it to the import path "
                         "of a Workload subclass, e.g. trainer.classification.ImageClassification")
    try:
        workload_class = get_class(path)
    except Exception as error:   # Hydra wraps import failures in several exception types.
        raise ValueError(f"dataset.workload={path!r} could not be imported ({error}); use the "
                         "import path of a Workload subclass") from error
    if not (isinstance(workload_class, type) and issubclass(workload_class, Workload)):
        raise ValueError(f"dataset.workload={path!r} is not a subclass of "
                         "trainer.workload.Workload")
    return workload_class(cfg, device)
