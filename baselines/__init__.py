"""The second-order baselines FNGD is compared with: KFAC, Shampoo and Eva.

Each is a ``torch.optim.Optimizer`` built from the model (``KFAC(model, lr=...)``), preconditions
``nn.Linear`` and ``nn.Conv2d`` layers found by ``fngd.layers.find_layers`` and moves every
other parameter along its plain gradient, with SGD momentum and weight decay added after
preconditioning. This package imports only torch and ``fngd.layers``.
"""

from .eva import Eva
from .kfac import KFAC
from .shampoo import Shampoo

__all__ = ["KFAC", "Shampoo", "Eva"]
