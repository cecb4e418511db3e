"""The part KFAC, Shampoo and Eva have in common: layer discovery through ``fngd.layers``,
parameter groups, the SGD-momentum update of preconditioned directions, counters and state."""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
from torch import nn

from fngd.layers import LayerHelper, find_layers

from .common import kl_clip_scale, sgd_momentum_update

logger = logging.getLogger(__name__)


class PreconditionedSGD(torch.optim.Optimizer):
    """SGD with momentum on directions that a subclass preconditions per layer.

    Subclasses implement ``_preconditioned_matrices()``, which returns, for each layer it
    preconditions this step, the direction as a ``(G, D_out, D_in)`` matrix (bias as the last
    input column, like ``LayerHelper.grad_matrix``). Every other parameter (BatchNorm,
    embeddings, skipped layers, layers without statistics yet) moves along its plain gradient.
    ``.grad`` is read, never written.
    """

    needs_model = True

    def __init__(self, model: nn.Module, defaults: dict, skip: Iterable[str],
                 params: Optional[Iterable], check_finite: bool):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} takes the model (an nn.Module) first, got "
                            f"{type(model).__name__}; pass parameter groups through params=")
        if isinstance(skip, str):
            raise TypeError(f"skip must be a list of name patterns, got the string {skip!r}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        self.check_finite = check_finite

        group_of = {}
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                group_of[id(param)] = index
        self.layers: list[LayerHelper] = []
        for helper in find_layers(model, skip):
            if all(id(p) in group_of for p in helper.params):
                self.layers.append(helper)
            elif id(helper.weight) in group_of:
                logger.info("plain gradient for %s: its bias is not among the optimized "
                            "parameters", helper.name)
        self._group_index = {h.name: group_of[id(h.weight)] for h in self.layers}

        # Per-layer tensors that define the preconditioner (factors, statistics, eigenbases);
        # saved by state_dict() under the layer's module name.
        self.layer_state: dict[str, dict[str, torch.Tensor]] = {h.name: {} for h in self.layers}
        self._step_count = 0
        self._counters: dict[str, int] = {"skipped_steps": 0}

    # ----------------------------------------------------------------------------------------
    # Helpers for subclasses

    def _group(self, helper: LayerHelper) -> dict:
        return self.param_groups[self._group_index[helper.name]]

    @staticmethod
    def _statistics_dtype(helper: LayerHelper) -> torch.dtype:
        return torch.promote_types(helper.weight.dtype, torch.float32)

    def _gradient_matrix(self, helper: LayerHelper) -> Optional[torch.Tensor]:
        """Return the layer's gradient as ``(G, D_out, D_in)`` in float32 or better, or None."""
        weight_grad = helper.weight.grad
        if weight_grad is None:
            return None
        bias_grad = None
        if helper.has_bias:
            bias_grad = helper.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros_like(helper.bias)
        dtype = self._statistics_dtype(helper)
        if bias_grad is not None:
            bias_grad = bias_grad.to(dtype)
        return helper.grad_matrix(weight_grad.to(dtype), bias_grad)

    def _apply_kl_clip(self, matrices: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor],
                 kl_clip: Optional[float]) -> None:
        """Scale every preconditioned direction by the KL-clipping factor, in place."""
        products = []
        for helper in self.layers:
            if helper.name in matrices:
                lr = self._group(helper)["lr"]
                products.append((matrices[helper.name] * gradients[helper.name]).sum() * lr ** 2)
        scale = kl_clip_scale(products, kl_clip)
        if scale is None:
            return
        for matrix in matrices.values():
            matrix.mul_(scale.to(matrix.dtype))

    def _preconditioned_matrices(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _discard_pending_statistics(self) -> None:
        """Forget statistics recorded for a skipped step; subclasses that record override it."""

    # ----------------------------------------------------------------------------------------
    # The step

    @torch.no_grad()
    def step(self, closure=None):
        """Precondition the layer gradients and apply the SGD-momentum update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if self.check_finite and not self._gradients_finite():
            self._counters["skipped_steps"] += 1
            self._discard_pending_statistics()
            logger.warning("%s skipped step %d: a gradient contains inf or NaN (%d steps "
                           "skipped so far)", type(self).__name__, self._step_count,
                           self._counters["skipped_steps"])
            self._step_count += 1
            return loss

        directions: dict[int, torch.Tensor] = {}
        matrices = self._preconditioned_matrices()
        for helper in self.layers:
            matrix = matrices.get(helper.name)
            if matrix is None:
                continue
            weight_direction, bias_direction = helper.split_grad_matrix(matrix)
            directions[id(helper.weight)] = weight_direction.to(helper.weight.dtype)
            if bias_direction is not None:
                directions[id(helper.bias)] = bias_direction.to(helper.bias.dtype)

        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = [directions.get(id(p), p.grad) for p in params]
            sgd_momentum_update(params, updates, self.state, group["lr"], group["momentum"],
                                group["weight_decay"], group["nesterov"])

        self._step_count += 1
        return loss

    def _gradients_finite(self) -> bool:
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads:
            return True
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        return bool(torch.isfinite(norms).all())

    # ----------------------------------------------------------------------------------------
    # Counters, state and clean-up

    def stats(self) -> dict[str, int]:
        """Return the cumulative counters (statistic and inverse updates, failures, skips)."""
        return dict(self._counters)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["preconditioner"] = {
            "step_count": self._step_count,
            "counters": dict(self._counters),
            "layers": {name: dict(tensors) for name, tensors in self.layer_state.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("preconditioner", None)
        super().load_state_dict(state_dict)
        if extra is None:
            logger.warning("loaded a %s state without preconditioner state: statistics start "
                           "again from nothing", type(self).__name__)
            return
        missing = set(self.layer_state) - set(extra["layers"])
        if missing:
            raise ValueError(f"the saved state has no preconditioner for layers {sorted(missing)}; "
                             "was it saved for another model or with other skip patterns?")
        self._step_count = extra["step_count"]
        self._counters.update(extra["counters"])
        for helper in self.layers:
            device = helper.weight.device
            self.layer_state[helper.name] = {
                key: value.to(device) for key, value in extra["layers"][helper.name].items()}
        self._after_load()

    def _after_load(self) -> None:
        """Rebuild anything derived from ``layer_state``; subclasses with caches override it."""

    def remove(self) -> None:
        """Remove this optimizer's hooks from the model (KFAC and Eva install them)."""
