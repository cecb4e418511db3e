"""Shampoo with blocked left and right statistics, eigendecomposed roots and SGD grafting."""

from __future__ import annotations

import logging
import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fngd.layers import LayerHelper

from .base import PreconditionedSGD
from .common import (batched_eigh, check_choice, check_interval, check_number,
                     check_sgd_arguments)

logger = logging.getLogger(__name__)

GRAFTING = ("sgd", "none")


class _BlockLayout:
    """Block partition of one layer's ``(G, D_out, D_in)`` gradient matrix.

    A dimension above ``block_size`` is cut into ``n = ceil(D / block_size)`` blocks of
    ``ceil(D / n)`` rows or columns, and the last block is padded with zeros. The padding
    changes nothing. A zero row of the gradient gives a zero row and column in the statistic,
    so its inverse root is block-diagonal too, and the padded entries are cut off again.
    """

    def __init__(self, groups: int, rows: int, columns: int, block_size: int):
        self.groups, self.rows, self.columns = groups, rows, columns
        self.row_blocks = math.ceil(rows / block_size)
        self.column_blocks = math.ceil(columns / block_size)
        self.block_rows = math.ceil(rows / self.row_blocks)
        self.block_columns = math.ceil(columns / self.column_blocks)

    @property
    def count(self) -> int:
        return self.groups * self.row_blocks * self.column_blocks

    def split(self, matrix: torch.Tensor) -> torch.Tensor:
        """Return ``(G, D_out, D_in)`` as ``(B, block_rows, block_columns)`` blocks."""
        pad_rows = self.row_blocks * self.block_rows - self.rows
        pad_columns = self.column_blocks * self.block_columns - self.columns
        if pad_rows or pad_columns:
            matrix = F.pad(matrix, (0, pad_columns, 0, pad_rows))
        blocks = matrix.reshape(self.groups, self.row_blocks, self.block_rows,
                                self.column_blocks, self.block_columns)
        return blocks.transpose(2, 3).reshape(-1, self.block_rows, self.block_columns)

    def merge(self, blocks: torch.Tensor) -> torch.Tensor:
        """Invert ``split``."""
        matrix = blocks.reshape(self.groups, self.row_blocks, self.column_blocks,
                                self.block_rows, self.block_columns).transpose(2, 3)
        matrix = matrix.reshape(self.groups, self.row_blocks * self.block_rows,
                                self.column_blocks * self.block_columns)
        return matrix[:, : self.rows, : self.columns]


class Shampoo(PreconditionedSGD):
    r"""Shampoo (Gupta, Koren & Singer 2018) on the weight matrices of ``nn.Linear`` and
    ``nn.Conv2d`` layers, with SGD grafting (Agarwal et al. 2020).

    Each layer's gradient ``W`` is a ``D_out x D_in`` matrix: Conv2d weights are
    ``O x (I * kh * kw)`` (one matrix per group), a bias is the last column. Dimensions above
    ``block_size`` are cut into blocks, and each block ``W_b`` keeps its own statistics,
    updated every ``statistics_interval`` steps:

    .. math::
        L_b \leftarrow \beta_2 L_b + c\, W_b W_b^T, \qquad
        R_b \leftarrow \beta_2 R_b + c\, W_b^T W_b

    with ``c = 1`` for ``beta2 = 1`` (a plain sum, as in the original method) and
    ``c = 1 - beta2`` otherwise. Every ``inverse_interval`` steps, from
    ``start_preconditioning_step`` on, the inverse fourth roots are computed through a
    symmetric eigendecomposition, ``L = Q diag(l) Q^T``:

    .. math::
        L^{-1/4} = Q \operatorname{diag}\big((l + \epsilon\, l_{max})^{-1/4}\big) Q^T,

    the ridge ``epsilon * l_max`` relative to the largest eigenvalue, as in the Google
    reference code (``matrix_functions.ComputePower``). The preconditioned block is
    ``P_b = L_b^{-1/4} W_b R_b^{-1/4}``; before the first roots exist, ``P = W``. With SGD
    grafting the layer's ``P`` is rescaled to the norm of its gradient,
    ``P <- P * ||W||_F / ||P||_F``, so Shampoo sets the direction and SGD the step size. Then

    .. math::
        b \leftarrow \mu b + (P + \text{wd}\, w), \qquad w \leftarrow w - \eta b,

    with the plain gradient in place of P for parameters outside the preconditioned layers.

    Where this differs from the Google reference code: that code preconditions every
    dimension of each parameter tensor with the exponent ``-1 / (2 * rank)``, so a Conv2d
    kernel gets three or four statistics and -1/6 or -1/8 roots. Here each layer's gradient
    is one matrix with two statistics and -1/4 roots, as the method is usually stated. The
    roots come from eigendecompositions instead of coupled Newton iterations. Large
    dimensions are cut into blocks of equal size rather than blocks of exactly
    ``block_size`` plus a remainder.

    Args:
        model: the module whose layers are preconditioned.
        lr: learning rate (default 0.1).
        momentum: SGD momentum (default 0.9).
        weight_decay: L2 penalty added after preconditioning (default 0).
        nesterov: Nesterov momentum (default False).
        epsilon: ridge relative to the largest eigenvalue of each statistic (default 1e-6).
        beta2: statistics decay in (0, 1]; 1 sums them (default 1).
        statistics_interval: steps between statistics updates, T1 (default 10).
        inverse_interval: steps between inverse-root computations, T2 (default 100).
        start_preconditioning_step: the first step that computes roots, and earlier steps
            use the plain gradient. The default None means ``inverse_interval``, so that the
            first roots see ``inverse_interval / statistics_interval + 1`` gradients, not one.
        block_size: largest block dimension (default 128).
        grafting: ``"sgd"`` (layer step norm of SGD) or ``"none"``.
        skip: ``fnmatch`` patterns of module names to leave on the plain gradient.
        params: parameters or groups to optimize (default: all of ``model`` that need a gradient).
        check_finite: skip a step whose gradients hold inf or NaN; it reads one flag from the
            device each step.
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, nesterov: bool = False, epsilon: float = 1e-6,
                 beta2: float = 1.0, statistics_interval: int = 10, inverse_interval: int = 100,
                 start_preconditioning_step: Optional[int] = None, block_size: int = 128,
                 grafting: str = "sgd", skip: Iterable[str] = (),
                 params: Optional[Iterable] = None, check_finite: bool = True):
        check_sgd_arguments(lr, momentum, weight_decay, nesterov)
        check_number("epsilon", epsilon, 0.0, low_open=True)
        check_number("beta2", beta2, 0.0, 1.0, low_open=True, high_open=False)
        check_interval("statistics_interval", statistics_interval)
        check_interval("inverse_interval", inverse_interval)
        if start_preconditioning_step is None:
            start_preconditioning_step = inverse_interval
        if (not isinstance(start_preconditioning_step, int)
                or isinstance(start_preconditioning_step, bool) or start_preconditioning_step < 0):
            raise ValueError(f"invalid start_preconditioning_step={start_preconditioning_step!r}: "
                             "expected an integer step >= 0 or None")
        check_interval("block_size", block_size)
        check_choice("grafting", grafting, GRAFTING)

        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(model, defaults, skip, params, check_finite)
        self.epsilon = epsilon
        self.beta2 = beta2
        self.statistics_interval = statistics_interval
        self.inverse_interval = inverse_interval
        self.start_preconditioning_step = start_preconditioning_step
        self.block_size = block_size
        self.grafting = grafting
        self._counters.update(statistics_updates=0, inverse_updates=0, decomposition_failures=0)

        self._layouts = {h.name: self._layout(h) for h in self.layers}

    def _layout(self, helper: LayerHelper) -> _BlockLayout:
        weight = helper.weight
        groups = helper.groups
        rows = weight.shape[0] // groups
        columns = weight[0].numel() + (1 if helper.has_bias else 0)
        return _BlockLayout(groups, rows, columns, self.block_size)

    # ----------------------------------------------------------------------------------------
    # Statistics and roots

    def _update_statistics(self, blocks: dict[str, torch.Tensor]) -> None:
        for name, block in blocks.items():
            state = self.layer_state[name]
            left = block @ block.transpose(-1, -2)  # (B, rows, rows)
            right = block.transpose(-1, -2) @ block  # (B, columns, columns)
            if "L" not in state:
                state["L"] = torch.zeros_like(left)
                state["R"] = torch.zeros_like(right)
            if self.beta2 == 1.0:
                state["L"].add_(left)
                state["R"].add_(right)
            else:
                state["L"].mul_(self.beta2).add_(left, alpha=1.0 - self.beta2)
                state["R"].mul_(self.beta2).add_(right, alpha=1.0 - self.beta2)
        self._counters["statistics_updates"] += 1

    def _update_roots(self) -> None:
        ready = [h for h in self.layers if "L" in self.layer_state[h.name]]
        if not ready:
            return
        matrices = []
        for helper in ready:
            state = self.layer_state[helper.name]
            matrices += [state["L"], state["R"]]
        results = batched_eigh(matrices)

        for index, helper in enumerate(ready):
            state = self.layer_state[helper.name]
            result_left, result_right = results[2 * index], results[2 * index + 1]
            if result_left is None or result_right is None:
                self._counters["decomposition_failures"] += (
                    (result_left is None) + (result_right is None))
                outcome = "keeps its previous roots" if "L_root" in state else \
                    "stays on the plain gradient"
                logger.warning("Shampoo: eigendecomposition of the statistics of %s failed at "
                               "step %d (statistics not finite or the solver did not converge); "
                               "the layer %s (%d failures so far)", helper.name,
                               self._step_count, outcome, self._counters["decomposition_failures"])
                continue
            state["L_root"] = self._inverse_fourth_root(*result_left)
            state["R_root"] = self._inverse_fourth_root(*result_right)
        self._counters["inverse_updates"] += 1

    def _inverse_fourth_root(self, values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Return ``(S + epsilon * s_max I)^{-1/4}`` from the eigendecomposition of S."""
        largest = values[..., -1:]  # eigh sorts ascending; (B, 1)
        roots = (values + self.epsilon * largest).pow(-0.25)
        root = (vectors * roots.unsqueeze(-2)) @ vectors.transpose(-1, -2)
        # A statistic that is all zeros belongs to a block whose gradient was always zero.
        # It has no scale to set the ridge from, so the identity leaves the block unchanged.
        empty = (largest <= 0).unsqueeze(-1)
        identity = torch.eye(root.shape[-1], dtype=root.dtype, device=root.device)
        return torch.where(empty, identity, root)

    # ----------------------------------------------------------------------------------------
    # Preconditioning

    def _preconditioned_matrices(self) -> dict[str, torch.Tensor]:
        step = self._step_count
        gradients, blocks = {}, {}
        for helper in self.layers:
            gradient = self._gradient_matrix(helper)
            if gradient is not None:
                gradients[helper.name] = gradient
                blocks[helper.name] = self._layouts[helper.name].split(gradient)

        if step % self.statistics_interval == 0:
            self._update_statistics(blocks)
        if step >= self.start_preconditioning_step and step % self.inverse_interval == 0:
            self._update_roots()

        matrices = {}
        for helper in self.layers:
            name = helper.name
            state = self.layer_state[name]
            if name not in blocks or "L_root" not in state:
                continue
            preconditioned = state["L_root"] @ blocks[name] @ state["R_root"]
            matrix = self._layouts[name].merge(preconditioned)
            if self.grafting == "sgd":
                norm = torch.linalg.vector_norm(matrix).clamp_min(torch.finfo(matrix.dtype).tiny)
                matrix = matrix * (torch.linalg.vector_norm(gradients[name]) / norm)
            matrices[name] = matrix
        return matrices
