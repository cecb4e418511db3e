"""KFAC with eigendecomposed Kronecker factors, factored Tikhonov damping and KL clipping."""

from __future__ import annotations

import logging
import math
from typing import Iterable, Optional

import torch
from torch import nn

from fngd.layers import LayerHelper, Recorder

from .base import PreconditionedSGD
from .common import (batched_eigh, check_interval, check_number, check_sgd_arguments,
                     without_autocast)

logger = logging.getLogger(__name__)


class KFAC(PreconditionedSGD):
    r"""Kronecker-factored approximate curvature (Martens & Grosse 2015; Grosse & Martens 2016
    for convolutions), preconditioning ``nn.Linear`` and ``nn.Conv2d`` layers.

    For a layer with inputs ``x`` (a bias adds a ones column; Conv2d inputs are patches, one
    per output position) and output gradients ``z``, over M samples and S positions:

    .. math::
        A = \frac{1}{MS} \sum_{m,s} x_{ms} x_{ms}^T, \qquad
        G = \frac{c^2}{MS} \sum_{m,s} z_{ms} z_{ms}^T,

    with ``c = M`` when the loss is a batch mean (``batch_averaged=True``), so that ``c z`` is
    the output gradient of each sample's own loss, and ``c = 1`` for a summed loss. Every
    ``statistics_interval`` steps the factors take a running average,
    ``A <- xi A + (1 - xi) A_batch`` (xi = ``factor_decay``; the first batch sets them), and
    every ``inverse_interval`` steps each factor is eigendecomposed, ``A = Q_A diag(a) Q_A^T``.
    With damping ``lambda`` split between the factors,

    .. math::
        d_A = \pi \sqrt{\lambda}, \quad d_G = \sqrt{\lambda} / \pi, \quad
        \pi = \sqrt{\frac{\operatorname{tr}(A) / \dim A}{\operatorname{tr}(G) / \dim G}}
        \ (\pi = 1 \text{ without } \texttt{pi\_damping}),

    the preconditioned gradient of the layer's gradient matrix ``W`` (weight and bias) is

    .. math::
        P = (G + d_G I)^{-1} W (A + d_A I)^{-1}
          = Q_G \operatorname{diag}\big(\tfrac{1}{g + d_G}\big) Q_G^T \, W \,
            Q_A \operatorname{diag}\big(\tfrac{1}{a + d_A}\big) Q_A^T.

    Conv2d layers with ``groups > 1`` get one pair of factors per group (block-diagonal).
    KL clipping scales all preconditioned layers by
    ``nu = min(1, sqrt(kl_clip / sum_l lr^2 <P_l, W_l>))``. Then, for every parameter,

    .. math::
        b \leftarrow \mu b + (P + \text{wd}\, w), \qquad w \leftarrow w - \eta b,

    with the plain gradient in place of P for parameters outside the preconditioned layers.

    Choices that implementations differ on: damping is added to each factor as written
    above, not to the products of the factors' eigenvalues. The damped inverses are built
    with the eigendecompositions, from the damping and ``pi`` of that step. The factors use
    every sample of the batch, without subsampling.

    NOTE: output gradients are recorded as the backward pass delivers them, so with
    ``torch.amp.GradScaler`` the G factor carries the square of the loss scale. bf16
    autocast needs no scaler and is unaffected.

    Args:
        model: the module whose layers are preconditioned; its hooks stay until ``remove()``.
        lr: learning rate (default 0.1).
        momentum: SGD momentum (default 0.9).
        weight_decay: L2 penalty added after preconditioning (default 0).
        nesterov: Nesterov momentum (default False).
        damping: Tikhonov damping ``lambda`` (default 0.003); a parameter-group option, so
            schedulers may change it (it takes effect at the next eigendecomposition).
        pi_damping: split the damping between the factors by ``pi`` (default True).
        kl_clip: KL-clipping bound (default 0.001); 0 or None turns clipping off.
        factor_decay: running-average weight of the old factors, in [0, 1) (default 0.95).
        statistics_interval: steps between factor updates, T1 (default 10).
        inverse_interval: steps between eigendecompositions, T2 (default 100).
        batch_averaged: the loss is a mean over the batch (default True).
        skip: ``fnmatch`` patterns of module names to leave on the plain gradient.
        params: parameters or groups to optimize (default: all of ``model`` that need a gradient).
        check_finite: skip a step whose gradients hold inf or NaN; it reads one flag from the
            device each step.
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, nesterov: bool = False, damping: float = 0.003,
                 pi_damping: bool = True, kl_clip: Optional[float] = 0.001,
                 factor_decay: float = 0.95, statistics_interval: int = 10,
                 inverse_interval: int = 100, batch_averaged: bool = True,
                 skip: Iterable[str] = (), params: Optional[Iterable] = None,
                 check_finite: bool = True):
        check_sgd_arguments(lr, momentum, weight_decay, nesterov)
        check_number("damping", damping, 0.0, low_open=True)
        if kl_clip is not None:
            check_number("kl_clip", kl_clip, 0.0)
        check_number("factor_decay", factor_decay, 0.0, 1.0)
        check_interval("statistics_interval", statistics_interval)
        check_interval("inverse_interval", inverse_interval)

        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        damping=damping)
        super().__init__(model, defaults, skip, params, check_finite)
        self.pi_damping = pi_damping
        self.kl_clip = kl_clip
        self.factor_decay = factor_decay
        self.statistics_interval = statistics_interval
        self.inverse_interval = inverse_interval
        self.batch_averaged = batch_averaged
        self._counters.update(statistics_updates=0, inverse_updates=0, decomposition_failures=0)

        # Batch factors recorded in the backward pass since the last step: name -> [A, G, count].
        self._pending: dict[str, list] = {}
        # Damped inverses (G + d_G I)^-1 and (A + d_A I)^-1, rebuilt from the eigenbases.
        self._inverses: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._recorder = Recorder(self.layers, self._record, self._statistics_due)

    def _statistics_due(self) -> bool:
        return self._step_count % self.statistics_interval == 0

    # ----------------------------------------------------------------------------------------
    # Statistics, recorded in the backward pass

    @torch.no_grad()
    def _record(self, helper: LayerHelper, a: torch.Tensor, g: torch.Tensor) -> None:
        dtype = self._statistics_dtype(helper)
        with without_autocast(a.device):
            x = helper.input_matrix(a.to(dtype))  # (M, G, S, D_in)
            z = helper.output_grad_matrix(g.to(dtype))  # (M, G, S, D_out)
            samples, positions = x.shape[0], x.shape[2]
            count = samples * positions
            output_scale = float(samples) if self.batch_averaged else 1.0
            factor_a = torch.einsum("mgsi,mgsj->gij", x, x) / count  # (G, D_in, D_in)
            factor_g = torch.einsum("mgso,mgsp->gop", z, z) * (output_scale ** 2 / count)

        pending = self._pending.get(helper.name)
        if pending is None:
            self._pending[helper.name] = [factor_a, factor_g, 1]
        else:
            # A layer called twice in one forward pass, or gradients accumulated over several
            # backward passes: average the batch factors.
            pending[0] += factor_a
            pending[1] += factor_g
            pending[2] += 1

    def _discard_pending_statistics(self) -> None:
        self._pending.clear()

    def _update_factors(self) -> None:
        for name, (factor_a, factor_g, count) in self._pending.items():
            state = self.layer_state[name]
            new_a, new_g = factor_a / count, factor_g / count
            if "A" not in state:
                state["A"], state["G"] = new_a, new_g
            else:
                state["A"].mul_(self.factor_decay).add_(new_a, alpha=1.0 - self.factor_decay)
                state["G"].mul_(self.factor_decay).add_(new_g, alpha=1.0 - self.factor_decay)
        self._pending.clear()
        self._counters["statistics_updates"] += 1

    # ----------------------------------------------------------------------------------------
    # Eigendecompositions and damped inverses

    def _update_eigenbases(self) -> None:
        ready = [h for h in self.layers if "A" in self.layer_state[h.name]]
        if not ready:
            return
        matrices = []
        for helper in ready:
            state = self.layer_state[helper.name]
            matrices += [state["A"], state["G"]]
        results = batched_eigh(matrices)

        for index, helper in enumerate(ready):
            state = self.layer_state[helper.name]
            result_a, result_g = results[2 * index], results[2 * index + 1]
            if result_a is None or result_g is None:
                failed = (result_a is None) + (result_g is None)
                self._counters["decomposition_failures"] += failed
                outcome = "keeps its previous eigenbases" if "A_eigenvectors" in state else \
                    "stays on the plain gradient"
                logger.warning("KFAC: eigendecomposition of the factors of %s failed at step %d "
                               "(factors not finite or the solver did not converge); the layer "
                               "%s (%d failures so far)", helper.name, self._step_count, outcome,
                               self._counters["decomposition_failures"])
            else:
                state["A_eigenvalues"], state["A_eigenvectors"] = result_a
                state["G_eigenvalues"], state["G_eigenvectors"] = result_g
            self._build_inverses(helper)
        self._counters["inverse_updates"] += 1

    def _build_inverses(self, helper: LayerHelper) -> None:
        state = self.layer_state[helper.name]
        if "A_eigenvectors" not in state:
            return
        values_a, vectors_a = state["A_eigenvalues"], state["A_eigenvectors"]
        values_g, vectors_g = state["G_eigenvalues"], state["G_eigenvectors"]
        root_damping = math.sqrt(self._group(helper)["damping"])

        pi = torch.ones_like(values_a[..., 0])  # (G,)
        if self.pi_damping:
            # tr(F) / dim(F) is the mean eigenvalue. A G factor that is all zeros (a layer whose
            # output gradient vanished) makes the ratio infinite: keep pi = 1 there.
            ratio = values_a.mean(dim=-1) / values_g.mean(dim=-1)
            pi = torch.where(torch.isfinite(ratio) & (ratio > 0), ratio.sqrt(), pi)
        damping_a = (pi * root_damping).unsqueeze(-1)
        damping_g = (root_damping / pi).unsqueeze(-1)

        inverse_a = (vectors_a / (values_a + damping_a).unsqueeze(-2)) @ vectors_a.transpose(-1, -2)
        inverse_g = (vectors_g / (values_g + damping_g).unsqueeze(-2)) @ vectors_g.transpose(-1, -2)
        self._inverses[helper.name] = (inverse_g, inverse_a)

    def _after_load(self) -> None:
        self._inverses.clear()
        self._pending.clear()
        for helper in self.layers:
            self._build_inverses(helper)

    # ----------------------------------------------------------------------------------------
    # Preconditioning

    def _preconditioned_matrices(self) -> dict[str, torch.Tensor]:
        if self._pending:
            self._update_factors()
        if self._step_count % self.inverse_interval == 0:
            self._update_eigenbases()

        matrices, gradients = {}, {}
        for helper in self.layers:
            inverses = self._inverses.get(helper.name)
            if inverses is None:
                continue
            gradient = self._gradient_matrix(helper)  # (G, D_out, D_in)
            if gradient is None:
                continue
            inverse_g, inverse_a = inverses
            matrices[helper.name] = inverse_g @ gradient @ inverse_a
            gradients[helper.name] = gradient
        self._apply_kl_clip(matrices, gradients, self.kl_clip)
        return matrices

    def remove(self) -> None:
        self._recorder.remove()
