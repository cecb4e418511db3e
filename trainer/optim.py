"""Build optimizers from the ``optimizer`` config group.

Every optimizer config is a Hydra partial (``_target_`` and ``_partial_: true``). First-order
optimizers from ``torch.optim`` receive ``model.parameters()``; optimizers whose class sets
``needs_model = True`` (FNGD and the second-order baselines) receive the model itself,
because they hook its layers, and ``steps_per_epoch`` when their constructor accepts it.
"""

from __future__ import annotations

import functools
import inspect

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn


def build_optimizer(optimizer_cfg: DictConfig, model: nn.Module,
                    steps_per_epoch: int) -> torch.optim.Optimizer:
    """Instantiate ``optimizer_cfg`` for ``model``."""
    factory = instantiate(optimizer_cfg)
    if not isinstance(factory, functools.partial):
        raise ValueError(f"optimizer config for {optimizer_cfg.get('_target_')!r} must set "
                         "'_partial_: true' so that the trainer can pass the model or parameters")
    optimizer_class = factory.func
    if not getattr(optimizer_class, "needs_model", False):
        return factory(model.parameters())
    kwargs = {}
    if "steps_per_epoch" in inspect.signature(optimizer_class).parameters:
        kwargs["steps_per_epoch"] = steps_per_epoch
    return factory(model, **kwargs)
