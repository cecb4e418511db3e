"""The update and argument checks that FNGD and the baselines in ``baselines/`` share."""

from __future__ import annotations

import math
from typing import Sequence

import torch


# --------------------------------------------------------------------------------------------
# Argument checks


def check_number(name: str, value, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number in the given interval."""
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if valid:
        valid = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
    if not valid:
        left = "(" if low_open else "["
        right = ")" if high_open or math.isinf(high) else "]"
        upper = "inf" if math.isinf(high) else f"{high:g}"
        raise ValueError(f"invalid {name}={value!r}: expected a finite number in "
                         f"{left}{low:g}, {upper}{right}")


def check_interval(name: str, value) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer step count >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"invalid {name}={value!r}: expected an integer number of steps >= 1")


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        expected = ", ".join(map(repr, choices))
        raise ValueError(f"invalid {name}={value!r}: expected one of {expected}")


def check_sgd_arguments(lr, momentum, weight_decay, nesterov) -> None:
    """Check the SGD-momentum hyperparameters that FNGD and every baseline take."""
    check_number("lr", lr, 0.0)
    check_number("momentum", momentum, 0.0, 1.0)
    check_number("weight_decay", weight_decay, 0.0)
    if nesterov and momentum <= 0:
        raise ValueError(f"nesterov=True needs momentum > 0, got momentum={momentum!r}")


# --------------------------------------------------------------------------------------------
# The update


def sgd_momentum_update(params: list[torch.Tensor], directions: list[torch.Tensor],
                        state: dict, lr: float, momentum: float, weight_decay: float,
                        nesterov: bool) -> None:
    """Apply ``torch.optim.SGD``'s update (no dampening) with ``directions`` as the gradients.

    ``b <- momentum * b + (d + weight_decay * w)``, ``w <- w - lr * b`` (or ``w - lr *
    (d + weight_decay * w + momentum * b)`` with Nesterov). Buffers live in
    ``state[p]["momentum_buffer"]``, the key ``torch.optim.SGD`` uses.
    """
    if not params:
        return

    if weight_decay != 0:
        directions = torch._foreach_add(directions, params, alpha=weight_decay)

    if momentum != 0:
        buffers = []
        for param, direction in zip(params, directions):
            param_state = state[param]
            buffer = param_state.get("momentum_buffer")
            if buffer is None:
                buffer = torch.clone(direction).detach()
                param_state["momentum_buffer"] = buffer
            else:
                buffer.mul_(momentum).add_(direction)
            buffers.append(buffer)
        if nesterov:
            directions = torch._foreach_add(directions, buffers, alpha=momentum)
        else:
            directions = buffers

    torch._foreach_add_(params, directions, alpha=-lr)
