"""FNGD: natural gradient as a weighted sum of per-sample gradients, with shared coefficients."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager, Iterable, Optional

import torch
from torch import nn

from .layers import LayerHelper, LayerTap, find_layers, solve_coefficients
from .update import (check_choice, check_interval, check_number, check_sgd_arguments,
                     sgd_momentum_update)

logger = logging.getLogger(__name__)

MODES = ("fngd", "ngd")
SHARE_BY = ("step", "sample")
SCALES = ("none", "damping")
LOSS_REDUCTIONS = ("mean", "sum")


class FNGD(torch.optim.Optimizer):
    r"""Fast natural gradient descent (Ou et al., arXiv 2403.03473).

    For each ``nn.Linear`` and ``nn.Conv2d`` layer and a batch of M samples with per-sample
    gradients ``U = [u_1 ... u_M]`` and Gram matrix ``K = U^T U``, the damped empirical-Fisher
    step is, by the Sherman-Morrison-Woodbury identity,

    .. math::
        d = (\lambda I + U U^T / M)^{-1} g = \frac{1}{\lambda M} U v, \qquad
        v = 1 - (\lambda I + K / M)^{-1} K 1 / M, \qquad \lambda = \alpha \|K\|_F.

    ``v`` does not change when K is scaled, so ``mode="fngd"`` computes it in the first epoch
    only, stores one vector per layer and step within the epoch, and reuses it later.
    ``mode="ngd"`` computes it at every step. With ``scale="none"`` (the paper's tuning rule)
    the layer direction is ``U v / M``, the mean gradient with per-sample weights ``v``, and
    ``1 / lambda`` is left to the learning rate; ``scale="damping"`` multiplies by the stored
    ``1 / lambda``. All other parameters (BatchNorm, embeddings, skipped layers) get the plain
    gradient. The update is SGD with momentum, weight decay added after preconditioning:

    .. math::
        b \leftarrow \mu b + (d + \text{wd}\, w), \qquad w \leftarrow w - \eta b.

    How it runs: the weighted gradient ``U v / M`` is the ordinary weight-gradient kernel
    applied to output gradients scaled per sample, so the backward pass computes it directly
    (``LayerTap``) and, after ``loss.backward()``, the ``.grad`` of a preconditioned layer holds
    it. Reusing coefficients costs what an SGD step costs: no unfold, no per-sample gradients,
    no second backward. In a step that solves, K is built from the layer input and output
    gradient inside the backward pass and solved in float64.

    Differences from the paper: ``share_by="sample"`` (coefficients keyed by dataset index) and
    ``refresh_every`` are ablations the paper does not have; a failed solve falls back to the
    SGD direction (``v = 1``) for that layer and step; a step whose gradients are not finite is
    skipped (``check_finite``). Both are counted in ``stats()`` and logged.

    Args:
        model: the module whose layers are preconditioned; its hooks stay until ``remove()``.
        lr: learning rate (default 0.1).
        momentum: SGD momentum (default 0.9).
        weight_decay: L2 penalty added after preconditioning (default 0).
        nesterov: Nesterov momentum (default False).
        alpha: damping factor, ``lambda = alpha * ||K||_F`` (default 0.01).
        mode: ``"fngd"`` (solve in the first epoch, reuse afterwards) or ``"ngd"`` (solve at
            every step).
        share_by: ``"step"`` (the vector of step i of the first epoch is applied at step i of
            every later epoch) or ``"sample"`` (keyed by dataset index; call
            ``set_sample_indices`` before each forward pass).
        scale: ``"none"`` or ``"damping"`` (see above).
        refresh_every: recompute the stored coefficients every this many epochs; 0 never
            recomputes after the first epoch.
        steps_per_epoch: optimizer steps in one epoch, so that FNGD knows where epochs begin.
            Without it, call ``next_epoch()`` at the end of every epoch.
        loss_reduction: ``"mean"`` or ``"sum"``, how the loss reduces over the batch. Only
            ``scale="damping"`` needs it, to compute ``lambda`` from per-sample gradients of
            each sample's own loss.
        skip: ``fnmatch`` patterns of module names to leave on the plain gradient.
        params: parameters or parameter groups to optimize (default: every parameter of
            ``model`` that requires a gradient). Groups may set their own ``lr``,
            ``momentum``, ``weight_decay``, ``nesterov`` and ``alpha``; a layer uses the
            ``alpha`` of the group of its weight.
        check_finite: skip a step whose gradients hold inf or NaN. It reads one flag from the
            device each step.

    Each ``backward()`` must be followed by ``step()`` (or ``zero_grad()``) before a
    preconditioned layer runs backward again: gradient accumulation over several backward
    passes and layers applied twice in one forward pass raise ``RuntimeError``.

    A profiler may set the attribute ``profiler`` to a callable ``profiler(name)`` returning a
    context manager; FNGD then times its Gram matrices (``"per_sample"``) and solves
    (``"precondition"``) with it.

    NOTE: the reuse step's cost was measured on CPUs only. On a GPU, the per-layer Python work
    of the tap and the one flag read per step of ``check_finite`` may matter for small models.
    """

    needs_model = True

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, nesterov: bool = False, alpha: float = 0.01,
                 mode: str = "fngd", share_by: str = "step", scale: str = "none",
                 refresh_every: int = 0, steps_per_epoch: Optional[int] = None,
                 loss_reduction: str = "mean", skip: Iterable[str] = (),
                 params: Optional[Iterable] = None, check_finite: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"FNGD takes the model (an nn.Module) first, got {type(model).__name__}; "
                            "pass parameter groups through params=")
        check_sgd_arguments(lr, momentum, weight_decay, nesterov)
        check_number("alpha", alpha, 0.0, low_open=True)
        check_choice("mode", mode, MODES)
        check_choice("share_by", share_by, SHARE_BY)
        check_choice("scale", scale, SCALES)
        check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        if not isinstance(refresh_every, int) or refresh_every < 0:
            raise ValueError(f"invalid refresh_every={refresh_every!r}: expected an integer >= 0")
        if steps_per_epoch is not None:
            check_interval("steps_per_epoch", steps_per_epoch)

        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        nesterov=nesterov, alpha=alpha)
        super().__init__(params, defaults)

        self.mode = mode
        self.share_by = share_by
        self.scale = scale
        self.refresh_every = refresh_every
        self.steps_per_epoch = steps_per_epoch
        self.loss_reduction = loss_reduction
        self.check_finite = check_finite

        optimized = {id(p) for group in self.param_groups for p in group["params"]}
        self.layers: list[LayerHelper] = [
            h for h in find_layers(model, skip) if id(h.weight) in optimized]
        self._group_index = {h.name: self._find_group(h.weight) for h in self.layers}
        self._taps = [LayerTap(h, self._coefficients) for h in self.layers]

        # Position in training: steps taken, and the epoch and step within it.
        self._step_count = 0
        self._epoch = 0
        self._step_in_epoch = 0
        self._sample_indices: Optional[torch.Tensor] = None
        self._backward_seen: set[str] = set()
        self._untapped_logged: set[str] = set()

        # Stored coefficients. share_by="step": {layer: {step_in_epoch: (v, damping)}};
        # share_by="sample": {layer: {"v": (N,), "damping": (N,), "filled": (N,)}}.
        self._coefficient_store: dict[str, dict] = {h.name: {} for h in self.layers}

        self._counters = {"solve_steps": 0, "reuse_steps": 0, "layer_solves": 0,
                          "layer_reuses": 0, "skipped_steps": 0}
        self._fallbacks = torch.zeros((), dtype=torch.int64)  # counted on the device, read lazily
        self._logged_fallbacks = 0
        self._unseen_samples = torch.zeros((), dtype=torch.int64)
        self._step_solved = False
        self._step_reused = False
        # Set by a profiler: profiler(name) returns a context manager that times a section.
        self.profiler: Optional[Callable[[str], ContextManager]] = None

        if mode == "fngd" and steps_per_epoch is None:
            logger.info("FNGD without steps_per_epoch: call next_epoch() at the end of each "
                        "epoch, or every step keeps solving as in mode='ngd'")

    # ----------------------------------------------------------------------------------------
    # Position in training

    @property
    def epoch(self) -> int:
        """The current epoch, counted from 0."""
        return self._epoch

    def next_epoch(self) -> None:
        """Start a new epoch; only for use without ``steps_per_epoch``."""
        if self.steps_per_epoch is not None:
            raise RuntimeError("FNGD counts epochs from steps_per_epoch; do not call next_epoch() "
                               "as well (pass steps_per_epoch=None to count epochs by hand)")
        self._epoch += 1
        self._step_in_epoch = 0

    def _solves_this_epoch(self) -> bool:
        if self.mode == "ngd" or self._epoch == 0:
            return True
        return self.refresh_every > 0 and self._epoch % self.refresh_every == 0

    def set_sample_indices(self, indices: torch.Tensor) -> None:
        """Give the dataset indices of the next batch; ``share_by="sample"`` needs them."""
        self._sample_indices = torch.as_tensor(indices).reshape(-1).long()

    # ----------------------------------------------------------------------------------------
    # Coefficients, called from the backward pass of each preconditioned layer

    def _coefficients(self, helper: LayerHelper, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        name = helper.name
        if name in self._backward_seen:
            raise RuntimeError(
                f"layer {name!r} ran backward twice before step(): FNGD preconditions one "
                "backward pass per step, through each layer once; call step() or zero_grad() "
                f"between backward passes, or leave the layer out with skip=[{name!r}]")
        self._backward_seen.add(name)
        batch_size = g.shape[0]

        stored = None
        if not self._solves_this_epoch():
            stored = self._lookup(name, batch_size, g.device)
        if stored is not None:
            v, damping = stored
            self._counters["layer_reuses"] += 1
            self._step_reused = True
        else:
            v, damping = self._solve(helper, a, g)
            self._counters["layer_solves"] += 1
            self._step_solved = True
        return self._scaled(v, damping, batch_size)

    def _solve(self, helper: LayerHelper, a: torch.Tensor, g: torch.Tensor):
        group = self.param_groups[self._group_index[helper.name]]
        with self._timed("per_sample"):
            gram = helper.gram(a, g)
        with self._timed("precondition"):
            v, damping, ok = solve_coefficients(gram, group["alpha"])
        self._fallbacks = self._fallbacks.to(ok.device) + (~ok).long()

        storage_dtype = torch.promote_types(helper.weight.dtype, torch.float32)
        v = v.to(storage_dtype)
        damping = damping.to(storage_dtype)
        if self.mode == "fngd":
            self._store(helper.name, v, damping)
        return v, damping

    def _scaled(self, v: torch.Tensor, damping: torch.Tensor, batch_size: int) -> torch.Tensor:
        if self.scale == "none":
            return v
        # The output gradients in backward are each sample's own-loss gradients times r (1/M for
        # a mean, 1 for a sum). Their Gram matrix and damping are therefore r^2 times the
        # paper's, and the paper's U v / (M lambda) is this kernel's output times r / (M * damping).
        reduction = 1.0 / batch_size if self.loss_reduction == "mean" else 1.0
        return v * (reduction / batch_size) / damping

    def _store(self, name: str, v: torch.Tensor, damping: torch.Tensor) -> None:
        store = self._coefficient_store[name]
        if self.share_by == "step":
            store[self._step_in_epoch] = (v.detach(), damping.detach())
            return

        indices = self._require_indices(v.shape[0]).to(v.device)
        size = int(indices.max()) + 1
        if "v" not in store or store["v"].shape[0] < size:
            grown = max(size, 2 * store["v"].shape[0]) if "v" in store else size
            store["v"] = _grow(store.get("v"), grown, v.dtype, v.device, 1.0)
            store["damping"] = _grow(store.get("damping"), grown, v.dtype, v.device, 1.0)
            store["filled"] = _grow(store.get("filled"), grown, torch.bool, v.device, False)
        store["v"][indices] = v.detach()
        store["damping"][indices] = damping.detach()
        store["filled"][indices] = True

    def _lookup(self, name: str, batch_size: int, device: torch.device):
        store = self._coefficient_store[name]
        if self.share_by == "step":
            entry = store.get(self._step_in_epoch)
            if entry is None or entry[0].shape[0] != batch_size:
                return None
            return entry[0].to(device), entry[1].to(device)

        if "v" not in store:
            return None
        indices = self._require_indices(batch_size).to(store["v"].device)
        inside = indices < store["v"].shape[0]
        safe = torch.where(inside, indices, torch.zeros_like(indices))
        filled = store["filled"][safe] & inside
        # Samples never seen in a solving epoch get the SGD weight; they are counted, and the
        # device is not synchronised to find them.
        self._unseen_samples = self._unseen_samples.to(filled.device) + (~filled).sum()
        v = torch.where(filled, store["v"][safe], torch.ones_like(store["v"][safe]))
        damping = torch.where(filled, store["damping"][safe], torch.ones_like(v))
        # One damping per batch: the mean of the samples' stored values.
        return v.to(device), damping.mean().to(device)

    def _require_indices(self, batch_size: int) -> torch.Tensor:
        if self._sample_indices is None:
            raise RuntimeError("share_by='sample' needs set_sample_indices(indices) before each "
                               "forward pass")
        if self._sample_indices.numel() != batch_size:
            raise RuntimeError(f"set_sample_indices got {self._sample_indices.numel()} indices "
                               f"for a batch of {batch_size} samples")
        return self._sample_indices

    def _find_group(self, param: torch.Tensor) -> int:
        for index, group in enumerate(self.param_groups):
            if any(p is param for p in group["params"]):
                return index
        raise KeyError("parameter is not optimized by this FNGD instance")

    # ----------------------------------------------------------------------------------------
    # The update

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._backward_seen.clear()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        """Apply the SGD-momentum update to the gradients the backward pass left."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._log_untapped_layers()
        finite = True
        if self.check_finite:
            grads = [p.grad for group in self.param_groups for p in group["params"]
                     if p.grad is not None]
            if grads:
                norms = torch.stack(torch._foreach_norm(grads))
                finite = bool(torch.isfinite(norms).all())
        if finite:
            for group in self.param_groups:
                self._sgd_momentum(group)
        else:
            self._counters["skipped_steps"] += 1
            logger.warning("FNGD skipped step %d: a gradient contains inf or NaN (%d steps skipped "
                           "so far)", self._step_count, self._counters["skipped_steps"])

        self._finish_step()
        return loss

    def _sgd_momentum(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        sgd_momentum_update(params, [p.grad for p in params], self.state, group["lr"],
                            group["momentum"], group["weight_decay"], group["nesterov"])

    def _finish_step(self) -> None:
        if self._step_solved:
            self._counters["solve_steps"] += 1
            # Solving steps already pay for K; one read of the fallback count costs little.
            fallbacks = int(self._fallbacks)
            if fallbacks > self._logged_fallbacks:
                logger.warning("FNGD fell back to the SGD direction (v = 1) in %d layer solves "
                               "so far: the damped Gram system was singular or not finite",
                               fallbacks)
                self._logged_fallbacks = fallbacks
        elif self._step_reused:
            self._counters["reuse_steps"] += 1
        self._step_solved = False
        self._step_reused = False
        self._backward_seen.clear()
        self._sample_indices = None

        self._step_count += 1
        self._step_in_epoch += 1
        if self.steps_per_epoch is not None and self._step_in_epoch >= self.steps_per_epoch:
            self._epoch += 1
            self._step_in_epoch = 0

    def _log_untapped_layers(self) -> None:
        for helper in self.layers:
            name = helper.name
            if (name not in self._backward_seen and name not in self._untapped_logged
                    and helper.weight.grad is not None):
                self._untapped_logged.add(name)
                logger.info("plain gradient for %s in this step: it was not called as a module "
                            "with a batched input, so FNGD could not capture it", name)

    def _timed(self, name: str) -> ContextManager:
        return self.profiler(name) if self.profiler is not None else contextlib.nullcontext()

    # ----------------------------------------------------------------------------------------
    # Counters, state and clean-up

    def stats(self) -> dict[str, int]:
        """Return cumulative counters: steps that solved or reused, layer solves, fallbacks."""
        counters = dict(self._counters)
        counters["fallbacks"] = int(self._fallbacks)
        counters["unseen_samples"] = int(self._unseen_samples)
        return counters

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["fngd"] = {
            "step_count": self._step_count,
            "epoch": self._epoch,
            "step_in_epoch": self._step_in_epoch,
            "counters": dict(self._counters),
            "fallbacks": int(self._fallbacks),
            "unseen_samples": int(self._unseen_samples),
            "mode": self.mode,
            "share_by": self.share_by,
            "coefficients": {name: dict(store) for name, store in self._coefficient_store.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("fngd", None)
        super().load_state_dict(state_dict)

        if extra is None:
            logger.warning("loaded an optimizer state without FNGD coefficients: the next epoch "
                           "solves again")
            return
        if extra["share_by"] != self.share_by:
            raise ValueError(f"state was saved with share_by={extra['share_by']!r}, but this "
                             f"optimizer uses share_by={self.share_by!r}")
        missing = set(self._coefficient_store) - set(extra["coefficients"])
        if missing:
            raise ValueError(f"state has no coefficients for layers {sorted(missing)}: was it "
                             "saved for another model?")

        self._step_count = extra["step_count"]
        self._epoch = extra["epoch"]
        self._step_in_epoch = extra["step_in_epoch"]
        self._counters.update(extra["counters"])
        self._fallbacks = torch.tensor(extra["fallbacks"])
        self._logged_fallbacks = extra["fallbacks"]
        self._unseen_samples = torch.tensor(extra["unseen_samples"])

        for helper in self.layers:
            device = helper.weight.device
            store = extra["coefficients"][helper.name]
            if self.share_by == "step":
                self._coefficient_store[helper.name] = {
                    int(position): (v.to(device), damping.to(device))
                    for position, (v, damping) in store.items()}
            else:
                self._coefficient_store[helper.name] = {
                    key: value.to(device) for key, value in store.items()}

    def remove(self) -> None:
        """Remove the hooks from the model; the model then trains as if FNGD were never there."""
        for tap in self._taps:
            tap.remove()
        self._taps = []


def _grow(tensor: Optional[torch.Tensor], size: int, dtype, device, fill) -> torch.Tensor:
    grown = torch.full((size,), fill, dtype=dtype, device=device)
    if tensor is not None:
        grown[: tensor.shape[0]] = tensor
    return grown
