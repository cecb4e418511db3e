"""Eva: Kronecker vectors in place of Kronecker factors, inverted by Sherman-Morrison."""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
from torch import nn

from fngd.layers import LayerHelper, Recorder

from .base import PreconditionedSGD
from .common import check_number, check_sgd_arguments, without_autocast

logger = logging.getLogger(__name__)


class Eva(PreconditionedSGD):
    r"""Eva (Zhang, Shi & Li, ICLR 2023), preconditioning ``nn.Linear`` and ``nn.Conv2d`` layers.

    Each layer keeps two Kronecker vectors, running averages of the batch-mean layer input
    ``a`` (Conv2d: the mean patch; a bias adds a constant 1) and the batch-mean output
    gradient ``g``, both averaged over samples and positions:
    ``a <- xi a + (1 - xi) a_batch`` (xi = ``factor_decay``; the first batch sets them).
    The curvature of the layer is the rank-one Kronecker product ``(a a^T) ⊗ (g g^T)`` plus
    damping ``gamma I``, and the Sherman-Morrison formula inverts it in closed form, so the
    preconditioned gradient of the layer's gradient matrix ``W`` (weight and bias) is

    .. math::
        \operatorname{vec}(P) = \big((a a^T) \otimes (g g^T) + \gamma I\big)^{-1}
            \operatorname{vec}(W), \qquad
        P = \frac{1}{\gamma}\Big(W - \frac{g^T W a}{\gamma + \|a\|^2 \|g\|^2}\, g a^T\Big).

    Statistics and preconditioning run at every step; no matrix is ever inverted. Conv2d
    layers with ``groups > 1`` get one pair of vectors per group. KL clipping scales all
    preconditioned layers by ``nu = min(1, sqrt(kl_clip / sum_l lr^2 <P_l, W_l>))``, and then

    .. math::
        b \leftarrow \mu b + (P + \text{wd}\, w), \qquad w \leftarrow w - \eta b,

    with the plain gradient in place of P for parameters outside the preconditioned layers.

    ``g`` is the gradient the backward pass delivers, as in the authors' code
    (github.com/lzhangbv/eva, ``kfac/eva.py``): for a batch-mean loss it carries a factor
    ``1/M``. Where this differs from that code: the vectors use the whole batch (the authors
    take the first 16 samples), and ``factor_decay`` is the weight of the old vector.

    NOTE: the authors' ``kfac/eva.py`` multiplies the old vector by ``1 - factor_decay`` and
    the new one by ``factor_decay``, so with their default 0.95 the new batch gets weight
    0.95. To reproduce that code exactly, pass ``factor_decay=0.05`` here.

    NOTE: with ``torch.amp.GradScaler`` the recorded ``g`` carries the loss scale; bf16
    autocast needs no scaler and is unaffected.

    Args:
        model: the module whose layers are preconditioned; its hooks stay until ``remove()``.
        lr: learning rate (default 0.1).
        momentum: SGD momentum (default 0.9).
        weight_decay: L2 penalty added after preconditioning (default 0).
        nesterov: Nesterov momentum (default False).
        damping: ``gamma`` (default 0.03, the authors' value); a parameter-group option.
        kl_clip: KL-clipping bound (default 0.001, the authors' value); 0 or None turns
            clipping off.
        factor_decay: running-average weight of the old vectors, in [0, 1) (default 0.95).
        skip: ``fnmatch`` patterns of module names to leave on the plain gradient.
        params: parameters or groups to optimize (default: all of ``model`` that need a gradient).
        check_finite: skip a step whose gradients hold inf or NaN; it reads one flag from the
            device each step.
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, nesterov: bool = False, damping: float = 0.03,
                 kl_clip: Optional[float] = 0.001, factor_decay: float = 0.95,
                 skip: Iterable[str] = (), params: Optional[Iterable] = None,
                 check_finite: bool = True):
        check_sgd_arguments(lr, momentum, weight_decay, nesterov)
        check_number("damping", damping, 0.0, low_open=True)
        if kl_clip is not None:
            check_number("kl_clip", kl_clip, 0.0)
        check_number("factor_decay", factor_decay, 0.0, 1.0)

        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        damping=damping)
        super().__init__(model, defaults, skip, params, check_finite)
        self.kl_clip = kl_clip
        self.factor_decay = factor_decay
        self._counters.update(statistics_updates=0)

        # Batch vectors recorded in the backward pass since the last step: name -> [a, g, count].
        self._pending: dict[str, list] = {}
        self._recorder = Recorder(self.layers, self._record)

    # ----------------------------------------------------------------------------------------
    # Statistics, recorded in the backward pass

    @torch.no_grad()
    def _record(self, helper: LayerHelper, a: torch.Tensor, g: torch.Tensor) -> None:
        dtype = self._statistics_dtype(helper)
        with without_autocast(a.device):
            # Patch extraction is linear, so the mean patch is a patch of the mean input; this
            # extracts patches of one image instead of M.
            mean_input = a.mean(dim=0, keepdim=True, dtype=dtype)
            vector_a = helper.input_matrix(mean_input).mean(dim=(0, 2))  # (G, D_in)
            vector_g = helper.output_grad_matrix(g).mean(dim=(0, 2), dtype=dtype)  # (G, D_out)

        pending = self._pending.get(helper.name)
        if pending is None:
            self._pending[helper.name] = [vector_a, vector_g, 1]
        else:
            pending[0] += vector_a
            pending[1] += vector_g
            pending[2] += 1

    def _discard_pending_statistics(self) -> None:
        self._pending.clear()

    def _update_vectors(self) -> None:
        for name, (vector_a, vector_g, count) in self._pending.items():
            state = self.layer_state[name]
            new_a, new_g = vector_a / count, vector_g / count
            if "a" not in state:
                state["a"], state["g"] = new_a, new_g
            else:
                state["a"].mul_(self.factor_decay).add_(new_a, alpha=1.0 - self.factor_decay)
                state["g"].mul_(self.factor_decay).add_(new_g, alpha=1.0 - self.factor_decay)
        self._pending.clear()
        self._counters["statistics_updates"] += 1

    def _after_load(self) -> None:
        self._pending.clear()

    # ----------------------------------------------------------------------------------------
    # Preconditioning

    def _preconditioned_matrices(self) -> dict[str, torch.Tensor]:
        if self._pending:
            self._update_vectors()

        matrices, gradients = {}, {}
        for helper in self.layers:
            state = self.layer_state[helper.name]
            if "a" not in state:
                continue
            gradient = self._gradient_matrix(helper)  # (G, D_out, D_in)
            if gradient is None:
                continue
            damping = self._group(helper)["damping"]
            vector_a, vector_g = state["a"], state["g"]  # (G, D_in), (G, D_out)

            projection = torch.einsum("go,goi,gi->g", vector_g, gradient, vector_a)  # g^T W a
            norms = (vector_a * vector_a).sum(dim=-1) * (vector_g * vector_g).sum(dim=-1)
            weight = (projection / (damping + norms)).reshape(-1, 1, 1)
            rank_one = vector_g.unsqueeze(-1) * vector_a.unsqueeze(-2)  # (G, D_out, D_in)
            matrices[helper.name] = (gradient - weight * rank_one) / damping
            gradients[helper.name] = gradient
        self._apply_kl_clip(matrices, gradients, self.kl_clip)
        return matrices

    def remove(self) -> None:
        self._recorder.remove()
