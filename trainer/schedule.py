"""Learning-rate schedules from the ``schedule`` config group, stepped once per epoch.

Each schedule config is a Hydra partial; the loop completes it with the optimizer and the
run's number of epochs.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, MultiStepLR


def step_decay(optimizer: torch.optim.Optimizer, epochs: int,
               milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1) -> MultiStepLR:
    """Multiply the learning rate by ``gamma`` after each fraction ``milestones`` of the epochs.

    A milestone fraction f becomes epoch ``ceil(f * epochs)``, the first epoch by which at
    least that fraction is done. With 200 epochs and the default fractions the rate drops
    after epochs 100 and 150, and with 3 epochs after epochs 2 and 3.
    """
    for fraction in milestones:
        if not 0 < fraction < 1:
            raise ValueError(f"schedule milestone {fraction} is invalid; use fractions of the "
                             "epochs strictly between 0 and 1")
    if not gamma > 0:
        raise ValueError(f"schedule.gamma={gamma} is invalid; use a positive factor")

    epochs_at = [math.ceil(fraction * epochs) for fraction in milestones]
    return MultiStepLR(optimizer, milestones=epochs_at, gamma=gamma)


def constant(optimizer: torch.optim.Optimizer, epochs: int) -> LambdaLR:
    """Keep the optimizer's learning rate for all epochs."""
    return LambdaLR(optimizer, lambda epoch: 1.0)


def build_scheduler(schedule_cfg: DictConfig, optimizer: torch.optim.Optimizer,
                    epochs: int) -> LRScheduler:
    """Instantiate ``schedule_cfg`` (a partial) for ``optimizer`` and ``epochs``."""
    factory = instantiate(schedule_cfg)
    if not callable(factory):
        raise ValueError(f"schedule config for {schedule_cfg.get('_target_')!r} must set "
                         "'_partial_: true' so that the trainer can pass the optimizer")
    return factory(optimizer, epochs=epochs)
