"""FNGD, a fast natural-gradient optimizer for PyTorch; imports nothing but torch."""

from .layers import find_layers
from .optimizer import FNGD

__all__ = ["FNGD", "find_layers"]
